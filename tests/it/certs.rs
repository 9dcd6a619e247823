//! VoIP Services certificates end to end: the worker authenticates certificate
//! apps in the TLS handshake (no provider token) against the simulator, which
//! verifies client certificates against its CA and takes the app from the
//! certificate, as APNs does; start-up refuses a certificate that cannot ring.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use voip_push_worker::apns::cert::ClientIdentity;
use voip_push_worker::apns::token::unix_now;
use voip_push_worker::apns::{ApnsClient, PushRequest, PushType, SendError};
use voip_push_worker::apns_sim::certs::CertSpec;
use voip_push_worker::apns_sim::{ApnsSim, SimOptions};
use voip_push_worker::config::{AppConfig, Config};
use voip_push_worker::event::{Environment, Status};
use voip_push_worker::metrics::Metrics;

use crate::apns::sim_settings;
use crate::common::{binary_for, metric, random_token, unique, TestEnv, BUNDLE, BUNDLE2};

/// A directory for certificate files, removed on drop.
pub struct CertDir(pub PathBuf);

impl CertDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("vpw-it-cert-"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    }

    /// A certificate app of `bundle_id` with `spec`'s certificate from `sim`, as
    /// one PEM file.
    pub fn pem_app(&self, sim: &ApnsSim, bundle_id: &str, spec: &CertSpec) -> AppConfig {
        let cert = sim.issue_client_cert(spec).expect("issue");
        AppConfig {
            bundle_id: bundle_id.into(),
            cert_file: Some(self.write(&format!("{}.pem", unique("voip-")), cert.pem())),
            ..Default::default()
        }
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn certificate_apps_ring_with_tls_client_auth_from_pem_and_p12() {
    let mut env = TestEnv::without_worker(|_| {}).await;
    let dir = CertDir::new();
    // The chat app: one PEM file; the work app: a .p12 as Keychain Access exports it.
    let chat = dir.pem_app(&env.sim, BUNDLE, &CertSpec::voip(BUNDLE));
    let work_cert = env.sim.issue_client_cert(&CertSpec::voip(BUNDLE2)).unwrap();
    let work = AppConfig {
        bundle_id: BUNDLE2.into(),
        cert_file: Some(dir.write("work.p12", work_cert.pkcs12("app1e", false).unwrap())),
        cert_password_file: Some(dir.write("work.pass", "app1e\n")),
        ..Default::default()
    };
    env.cfg.apns.apps = vec![chat, work];
    env.start_worker().await;

    let chat_token = env
        .device(
            "300",
            Some(Environment::Production),
            Environment::Production,
        )
        .await;
    let work_token = random_token();
    env.sim
        .register_token(Environment::Sandbox, &work_token, BUNDLE2);
    env.store
        .register_device("301", BUNDLE2, &work_token, Some(Environment::Sandbox))
        .await
        .unwrap();
    env.publish(json!({"callId":"cert-1","toUserId":"300"}))
        .await;
    env.publish(json!({"callId":"cert-2","toUserId":"301","bundleId":BUNDLE2}))
        .await;
    for (call, bundle) in [("cert-1", BUNDLE), ("cert-2", BUNDLE2)] {
        let r = &env.results_for(call, 1).await[0];
        assert_eq!(
            (r.status, r.bundle_id.as_deref(), r.apns_status),
            (Status::Delivered, Some(bundle), Some(200)),
            "{r:#?}"
        );
    }

    let requests = env.sim.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    for (token, bundle) in [(&chat_token, BUNDLE), (&work_token, BUNDLE2)] {
        let req = requests.iter().find(|r| &r.token == token).unwrap();
        assert_eq!(
            req.client_certificate.as_deref(),
            Some(format!("UID={bundle}.voip, CN=VoIP Services: {bundle}").as_str())
        );
        assert!(
            !req.headers.contains_key("authorization"),
            "no provider token on a certificate connection: {req:#?}"
        );
        assert_eq!(req.headers["apns-topic"], format!("{bundle}.voip"));
    }
    let (_, text) = env.http_get("/metrics").await;
    assert_eq!(metric(&text, "voip_push_provider_tokens_signed_total"), 0.0);
    let expiry = metric(
        &text,
        &format!("voip_push_apns_certificate_expiry_timestamp_seconds{{app=\"{BUNDLE}\"}}"),
    );
    let in_a_year = (OffsetDateTime::now_utc() + time::Duration::days(365)).unix_timestamp();
    assert!((expiry - in_a_year as f64).abs() < 120.0, "{expiry}");
    env.cleanup().await;
}

/// `run` with one certificate app: the binary, as an operator starts it.
fn run_binary(cfg: &Config) -> std::process::Output {
    binary_for(cfg).arg("run").output().expect("run the binary")
}

#[tokio::test]
async fn a_certificate_of_another_app_or_expired_stops_start_up_with_one_line() {
    let env = TestEnv::without_worker(|_| {}).await;
    let dir = CertDir::new();
    let mut cfg = env.cfg.clone();
    cfg.apns.apps = vec![dir.pem_app(&env.sim, BUNDLE, &CertSpec::voip("com.example.other"))];
    let err = voip_push_worker::start(cfg.clone(), CancellationToken::new())
        .await
        .err()
        .expect("a certificate of another app must not start")
        .to_string();
    assert!(err.contains("is for bundle com.example.other"), "{err}");
    assert!(err.contains(&format!("configured as {BUNDLE}")), "{err}");
    let out = run_binary(&cfg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("set bundle_id to com.example.other"),
        "{stderr}"
    );

    let now = OffsetDateTime::now_utc();
    let expired = CertSpec::voip(BUNDLE).valid(
        now - time::Duration::days(366),
        now - time::Duration::days(1),
    );
    cfg.apns.apps = vec![dir.pem_app(&env.sim, BUNDLE, &expired)];
    let out = run_binary(&cfg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("expired at"), "{stderr}");
    assert!(
        stderr.contains("create a new VoIP Services certificate"),
        "{stderr}"
    );
    env.cleanup().await;
}

/// Our client with `identity`'s certificate, trusting `sim`'s CA.
fn cert_client(sim: &ApnsSim, identity: &ClientIdentity) -> ApnsClient {
    ApnsClient::with_identity(sim_settings(sim), Metrics::new(), Some(identity)).unwrap()
}

fn push(token: &str, topic: &str) -> PushRequest {
    PushRequest {
        token: token.into(),
        topic: topic.into(),
        provider_token: "".into(),
        apns_id: uuid::Uuid::new_v4(),
        expiration: unix_now() + 45,
        priority: 10,
        collapse_id: "cert-call".into(),
        payload: Bytes::from_static(br#"{"type":"call.incoming","aps":{}}"#),
        push_type: PushType::Voip,
    }
}

#[tokio::test]
async fn the_simulator_takes_the_app_from_the_certificate_and_refuses_strangers() {
    let sim = ApnsSim::start(SimOptions::local(Vec::new())).await.unwrap();
    let dir = CertDir::new();
    let load = |spec: &CertSpec| {
        let app = dir.pem_app(&sim, BUNDLE, spec);
        ClientIdentity::load(app.cert_file.as_deref().unwrap(), None).unwrap()
    };
    let token = random_token();
    sim.register_token(Environment::Production, &token, BUNDLE);
    let topic = format!("{BUNDLE}.voip");
    let send = |identity: ClientIdentity, topic: String, token: String| {
        let client = cert_client(&sim, &identity);
        async move {
            client
                .send(
                    Environment::Production,
                    &push(&token, &topic),
                    Duration::from_secs(5),
                )
                .await
        }
    };

    let ok = send(load(&CertSpec::voip(BUNDLE)), topic.clone(), token.clone()).await;
    assert_eq!(ok.as_ref().map(|r| r.status).ok(), Some(200), "{ok:?}");

    // A certificate of another app: its topic is not ours.
    let other = send(load(&CertSpec::voip(BUNDLE2)), topic.clone(), token.clone())
        .await
        .unwrap();
    assert_eq!(
        (other.status, other.reason.as_deref()),
        (400, Some("TopicDisallowed"))
    );
    // One that names no app at all.
    let nameless = CertSpec {
        uid: None,
        common_name: Some("a web server".into()),
        ..CertSpec::voip(BUNDLE)
    };
    let bad = send(load(&nameless), topic.clone(), token.clone())
        .await
        .unwrap();
    assert_eq!(
        (bad.status, bad.reason.as_deref()),
        (403, Some("BadCertificate"))
    );

    // Expired, or from a CA the simulator never saw: refused in the handshake.
    let now = OffsetDateTime::now_utc();
    let expired = CertSpec::voip(BUNDLE).valid(
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    );
    let stranger_sim = ApnsSim::start(SimOptions::local(Vec::new())).await.unwrap();
    let stranger_app = dir.pem_app(&stranger_sim, BUNDLE, &CertSpec::voip(BUNDLE));
    let stranger = ClientIdentity::load(stranger_app.cert_file.as_deref().unwrap(), None).unwrap();
    for identity in [load(&expired), stranger] {
        let refused = send(identity, topic.clone(), token.clone()).await;
        assert!(
            matches!(
                refused,
                Err(SendError::Connect { .. } | SendError::Transport { .. })
            ),
            "{refused:?}"
        );
    }
    let accepted: Vec<_> = sim.requests().into_iter().map(|r| r.status).collect();
    assert_eq!(
        accepted,
        vec![200, 400, 403],
        "handshake refusals never reach a stream"
    );
}
