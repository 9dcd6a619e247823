//! Splitting connection strings: what is ours comes out, everything else reaches
//! tokio-postgres unchanged.

use super::*;
use proptest::prelude::*;

fn pg(s: &str) -> tokio_postgres::Config {
    s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

#[test]
fn a_managed_database_url_is_split() {
    let (rest, p) = split(
        "postgres://app:s%3Fcr%26t@db.example.com:6432/voip?sslmode=verify-full\
         &sslrootcert=%2Fetc%2Fca%20bundle.pem&application_name=x&sslcert=/c.pem&sslkey=/k.pem",
    )
    .unwrap();
    assert_eq!(
        rest,
        "postgres://app:s%3Fcr%26t@db.example.com:6432/voip?application_name=x"
    );
    assert_eq!(p.mode, SslMode::VerifyFull);
    assert_eq!(
        p.root_cert,
        Some(RootCert::File("/etc/ca bundle.pem".into()))
    );
    assert_eq!(p.cert, Some("/c.pem".into()));
    assert_eq!(p.key, Some("/k.pem".into()));
    let cfg = pg(&rest);
    assert_eq!(cfg.get_password(), Some(&b"s?cr&t"[..]));
    assert_eq!(cfg.get_application_name(), Some("x"));
}

#[test]
fn defaults_and_plain_urls() {
    for url in [
        "postgres://postgres@127.0.0.1:5432/voip_push",
        "postgresql://u@h/d?",
        "postgres://u@h/d?&&",
    ] {
        let (rest, p) = split(url).unwrap();
        assert_eq!(p, SslParams::default(), "{url}");
        assert_eq!(p.mode, SslMode::Prefer);
        pg(&rest);
    }
}

#[test]
fn every_mode_parses_and_others_are_refused() {
    for m in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
        let (_, p) = split(&format!("postgres://h/d?sslmode={m}")).unwrap();
        assert_eq!(p.mode.as_str(), m);
    }
    for bad in ["allow", "VERIFY-FULL", "", "verify_full"] {
        let err = split(&format!("postgres://h/d?sslmode={bad}")).unwrap_err();
        assert!(err.contains("is not one of"), "{err}");
    }
}

#[test]
fn system_roots_mean_verify_full() {
    let (_, p) = split("postgres://h/d?sslrootcert=system").unwrap();
    assert_eq!(p.mode, SslMode::VerifyFull);
    assert_eq!(p.root_cert, Some(RootCert::System));
    let err = split("postgres://h/d?sslrootcert=system&sslmode=require").unwrap_err();
    assert!(err.contains("verify-full"), "{err}");
}

#[test]
fn half_a_client_identity_is_refused() {
    let err = split("postgres://h/d?sslcert=/c.pem").unwrap_err();
    assert!(err.contains("go together"), "{err}");
    assert!(split("host=h sslkey=/k.pem").is_err());
}

#[test]
fn bad_percent_encoding_is_refused() {
    assert!(split("postgres://h/d?sslrootcert=%zz").is_err());
    assert!(split("postgres://h/d?sslrootcert=%e2").is_err());
    assert!(split("postgres://h/d?sslrootcert=%2").is_err());
}

#[test]
fn key_value_strings_are_split() {
    let (rest, p) = split(
        "host=db.example.com  user = app password='it\\'s a \\\\secret' \
         sslmode=verify-ca sslrootcert='/etc/my ca.pem' dbname=voip",
    )
    .unwrap();
    assert_eq!(p.mode, SslMode::VerifyCa);
    assert_eq!(p.root_cert, Some(RootCert::File("/etc/my ca.pem".into())));
    let cfg = pg(&rest);
    assert_eq!(cfg.get_password(), Some(&b"it's a \\secret"[..]));
    assert_eq!(cfg.get_user(), Some("app"));
    assert_eq!(cfg.get_dbname(), Some("voip"));
    assert!(split("host='unterminated").is_err());
    assert!(split("host").is_err());
}

#[test]
fn passwords_are_hidden_for_logs() {
    use crate::config::redact_url;
    assert_eq!(
        redact_url("host=db password='it\\'s' sslmode=verify-full"),
        "host='db' password='***' sslmode='verify-full'"
    );
    assert_eq!(
        redact_url("postgres://u:pw@h/d?password=pw2&sslmode=require"),
        "postgres://u:***@h/d?password=***&sslmode=require"
    );
    assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
    assert_eq!(
        redact_url("amqps://u:p@h:5671/%2f"),
        "amqps://u:***@h:5671/%2f"
    );
    assert!(!redact_url("host='unterminated password=x").contains('x'));
}

fn value() -> impl Strategy<Value = String> {
    "[ -~]{0,12}"
}

proptest! {
    /// Whatever else a URL carries (percent-encoded), our keys come out and the
    /// rest reaches tokio-postgres as it was.
    #[test]
    fn url_params_survive(app in value(), root in value().prop_filter("system", |r| r != "system")) {
        let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
        let url = format!(
            "postgres://u@h:5/d?application_name={}&sslrootcert={}&sslmode=require",
            enc(&app), enc(&root)
        );
        let (rest, p) = split(&url).unwrap();
        prop_assert_eq!(p.mode, SslMode::Require);
        prop_assert_eq!(p.root_cert, Some(RootCert::File(root.into())));
        prop_assert!(!rest.contains("ssl"));
        let cfg = pg(&rest);
        prop_assert_eq!(cfg.get_application_name(), Some(app.as_str()));
    }

    /// Values with quotes, backslashes and spaces keep their meaning.
    #[test]
    fn key_value_values_survive(pw in "[ -~]{1,16}", root in "[!-~]{1,12}") {
        let q = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
        let s = format!("host=h password={} sslrootcert={} sslmode=verify-full", q(&pw), q(&root));
        let (rest, p) = split(&s).unwrap();
        prop_assert_eq!(p.mode, SslMode::VerifyFull);
        if root != "system" {
            prop_assert_eq!(p.root_cert, Some(RootCert::File(root.into())));
        }
        let cfg = pg(&rest);
        prop_assert_eq!(cfg.get_password(), Some(pw.as_bytes()));
    }

    /// Any string: an answer, never a panic.
    #[test]
    fn any_string(s in ".{0,64}") {
        let _ = split(&s);
        let _ = split(&format!("postgres://h/d?{s}"));
    }
}
