use time::{Duration, OffsetDateTime};

use super::*;
use crate::apns_sim::certs::{issue, CertSpec, IssuedCert};

fn issued(spec: &CertSpec) -> IssuedCert {
    let tls = crate::apns_sim::tls::generate().unwrap();
    issue(&tls.issuer, spec).unwrap()
}

/// Writes `bytes` to a fresh file; the directory is removed on drop.
struct Files(PathBuf);

impl Files {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("vpw-cert-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn now() -> i64 {
    unix_now() as i64
}

#[test]
fn pem_certificate_and_key_load_and_name_the_bundle() {
    let files = Files::new();
    let cert = issued(&CertSpec::voip("com.example.chat"));
    let path = files.write("voip.pem", cert.pem());
    let id = ClientIdentity::load(&path, None).unwrap();
    assert_eq!(id.info.bundle_id.as_deref(), Some("com.example.chat"));
    assert_eq!(id.info.uid.as_deref(), Some("com.example.chat.voip"));
    assert_eq!(id.info.team_id.as_deref(), Some("SIMTEAM001"));
    assert_eq!(
        id.info.subject(),
        "UID=com.example.chat.voip, CN=VoIP Services: com.example.chat"
    );
    assert!(id.info.voip && id.info.only_environment.is_none());
    assert!((360..=365).contains(&id.info.days_left(now())));
    id.check_for("com.example.chat", now()).unwrap();
    // Debug never shows the key.
    assert!(!format!("{id:?}").contains("PRIVATE"));
}

#[test]
fn pkcs12_loads_with_its_password_legacy_and_aes() {
    let files = Files::new();
    let cert = issued(&CertSpec::voip("com.example.chat"));
    let password = files.write("password", "s3cret pass\n");
    for aes in [false, true] {
        let p12 = files.write("voip.p12", cert.pkcs12("s3cret pass", aes).unwrap());
        let id = ClientIdentity::load(&p12, Some(&password)).unwrap();
        assert_eq!(id.info.bundle_id.as_deref(), Some("com.example.chat"));
        assert_eq!(id.chain.len(), 1);
        assert!(matches!(id.key, PrivateKeyDer::Pkcs8(_)));
        let wrong = files.write("wrong", "not it");
        let err = ClientIdentity::load(&p12, Some(&wrong))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cert_password_file"), "{err}");
        assert!(!err.contains("not it"), "the password never appears: {err}");
    }
    // A .p12 exported without a password opens with none.
    let open = files.write("open.p12", cert.pkcs12("", false).unwrap());
    ClientIdentity::load(&open, None).unwrap();
}

#[test]
fn a_certificate_of_another_app_is_one_clear_line() {
    let files = Files::new();
    let cert = issued(&CertSpec::voip("com.example.other"));
    let id = ClientIdentity::load(&files.write("c.pem", cert.pem()), None).unwrap();
    let err = id
        .check_for("com.example.chat", now())
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(err.contains("is for bundle com.example.other"), "{err}");
    assert!(err.contains("configured as com.example.chat"), "{err}");
    assert!(err.contains("set bundle_id to com.example.other"), "{err}");
}

#[test]
fn expired_and_future_certificates_are_refused() {
    let files = Files::new();
    let t = OffsetDateTime::now_utc();
    let spec = CertSpec::voip("com.example.chat");
    let expired = issued(
        &spec
            .clone()
            .valid(t - Duration::days(400), t - Duration::days(2)),
    );
    let id = ClientIdentity::load(&files.write("old.pem", expired.pem()), None).unwrap();
    assert!(id.info.days_left(now()) < 0);
    let err = id
        .check_for("com.example.chat", now())
        .unwrap_err()
        .to_string();
    assert!(err.contains("expired at"), "{err}");
    assert!(err.contains("VoIP Services certificate"), "{err}");
    let future = issued(&spec.valid(t + Duration::days(2), t + Duration::days(30)));
    let id = ClientIdentity::load(&files.write("new.pem", future.pem()), None).unwrap();
    let err = id
        .check_for("com.example.chat", now())
        .unwrap_err()
        .to_string();
    assert!(err.contains("clock"), "{err}");
}

#[test]
fn the_bundle_comes_from_the_uid_else_the_common_name() {
    let files = Files::new();
    let cn_only = CertSpec {
        uid: None,
        ..CertSpec::voip("com.example.chat")
    };
    let id = ClientIdentity::load(&files.write("a.pem", issued(&cn_only).pem()), None).unwrap();
    assert_eq!(id.info.bundle_id.as_deref(), Some("com.example.chat"));

    let alert = CertSpec {
        uid: Some("com.example.chat".into()),
        common_name: Some("Apple Development IOS Push Services: com.example.chat".into()),
        ..CertSpec::voip("x")
    };
    let id = ClientIdentity::load(&files.write("b.pem", issued(&alert).pem()), None).unwrap();
    assert_eq!(id.info.only_environment, Some(Environment::Sandbox));
    let err = id
        .check_for("com.example.chat", now())
        .unwrap_err()
        .to_string();
    assert!(err.contains("alert push certificate"), "{err}");

    let nameless = CertSpec {
        uid: None,
        common_name: Some("somebody".into()),
        ..CertSpec::voip("x")
    };
    let id = ClientIdentity::load(&files.write("c.pem", issued(&nameless).pem()), None).unwrap();
    let err = id
        .check_for("com.example.chat", now())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an APNs certificate"), "{err}");
}

#[test]
fn unusable_files_say_what_to_do() {
    let files = Files::new();
    let cert = issued(&CertSpec::voip("com.example.chat"));
    let no_key = files.write("cert-only.pem", &cert.cert_pem);
    let err = ClientIdentity::load(&no_key, None).unwrap_err().to_string();
    assert!(err.contains("no private key"), "{err}");
    let encrypted = files.write(
        "enc.pem",
        format!(
            "{}-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            cert.cert_pem
        ),
    );
    let err = ClientIdentity::load(&encrypted, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("encrypted"), "{err}");
    let traditional = files.write(
        "rsa.pem",
        format!(
            "{}-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
            cert.cert_pem
        ),
    );
    let err = ClientIdentity::load(&traditional, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("openssl pkey"), "{err}");
    let garbage = files.write("x.p12", b"\x30\x03\x02\x01\x03");
    let err = ClientIdentity::load(&garbage, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("PKCS#12"), "{err}");
    let missing = ClientIdentity::load(Path::new("/nonexistent/voip.p12"), None).unwrap_err();
    assert!(missing.to_string().contains("/nonexistent/voip.p12"));
}
