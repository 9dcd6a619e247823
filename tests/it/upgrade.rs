//! What a rolling upgrade meets: a database one migration behind the binary,
//! and rows written by the previous version.

use serde_json::json;
use tokio_util::sync::CancellationToken;
use voip_push_worker::event::{Environment, Status};
use voip_push_worker::store::claims::Claim;
use voip_push_worker::StartError;

use crate::common::TestEnv;

/// A worker started before `migrate` ran would fail every event on a missing
/// column and dead-letter it: it refuses to start instead, and the event waits
/// in its queue for a worker on a migrated database.
#[tokio::test]
async fn a_worker_refuses_a_database_behind_its_migrations_and_consumes_nothing() {
    let mut env = TestEnv::without_worker(|_| {}).await;
    crate::doctor::declare(&env.cfg.amqp).await;
    env.device(
        "u-up",
        Some(Environment::Production),
        Environment::Production,
    )
    .await;
    let client = env.db.client().await;
    // The database as the previous version left it.
    client
        .batch_execute(
            "ALTER TABLE delivery_claims DROP COLUMN result_json, DROP COLUMN attempts_json;
             DELETE FROM schema_migrations WHERE version = 12",
        )
        .await
        .unwrap();
    env.publish(json!({"callId":"up-1","toUserId":"u-up"}))
        .await;

    let refused = voip_push_worker::start(env.cfg.clone(), CancellationToken::new()).await;
    let err = refused
        .err()
        .expect("a worker on an unmigrated database must not start");
    assert!(
        matches!(&err, StartError::Unmigrated(p) if p == &[12]),
        "{err}"
    );
    assert!(
        err.to_string().contains("voip-push-worker migrate"),
        "{err}"
    );
    assert!(env.dead_letters().await.is_empty());

    assert_eq!(env.store.migrate().await.unwrap(), vec![12]);
    env.start_worker().await;
    assert_eq!(
        env.results_for("up-1", 1).await[0].status,
        Status::Delivered
    );
    env.cleanup().await;
}

/// Outcomes are stored as `json` since migration 12; claims recorded before
/// it (`jsonb` columns, what a worker of the previous version still writes
/// during a rolling upgrade) are read as before: traced, counted as rung by a
/// cancel, and re-published rather than pushed again.
#[tokio::test]
async fn outcomes_stored_by_the_previous_version_are_still_read() {
    let mut env = TestEnv::new().await;
    let token = env
        .device(
            "u-js",
            Some(Environment::Production),
            Environment::Production,
        )
        .await;
    env.publish(json!({"callId":"js-new","toUserId":"u-js"}))
        .await;
    assert_eq!(
        env.results_for("js-new", 1).await[0].status,
        Status::Delivered
    );
    env.recorded_trace("js-new").await;
    let client = env.db.client().await;
    // This version's outcome: in the `json` columns only.
    let row = client
        .query_one(
            "SELECT result IS NULL AND attempts IS NULL, result_json->>'status',
                    json_array_length(attempts_json)
             FROM delivery_claims WHERE call_id = 'js-new'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, &str>(1),
            row.get::<_, i32>(2)
        ),
        (true, "delivered", 1)
    );

    let device: i64 = client
        .query_one("SELECT id FROM devices WHERE voip_token = $1", &[&token])
        .await
        .unwrap()
        .get(0);
    // Two claims of the previous version, by a worker that is gone: one
    // published, one whose result the broker never confirmed.
    let result = json!({"eventType":"call.incoming","callId":"js-old","status":"delivered",
                        "environment":"production","fallbackUsed":false,
                        "tokenSuffix":&token[56..]});
    let attempts = json!([{"at":"2026-12-01T10:00:00.000Z","environment":"production",
                           "apnsStatus":200,"reason":null,"apnsId":null,"latencyMs":4}]);
    client
        .execute(
            "INSERT INTO calls (call_id, bundle_id, to_user_id, state)
             SELECT 'js-old', bundle_id, user_id, 'delivered' FROM devices WHERE id = $1",
            &[&device],
        )
        .await
        .unwrap();
    for (key, published) in [
        ("old-a/call.incoming/js-old", true),
        ("old-b/call.incoming/js-old", false),
    ] {
        client
            .execute(
                "INSERT INTO delivery_claims (event_key, device_id, owner, lease_until, call_id,
                                              worker_id, event_type, result, attempts, published_at)
                 VALUES ($1, $2, 'gone/1', now(), 'js-old', 'gone', 'call.incoming', $3, $4,
                         CASE WHEN $5 THEN now() END)",
                &[&key, &device, &result, &attempts, &published],
            )
            .await
            .unwrap();
    }

    let trace = env.store.trace_call("js-old").await.unwrap().unwrap();
    assert_eq!(trace.deliveries.len(), 2);
    for d in &trace.deliveries {
        assert_eq!((d.device_id, d.status.as_str()), (device, "delivered"));
        assert_eq!(d.environment.as_deref(), Some("production"));
        assert_eq!(d.attempts.len(), 1);
        assert_eq!(d.attempts[0].apns_status, Some(200));
    }
    let rung = env.store.rung_devices("js-old").await.unwrap();
    assert_eq!(rung.len(), 1);
    assert_eq!(
        (rung[0].device_id, rung[0].environment),
        (device, Some(Environment::Production))
    );
    let claim = env
        .store
        .claim(
            "old-b/call.incoming/js-old",
            device,
            "me/1",
            "js-old",
            "call.incoming",
        )
        .await
        .unwrap();
    assert_eq!(claim, Claim::Republish(result));
    env.cleanup().await;
}
