//! `doctor` against the APNs simulator over real TLS + HTTP/2, real Postgres and
//! real RabbitMQ: a healthy setup passes, and each way APNs keeps a phone silent
//! (key, team, topic, clock) is named with its fix. Services down or fresh, and
//! `devices list`: `doctor_services.rs`.

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use voip_push_worker::amqp::{connect, declare_topology};
use voip_push_worker::apns_sim::{ApnsSim, SimApp, SimOptions};
use voip_push_worker::config::{AmqpConfig, AppConfig, Config};
use voip_push_worker::doctor::{self, apns::PROBE_TOKEN, Check, Options, Report, Status};
use voip_push_worker::event::Environment;

use crate::common::{scripted, unique, TestEnv, TestKey, BUNDLE};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_voip-push-worker");
/// Nothing listens on port 1: a service that is down.
const CLOSED_PG: &str = "postgres://postgres@127.0.0.1:1/voip_push";
const CLOSED_AMQP: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

/// A simulator that knows `apps`, and a configuration pointing at it for `app`,
/// with Postgres and RabbitMQ at closed ports (APNs-only tests ignore them).
pub(crate) async fn sim_setup(apps: &[&TestKey], app: AppConfig) -> (ApnsSim, Config) {
    let sim_apps: Vec<AppConfig> = apps.iter().map(|k| k.app.clone()).collect();
    let sim = ApnsSim::start(SimOptions::local(
        SimApp::from_config(&sim_apps).expect("sim apps"),
    ))
    .await
    .expect("simulator");
    let ca_file = apps[0].dir.join("ca.pem");
    std::fs::write(&ca_file, &sim.ca_pem).expect("write CA");
    let mut cfg = Config::default();
    cfg.apns.production_url = sim.production_url();
    cfg.apns.sandbox_url = sim.sandbox_url();
    cfg.apns.ca_file = Some(ca_file);
    cfg.apns.apps = vec![app];
    cfg.postgres.url = CLOSED_PG.into();
    cfg.amqp.url = CLOSED_AMQP.into();
    (sim, cfg)
}

pub(crate) fn amqp_names(cfg: &mut AmqpConfig) {
    cfg.name_objects(&format!("doc.{}", unique("")));
}

pub(crate) async fn declare(cfg: &AmqpConfig) {
    let conn = connect(cfg, "doctor test").await.expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    declare_topology(&ch, cfg).await.expect("topology");
    let _ = conn.close(200, "done".into()).await;
}

pub(crate) async fn undeclare(cfg: &AmqpConfig) {
    let Ok(conn) = connect(cfg, "doctor test cleanup").await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in [&cfg.work_queue, &cfg.cancel_queue, &cfg.dead_letter_queue] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [
            &cfg.call_exchange,
            &cfg.dead_letter_exchange,
            &cfg.results_exchange,
        ] {
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
}

pub(crate) fn one<'a>(report: &'a Report, id: &str) -> &'a Check {
    let found = report.find(id);
    assert_eq!(found.len(), 1, "{id}: {found:#?}");
    found[0]
}

fn accept(report: &Report, env: Environment) -> &Check {
    report
        .find("apns.accept")
        .into_iter()
        .find(|c| c.environment == Some(env))
        .unwrap_or_else(|| panic!("no apns.accept for {env:?}: {report:#?}"))
}

pub(crate) fn fix(c: &Check) -> &str {
    c.fix.as_deref().unwrap_or_else(|| panic!("no fix: {c:#?}"))
}

#[tokio::test]
async fn healthy_setup_passes_every_check_quickly() {
    let env = TestEnv::new().await;
    env.device("doctor-user", None, Environment::Sandbox).await;
    let url = format!("http://{}", env.worker().http_addr);
    let report = doctor::run(
        &env.cfg,
        &Options {
            worker_url: Some(url.clone()),
            ..Default::default()
        },
    )
    .await;
    let text = doctor::render_human(&report);
    assert!(report.ok, "{text}");
    let not_passed: Vec<&Check> = report
        .checks
        .iter()
        .filter(|c| c.status != Status::Pass)
        .collect();
    assert!(not_passed.is_empty(), "{text}");
    let apps = env.cfg.apps().len();
    assert_eq!(report.find("config.app").len(), apps, "{text}");
    assert_eq!(report.find("key.sign").len(), apps, "{text}");
    assert_eq!(report.find("apns.accept").len(), 2 * apps, "{text}");
    for id in [
        "config.load",
        "postgres.connect",
        "postgres.migrations",
        "postgres.tokens",
        "rabbitmq.connect",
        "rabbitmq.topology",
        "rabbitmq.work_queue",
        "rabbitmq.dead_letters",
        "worker.readyz",
    ] {
        assert_eq!(report.find(id).len(), 1, "{id} missing:\n{text}");
    }
    assert_eq!(report.find("apns.connect").len(), 2, "{text}");
    assert!(
        accept(&report, Environment::Production)
            .detail
            .contains("com.example.chat.voip"),
        "the topic used is shown:\n{text}"
    );
    assert!(
        one(&report, "rabbitmq.work_queue")
            .detail
            .contains("1 consumer"),
        "{text}"
    );
    assert!(report.duration_ms < 5_000, "{text}");
    assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
    assert!(!text.contains('✗'), "{text}");

    // The binary, as an operator runs it: exit 0, then exit 1 once Postgres is gone.
    let cfg = env.cfg.clone();
    let (healthy, failing) = tokio::task::spawn_blocking(move || {
        let run = |pg: &str| {
            let mut c = crate::common::binary_for(&cfg);
            c.env("VPW__POSTGRES__URL", pg)
                .args(["doctor", "--url", &url]);
            c.output().expect("run doctor")
        };
        (run(&cfg.postgres.url), run(CLOSED_PG))
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&healthy.stdout);
    assert_eq!(healthy.status.code(), Some(0), "{out}");
    assert!(out.contains("nothing stands in the way of a ring"), "{out}");
    let out = String::from_utf8_lossy(&failing.stdout);
    assert_eq!(failing.status.code(), Some(1), "{out}");
    assert!(out.contains("✗ Postgres reachable"), "{out}");
    assert!(out.contains("fix: start PostgreSQL"), "{out}");
    assert!(out.contains("✓ TLS + HTTP/2 to production"), "{out}");
    env.cleanup().await;
}

#[tokio::test]
async fn wrong_key_id_names_the_key_settings() {
    let key = TestKey::new(BUNDLE, "TEAM000001", "KEY0000001");
    let wrong = AppConfig {
        key_id: "KEY0000009".into(),
        ..key.app.clone()
    };
    let (_sim, cfg) = sim_setup(&[&key], wrong).await;
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    assert!(!report.ok);
    for env in [Environment::Production, Environment::Sandbox] {
        let c = accept(&report, env);
        assert_eq!(c.status, Status::Fail, "{text}");
        assert!(c.detail.contains("InvalidProviderToken"), "{text}");
        assert!(fix(c).contains("key_id of [[apns.apps]] #1"), "{text}");
        assert!(fix(c).contains("team_id of [[apns.apps]] #1"), "{text}");
    }
    // Offline, the file name already gives it away.
    let app = one(&report, "config.app");
    assert_eq!(app.status, Status::Warn, "{text}");
    assert!(fix(app).contains("to KEY0000001"), "{text}");
    // The key itself is fine, and the connection too.
    assert_eq!(one(&report, "key.sign").status, Status::Pass, "{text}");
    assert!(report
        .find("apns.connect")
        .iter()
        .all(|c| c.status == Status::Pass));
}

#[tokio::test]
async fn key_of_another_team_names_the_bundle_and_team() {
    let ours = TestKey::new(BUNDLE, "TEAM000001", "KEY0000001");
    let theirs = TestKey::new("com.example.other", "TEAM000002", "KEY0000002");
    let mixed = AppConfig {
        bundle_id: BUNDLE.into(),
        ..theirs.app.clone()
    };
    let (_sim, cfg) = sim_setup(&[&ours, &theirs], mixed).await;
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    assert!(!report.ok);
    let c = accept(&report, Environment::Production);
    assert_eq!(c.status, Status::Fail, "{text}");
    assert!(c.detail.contains("TopicDisallowed"), "{text}");
    assert!(
        fix(c).contains("bundle id of an app of team TEAM000002"),
        "{text}"
    );
    assert!(fix(c).contains("use that team's key"), "{text}");
}

#[tokio::test]
async fn topic_problems_name_the_voip_topic_rule() {
    // A bundle id configured with .voip: refused before anything is sent.
    let key = TestKey::new(BUNDLE, "TEAM000001", "KEY0000001");
    let with_suffix = AppConfig {
        bundle_id: format!("{BUNDLE}.voip"),
        ..key.app.clone()
    };
    let (_sim, cfg) = sim_setup(&[&key], with_suffix).await;
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    assert_eq!(one(&report, "config.load").status, Status::Fail, "{text}");
    let app = one(&report, "config.app");
    assert_eq!(app.status, Status::Fail, "{text}");
    assert!(
        fix(app).contains(&format!("to {BUNDLE}: the VoIP topic is <bundle id>.voip")),
        "{text}"
    );
    // What the worker would send is what the doctor sends, and APNs refuses it.
    let c = accept(&report, Environment::Production);
    assert!(c.detail.contains("com.example.chat.voip.voip"), "{text}");
    assert_eq!(c.status, Status::Fail, "{text}");

    // APNs answering BadTopic (a topic rewritten on the way, say).
    let (sim, cfg) = sim_setup(&[&key], key.app.clone()).await;
    let bad_topic = scripted(400, "BadTopic");
    sim.script(PROBE_TOKEN, [bad_topic.clone(), bad_topic]);
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    for env in [Environment::Production, Environment::Sandbox] {
        let c = accept(&report, env);
        assert_eq!(c.status, Status::Fail, "{text}");
        assert!(fix(c).contains("topic <bundle id>.voip"), "{text}");
        assert!(fix(c).contains("we sent com.example.chat.voip"), "{text}");
    }
}

#[tokio::test]
async fn clock_skew_and_a_key_for_one_environment() {
    let key = TestKey::new(BUNDLE, "TEAM000001", "KEY0000001");
    let (sim, cfg) = sim_setup(&[&key], key.app.clone()).await;
    sim.set_clock_offset(2 * 3600);
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    let c = accept(&report, Environment::Sandbox);
    assert!(c.detail.contains("ExpiredProviderToken"), "{text}");
    assert!(fix(c).contains("NTP"), "{text}");

    sim.set_clock_offset(0);
    let restricted = scripted(403, "BadEnvironmentKeyIdInToken");
    sim.script(PROBE_TOKEN, [restricted.clone(), restricted]);
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    let c = accept(&report, Environment::Production);
    assert!(c.detail.contains("restricted to sandbox"), "{text}");
    assert!(fix(c).contains("Sandbox & Production"), "{text}");
}
