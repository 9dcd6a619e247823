//! `doctor` on certificate apps, the clock and the trust store, against the
//! APNs simulator over real TLS + HTTP/2 (Postgres and RabbitMQ at closed
//! ports: these tests read the APNs and certificate checks only).

use time::{Duration, OffsetDateTime};
use voip_push_worker::apns_sim::certs::CertSpec;
use voip_push_worker::apns_sim::{ApnsSim, SimOptions};
use voip_push_worker::config::{AppConfig, Config};
use voip_push_worker::doctor::{self, Check, Options, Report, Status};

use crate::certs::CertDir;
use crate::common::BUNDLE;

/// The simulator, a directory for its certificates, and a configuration for one
/// certificate app made by `app` from them.
async fn setup(app: impl FnOnce(&ApnsSim, &CertDir) -> AppConfig) -> (ApnsSim, CertDir, Config) {
    let sim = ApnsSim::start(SimOptions::local(Vec::new())).await.unwrap();
    let dir = CertDir::new();
    let mut cfg = Config::default();
    cfg.apns.production_url = sim.production_url();
    cfg.apns.sandbox_url = sim.sandbox_url();
    cfg.apns.ca_file = Some(dir.write("ca.pem", &sim.ca_pem));
    cfg.apns.apps = vec![app(&sim, &dir)];
    cfg.postgres.url = "postgres://postgres@127.0.0.1:1/voip_push".into();
    cfg.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    (sim, dir, cfg)
}

fn one<'a>(report: &'a Report, id: &str) -> &'a Check {
    let found = report.find(id);
    assert_eq!(found.len(), 1, "{id}: {}", doctor::render_human(report));
    found[0]
}

fn valid_for(days: i64) -> CertSpec {
    let now = OffsetDateTime::now_utc();
    CertSpec::voip(BUNDLE).valid(now - Duration::days(300), now + Duration::days(days))
}

#[tokio::test]
async fn doctor_checks_certificate_apps_and_their_expiry() {
    // Healthy: loaded, a year to go, and APNs accepts the certificate and topic.
    let (_sim, _dir, cfg) =
        setup(|sim, dir| dir.pem_app(sim, BUNDLE, &CertSpec::voip(BUNDLE))).await;
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    assert_eq!(one(&report, "config.app").status, Status::Pass, "{text}");
    let load = one(&report, "cert.load");
    assert_eq!(load.status, Status::Pass, "{text}");
    assert!(
        load.detail.contains("CN=VoIP Services: com.example.chat"),
        "{text}"
    );
    let expiry = one(&report, "cert.expiry");
    assert_eq!(expiry.status, Status::Pass, "{text}");
    let days = expiry.data["daysLeft"].as_i64().unwrap();
    assert!((364..=365).contains(&days), "{text}");
    assert!(report.find("key.sign").is_empty(), "{text}");
    for c in report.find("apns.accept") {
        assert_eq!(c.status, Status::Pass, "{text}");
        assert_eq!(c.data["reason"], "BadDeviceToken", "{text}");
        assert!(c.detail.starts_with("certificate and topic"), "{text}");
    }
    assert_eq!(report.find("apns.accept").len(), 2, "{text}");

    // Ten days left: a warning with what to do.
    let (_sim, _dir, cfg) = setup(|sim, dir| dir.pem_app(sim, BUNDLE, &valid_for(10))).await;
    let report = doctor::run(&cfg, &Options::default()).await;
    let expiry = one(&report, "cert.expiry");
    assert_eq!(
        expiry.status,
        Status::Warn,
        "{}",
        doctor::render_human(&report)
    );
    let days = expiry.data["daysLeft"].as_i64().unwrap();
    assert!(
        expiry.detail.contains(&format!("in {days} days")),
        "{}",
        expiry.detail
    );
    assert!((9..=10).contains(&days), "{}", expiry.detail);
    assert!(expiry
        .fix
        .as_deref()
        .unwrap()
        .contains("new VoIP Services certificate"));

    // Expired: a failure, and no probe with it (APNs would refuse the handshake).
    let (_sim, _dir, cfg) = setup(|sim, dir| dir.pem_app(sim, BUNDLE, &valid_for(-1))).await;
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    assert!(!report.ok);
    let expiry = one(&report, "cert.expiry");
    assert_eq!(expiry.status, Status::Fail, "{text}");
    assert!(expiry.detail.contains("expired at"), "{text}");
    assert!(report
        .find("apns.accept")
        .iter()
        .all(|c| c.status == Status::Skip));
}

#[tokio::test]
async fn doctor_names_a_certificate_of_another_app_and_apns_agrees() {
    let (_sim, _dir, cfg) =
        setup(|sim, dir| dir.pem_app(sim, BUNDLE, &CertSpec::voip("com.example.other"))).await;
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    let load = one(&report, "cert.load");
    assert_eq!(load.status, Status::Fail, "{text}");
    assert!(
        load.detail.contains("is for bundle com.example.other"),
        "{text}"
    );
    assert!(
        load.fix
            .as_deref()
            .unwrap()
            .contains("set bundle_id of [[apns.apps]] #1 to com.example.other"),
        "{text}"
    );
    for c in report.find("apns.accept") {
        assert_eq!(c.status, Status::Fail, "{text}");
        assert!(c.detail.contains("400 TopicDisallowed"), "{text}");
        assert!(
            c.detail.contains("may not push to com.example.chat.voip"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn doctor_measures_the_clock_against_apns_and_checks_the_trust_store() {
    let (sim, _dir, cfg) =
        setup(|sim, dir| dir.pem_app(sim, BUNDLE, &CertSpec::voip(BUNDLE))).await;
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    let clock = one(&report, "apns.clock");
    assert_eq!(clock.status, Status::Pass, "{text}");
    assert!(
        clock.data["skewSecs"].as_i64().unwrap().abs() <= 1,
        "{text}"
    );
    let trust = one(&report, "apns.trust");
    assert_eq!(trust.status, Status::Pass, "{text}");
    assert!(
        trust
            .detail
            .contains("USERTrust RSA Certification Authority"),
        "{text}"
    );

    // APNs' clock 15 minutes behind ours: this machine runs ahead.
    sim.set_clock_offset(-900);
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    let clock = one(&report, "apns.clock");
    assert_eq!(clock.status, Status::Fail, "{text}");
    assert!(clock.detail.contains("15 min"), "{text}");
    assert!(clock.detail.contains("ahead of APNs"), "{text}");
    assert!(clock.fix.as_deref().unwrap().contains("NTP"), "{text}");
    // The certificate still works: its validity is checked by the simulator's
    // handshake with the real clock.
    assert!(report
        .find("apns.accept")
        .iter()
        .all(|c| c.status == Status::Pass));
}
