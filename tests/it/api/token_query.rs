//! Tokens read from a team's own tables (`store.token_query`).

use serde_json::json;
use voip_push_worker::event::{Environment, Status};

use super::{all_groups, req, SERVICE_TOKEN};
use crate::common::{random_token, TestEnv, BUNDLE};

#[tokio::test]
async fn token_query_rings_a_user_from_their_own_users_table() {
    let mut env = TestEnv::with(|cfg| {
        all_groups(cfg);
        cfg.store.token_query =
            Some("SELECT voip_device_token AS token FROM users WHERE id = $1".into());
        cfg.store.invalidate_query =
            Some("UPDATE users SET voip_device_token = NULL WHERE voip_device_token = $1".into());
    })
    .await;
    let (db, conn) = tokio_postgres::connect(&env.db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    db.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text, voip_device_token text)",
    )
    .await
    .unwrap();
    let token = random_token();
    env.sim.register_token(Environment::Sandbox, &token, BUNDLE);
    let stale = random_token(); // known to neither APNs environment
    let production = random_token();
    env.sim
        .register_token(Environment::Production, &production, BUNDLE);
    db.execute(
        "INSERT INTO users VALUES (10, 'User 10', $1), (12, 'User 12', $2), (13, 'User 13', NULL),
                                  (14, 'User 14', $3)",
        &[&token.to_ascii_uppercase(), &stale, &production],
    )
    .await
    .unwrap();

    let admin = Some(("X-Admin-Token", SERVICE_TOKEN));
    let call = r#"{"toUserId":10,"callId":"tq-10","fromUserId":11,"fromDisplayName":"User 11","room":"p2p:11-10","hasVideo":true}"#;
    assert_eq!(
        req(&env, "POST", "/api/internal/push/call", admin, call)
            .await
            .0,
        202
    );
    let r = &env.results_for("tq-10", 1).await[0];
    assert_eq!(r.status, Status::Delivered, "{r:?}");
    assert!(r.device_id.unwrap() < 0, "synthetic id: {r:?}");
    assert_eq!(r.environment, Some(Environment::Sandbox));
    let rang: Vec<_> = env
        .sim
        .requests()
        .into_iter()
        .filter(|q| q.status == 200)
        .collect();
    assert_eq!(rang.len(), 1);
    assert_eq!(rang[0].token, token);

    // The learned environment is remembered: the next call goes straight there.
    env.publish(json!({"callId":"tq-10b","toUserId":10})).await;
    let r = &env.results_for("tq-10b", 1).await[0];
    assert_eq!(r.status, Status::Delivered);
    assert!(!r.fallback_used, "{r:?}");

    // A token APNs refuses in both environments is cleared by invalidate_query,
    // once a success in each proved the configuration (tq-10 in the sandbox).
    env.publish(json!({"callId":"tq-14","toUserId":14})).await;
    assert_eq!(
        env.results_for("tq-14", 1).await[0].status,
        Status::Delivered
    );
    env.publish(json!({"callId":"tq-12","toUserId":12})).await;
    let r = &env.results_for("tq-12", 1).await[0];
    assert_eq!(r.status, Status::TokenInvalidated, "{r:?}");
    let left: Option<String> = db
        .query_one("SELECT voip_device_token FROM users WHERE id = 12", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, None);

    // No token, or no such user: no_device.
    env.publish(json!({"callId":"tq-13","toUserId":13})).await;
    assert_eq!(
        env.results_for("tq-13", 1).await[0].status,
        Status::NoDevice
    );
    env.publish(json!({"callId":"tq-x","toUserId":"not-a-number"}))
        .await;
    assert_eq!(env.results_for("tq-x", 1).await[0].status, Status::NoDevice);
    env.cleanup().await;
}

#[tokio::test]
async fn token_query_without_invalidate_query_records_invalidation_in_our_table() {
    let mut env = TestEnv::with(|cfg| {
        cfg.store.token_query = Some(
            "SELECT voip_token AS token, 'sandbox' AS environment, app AS bundle_id \
             FROM user_details WHERE user_id = $1"
                .into(),
        );
    })
    .await;
    let (db, conn) = tokio_postgres::connect(&env.db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    db.batch_execute("CREATE TABLE user_details (user_id text, app text, voip_token text)")
        .await
        .unwrap();
    let stale = random_token();
    let other_app = random_token();
    db.execute(
        "INSERT INTO user_details VALUES ('u20', $1, $2), ('u20', 'com.example.work', $3)",
        &[&BUNDLE, &stale, &other_app],
    )
    .await
    .unwrap();
    // Devices APNs accepts in each environment prove the configuration first:
    // only then may a refusal in both invalidate `stale`.
    for env_ in [Environment::Sandbox, Environment::Production] {
        let t = random_token();
        env.sim.register_token(env_, &t, BUNDLE);
        db.execute(
            "INSERT INTO user_details VALUES ('u21', $1, $2)",
            &[&BUNDLE, &t],
        )
        .await
        .unwrap();
    }
    env.publish(json!({"callId":"ud-0","toUserId":"u21"})).await;
    let proved = env.results_for("ud-0", 2).await;
    assert!(
        proved.iter().all(|r| r.status == Status::Delivered),
        "{proved:?}"
    );

    env.publish(json!({"callId":"ud-1","toUserId":"u20"})).await;
    let r = &env.results_for("ud-1", 1).await[0];
    assert_eq!(r.status, Status::TokenInvalidated, "{r:?}");
    let requests = env.sim.requests();
    assert!(
        requests
            .iter()
            .filter(|q| q.headers["apns-collapse-id"] == "ud-1")
            .all(|q| q.token == stale),
        "only this app's token"
    );
    // Recorded in our table, and honoured on the next call.
    let invalid: Option<String> = db
        .query_one(
            "SELECT invalid_reason FROM devices WHERE voip_token = $1",
            &[&stale],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(invalid.as_deref(), Some("BadDeviceToken"));
    env.publish(json!({"callId":"ud-2","toUserId":"u20"})).await;
    assert_eq!(env.results_for("ud-2", 1).await[0].status, Status::NoDevice);
    env.cleanup().await;
}
