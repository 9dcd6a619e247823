//! The binary's commands, run as a user would run them.

use std::process::Command;

use crate::common::{unique, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_voip-push-worker");

/// The binary with an isolated database and AMQP names, and no outside config.
fn command(db: &TestDb, id: &str) -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("VPW_CONFIG")
        .env("VPW__POSTGRES__URL", &db.url)
        .env("VPW__AMQP__CALL_EXCHANGE", format!("cli.{id}.calls"))
        .env("VPW__AMQP__WORK_QUEUE", format!("cli.{id}.work"))
        .env("VPW__AMQP__CANCEL_QUEUE", format!("cli.{id}.cancels"))
        .env("VPW__DEVICES__EXCHANGE", format!("cli.{id}.devices"))
        .env("VPW__DEVICES__QUEUE", format!("cli.{id}.devices-q"))
        .env("VPW__AMQP__DEAD_LETTER_EXCHANGE", format!("cli.{id}.dlx"))
        .env("VPW__AMQP__DEAD_LETTER_QUEUE", format!("cli.{id}.dead"))
        .env("VPW__AMQP__RESULTS_EXCHANGE", format!("cli.{id}.results"))
        .env("VPW_LOG", "warn");
    c
}

/// Deletes the AMQP objects [`command`] named for `id`, whichever the command
/// declared.
async fn delete_amqp(id: &str) {
    let queues = ["work", "cancels", "devices-q", "dead"].map(|q| format!("cli.{id}.{q}"));
    let exchanges = ["calls", "devices", "dlx", "results"].map(|x| format!("cli.{id}.{x}"));
    voip_push_worker::amqp::delete_objects(
        &voip_push_worker::config::AmqpConfig::default(),
        "cli test cleanup",
        queues.iter().map(String::as_str),
        exchanges.iter().map(String::as_str),
    )
    .await;
}

#[tokio::test]
async fn demo_prints_a_delivered_result_and_metrics() {
    let db = TestDb::create().await;
    let id = unique("");
    let demo = command(&db, &id);
    let out = tokio::task::spawn_blocking(move || {
        let mut demo = demo;
        demo.arg("demo").output().map(|o| (o, db))
    })
    .await
    .unwrap()
    .unwrap();
    let (out, db) = out;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"status\": \"delivered\""), "{stdout}");
    assert!(stdout.contains("\"fallbackUsed\": true"), "{stdout}");
    assert!(
        stdout
            .contains("voip_push_deliveries_total{environment=\"sandbox\",status=\"delivered\"} 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("voip_push_events_total{outcome=\"delivered\"} 1"),
        "{stdout}"
    );
    delete_amqp(&id).await;
    db.drop_db().await;
}

#[tokio::test]
async fn migrate_register_and_usage_errors() {
    let db = TestDb::create().await;
    let id = unique("");
    let run = |args: &[&str]| command(&db, &id).args(args).output().unwrap();

    let out = run(&["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let every: Vec<i32> = voip_push_worker::store::migrate::MIGRATIONS
        .iter()
        .map(|m| m.0)
        .collect();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("applied {every:?}")));
    let again = run(&["migrate"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("up to date"));

    let token = "AB".repeat(32);
    let out = run(&[
        "devices",
        "register",
        "--user",
        "10",
        "--token",
        &token,
        "--bundle-id",
        "com.x",
        "--environment",
        "sandbox",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("…abababab") && !stdout.contains(&token.to_lowercase()),
        "only the suffix is shown: {stdout}"
    );

    let client = db.client().await;
    let row = client
        .query_one("SELECT voip_token, environment, user_id FROM devices", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), token.to_lowercase());
    assert_eq!(row.get::<_, String>(1), "sandbox");
    assert_eq!(row.get::<_, String>(2), "10");

    // Bad input: exit 2 with a one-line reason, nothing stored.
    let out = run(&[
        "devices",
        "register",
        "--user",
        "10",
        "--token",
        "xyz",
        "--bundle-id",
        "com.x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid device token"));
    let out = command(&db, &id)
        .env("VPW__WORKER__RING_TIMEOUT_SECS", "soon")
        .arg("migrate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ring_timeout_secs"));
    let out = run(&["run"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "run without an app is a configuration error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no APNs app configured"));
    let count: i64 = client
        .query_one("SELECT count(*) FROM devices", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
    drop(client);
    db.drop_db().await;
}

#[tokio::test]
async fn publish_call_queues_a_persistent_event() {
    use lapin::options::BasicGetOptions;
    let db = TestDb::create().await;
    let id = unique("");
    let out = command(&db, &id)
        .args([
            "publish-call",
            "--to",
            "10",
            "--call-id",
            "11-10",
            "--from",
            "11",
            "--name",
            "User 11",
            "--video",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cfg = voip_push_worker::config::AmqpConfig {
        work_queue: format!("cli.{id}.work"),
        ..Default::default()
    };
    let conn = voip_push_worker::amqp::connect(&cfg, "test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let msg = ch
        .basic_get(
            cfg.work_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the event is queued");
    assert_eq!(*msg.delivery.properties.delivery_mode(), Some(2));
    assert_eq!(
        msg.delivery
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str()),
        Some("application/json")
    );
    assert!(msg.delivery.properties.message_id().is_some());
    let e: serde_json::Value = serde_json::from_slice(&msg.delivery.data).unwrap();
    assert_eq!(e["callId"], "11-10");
    assert_eq!(e["toUserId"], "10");
    assert_eq!(e["fromDisplayName"], "User 11");
    assert_eq!(e["hasVideo"], true);
    assert!(e["sentAt"].is_string());
    let _ = conn.close(200, "done".into()).await;
    delete_amqp(&id).await;
    db.drop_db().await;
}
