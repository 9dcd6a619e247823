//! `doctor` when the services are down or fresh (each named, the others still
//! checked), and `devices list`, against real Postgres and RabbitMQ.

use std::process::Command;

use voip_push_worker::config::{AmqpConfig, Config};
use voip_push_worker::doctor::{self, Options, Status};
use voip_push_worker::event::Environment;
use voip_push_worker::store::Store;

use crate::common::{random_token, unique, TestDb, TestKey, BUNDLE};
use crate::doctor::{amqp_names, declare, fix, one, sim_setup, undeclare, BIN};

#[tokio::test]
async fn postgres_down_is_named_and_rabbitmq_is_still_checked() {
    let key = TestKey::new(BUNDLE, "TEAM000001", "KEY0000001");
    let (_sim, mut cfg) = sim_setup(&[&key], key.app.clone()).await;
    cfg.amqp.url = AmqpConfig::default().url;
    amqp_names(&mut cfg.amqp);
    declare(&cfg.amqp).await;
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    undeclare(&cfg.amqp).await;
    assert!(!report.ok);
    let pg = one(&report, "postgres.connect");
    assert_eq!(pg.status, Status::Fail, "{text}");
    assert!(
        fix(pg).contains("start PostgreSQL, or set VPW__POSTGRES__URL"),
        "{text}"
    );
    assert_eq!(
        one(&report, "postgres.migrations").status,
        Status::Skip,
        "{text}"
    );
    assert_eq!(
        one(&report, "rabbitmq.topology").status,
        Status::Pass,
        "{text}"
    );
    let work = one(&report, "rabbitmq.work_queue");
    assert_eq!(work.status, Status::Warn, "no worker consumes: {text}");
    assert_eq!(work.data["consumers"], 0);
    assert!(text.contains("✗ Postgres reachable"), "{text}");
}

#[tokio::test]
async fn rabbitmq_down_is_named_and_postgres_is_still_checked() {
    let key = TestKey::new(BUNDLE, "TEAM000001", "KEY0000001");
    let (_sim, mut cfg) = sim_setup(&[&key], key.app.clone()).await;
    let db = TestDb::create().await;
    cfg.postgres.url = db.url.clone();
    let store = Store::connect(&cfg.postgres).expect("store");
    store.migrate().await.expect("migrate");
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    db.drop_db().await;
    let mq = one(&report, "rabbitmq.connect");
    assert_eq!(mq.status, Status::Fail, "{text}");
    assert!(
        fix(mq).contains("start RabbitMQ, or set VPW__AMQP__URL"),
        "{text}"
    );
    assert!(
        !fix(mq).contains("guest:guest"),
        "no password in the fix: {text}"
    );
    assert_eq!(one(&report, "rabbitmq.topology").status, Status::Skip);
    assert_eq!(
        one(&report, "postgres.migrations").status,
        Status::Pass,
        "{text}"
    );
    assert!(report.duration_ms < 5_000, "{text}");
}

#[tokio::test]
async fn missing_migrations_and_topology_on_fresh_services() {
    let key = TestKey::new(BUNDLE, "TEAM000001", "KEY0000001");
    let (_sim, mut cfg) = sim_setup(&[&key], key.app.clone()).await;
    let db = TestDb::create().await;
    cfg.postgres.url = db.url.clone();
    cfg.amqp.url = AmqpConfig::default().url;
    amqp_names(&mut cfg.amqp);
    let report = doctor::run(&cfg, &Options::default()).await;
    let text = doctor::render_human(&report);
    db.drop_db().await;
    assert_eq!(
        one(&report, "postgres.connect").status,
        Status::Pass,
        "{text}"
    );
    let m = one(&report, "postgres.migrations");
    assert_eq!(m.status, Status::Fail, "{text}");
    assert!(m.detail.contains("pending: 1 devices"), "{text}");
    assert!(fix(m).contains("run `voip-push-worker migrate`"), "{text}");
    assert_eq!(one(&report, "postgres.tokens").status, Status::Skip);
    let t = one(&report, "rabbitmq.topology");
    assert_eq!(t.status, Status::Fail, "{text}");
    assert!(t.detail.contains(&cfg.amqp.work_queue), "{text}");
    assert!(t.detail.contains(&cfg.amqp.call_exchange), "{text}");
    assert!(fix(t).contains("voip-push-worker run"), "{text}");
    // Nothing was declared by looking.
    let report = doctor::run(&cfg, &Options::default()).await;
    assert_eq!(one(&report, "rabbitmq.topology").status, Status::Fail);
}

#[tokio::test]
async fn devices_list_shows_suffixes_only() {
    let db = TestDb::create().await;
    let mut cfg = Config::default();
    cfg.postgres.url = db.url.clone();
    let store = Store::connect(&cfg.postgres).expect("store");
    store.migrate().await.expect("migrate");
    let user = unique("u-");
    let live = random_token();
    let dead = random_token();
    let id = store
        .register_device(&user, BUNDLE, &live, Some(Environment::Sandbox))
        .await
        .unwrap()
        .id;
    store
        .record_success(id, Environment::Sandbox)
        .await
        .unwrap();
    let dead_id = store
        .register_device(&user, BUNDLE, &dead, None)
        .await
        .unwrap()
        .id;
    assert!(store
        .invalidate(dead_id, "BadDeviceToken", None)
        .await
        .unwrap());

    let url = db.url.clone();
    let u = user.clone();
    let (human, json) = tokio::task::spawn_blocking(move || {
        let run = |json: bool| {
            let mut c = Command::new(BIN);
            c.env_remove("VPW_CONFIG")
                .env("VPW__POSTGRES__URL", &url)
                .args(["devices", "list", "--user", &u]);
            if json {
                c.arg("--json");
            }
            c.output().expect("run devices list")
        };
        (run(false), run(true))
    })
    .await
    .unwrap();
    db.drop_db().await;
    for out in [&human, &json] {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for token in [&live, &dead] {
            assert!(
                !stdout.contains(token.as_str()),
                "whole token printed: {stdout}"
            );
            assert!(
                !stdout.contains(&token[..16]),
                "token prefix printed: {stdout}"
            );
            assert!(stdout.contains(&token[56..]), "suffix missing: {stdout}");
        }
    }
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("2 devices, 1 live"), "{text}");
    assert!(
        text.contains("sandbox (learned from a delivered push)"),
        "{text}"
    );
    assert!(text.contains(": BadDeviceToken"), "{text}");
    assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["userId"], user.as_str());
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0]["tokenSuffix"], &live[56..]);
    assert_eq!(devices[0]["environmentSource"], "learned");
    assert!(devices[0]["lastSuccessAt"].is_string());
    assert_eq!(devices[1]["environment"], "unknown");
    assert_eq!(devices[1]["invalidReason"], "BadDeviceToken");
    assert!(devices[1]["invalidatedAt"].is_string());
}
