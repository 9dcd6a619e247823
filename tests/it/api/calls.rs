//! Call ingestion over HTTP: the signal server's push, `POST /v1/calls`, and
//! groups that are off.

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use voip_push_worker::event::{Environment, Status};

use super::{all_groups, assert_error, bearer, now, req, user_jwt, SERVICE_TOKEN, USER_JWT_SECRET};
use crate::common::{http_request_with_headers, TestEnv};

#[tokio::test]
async fn signal_server_call_is_confirmed_published_and_rings() {
    let mut env = TestEnv::with(all_groups).await;
    let token = env
        .device("10", Some(Environment::Production), Environment::Production)
        .await;
    let admin = Some(("X-Admin-Token", SERVICE_TOKEN));

    // Refused requests first: nothing may be published by them.
    let seed = r#"{"toUserId":10,"callId":"11-10","fromUserId":11,"fromDisplayName":"User 11","room":"p2p:11-10","hasVideo":true}"#;
    let missing = req(&env, "POST", "/api/internal/push/call", None, seed).await;
    assert_error(&missing, 401, "unauthorized");
    let wrong = Some(("X-Admin-Token", "svc-7d1c0f2b9b"));
    let wrong = req(&env, "POST", "/api/internal/push/call", wrong, seed).await;
    assert_error(&wrong, 401, "unauthorized");
    let no_callee = r#"{"callId":"11-10","fromUserId":11}"#;
    let bad = req(&env, "POST", "/api/internal/push/call", admin, no_callee).await;
    assert_error(&bad, 400, "missing_field");
    let user = bearer(&user_jwt("10", 600, USER_JWT_SECRET));
    let as_user = Some(("Authorization", user.as_str()));
    assert_error(
        &req(&env, "POST", "/v1/calls", as_user, seed).await,
        403,
        "forbidden",
    );

    // The seed signal server's request, verbatim.
    let (status, body) = req(&env, "POST", "/api/internal/push/call", admin, seed).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["success"], true);
    let event_id = body["eventId"].as_str().unwrap().to_string();
    let results = env.results_for("11-10", 1).await;
    assert_eq!(results[0].status, Status::Delivered);
    assert_eq!(results[0].event_id, event_id);
    let requests = env.sim.requests();
    assert_eq!(
        requests.len(),
        1,
        "only the accepted call rang: {requests:#?}"
    );
    assert_eq!(requests[0].token, token);
    assert_eq!(requests[0].payload["callId"], "11-10");
    assert_eq!(requests[0].payload["hasVideo"], true);
    assert_eq!(requests[0].payload["fromDisplayName"], "User 11");
    // The ring deadline counts from receipt: sentAt was stamped by the API.
    let sent_at = requests[0].payload["sentAt"].as_i64().unwrap();
    assert!((now() * 1000 - sent_at).abs() < 30_000, "{sent_at}");

    // The same through /v1/calls with the service bearer token.
    let service = bearer(SERVICE_TOKEN);
    let (status, body) = req(
        &env,
        "POST",
        "/v1/calls",
        Some(("Authorization", service.as_str())),
        r#"{"toUserId":"10","callId":"c-v1","fromDisplayName":"Ops"}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert!(body.get("success").is_none());
    let results = env.results_for("c-v1", 1).await;
    assert_eq!(results[0].status, Status::Delivered);
    assert_eq!(results[0].event_id, body["eventId"].as_str().unwrap());
    env.cleanup().await;
}

#[tokio::test]
async fn broker_unavailable_is_503() {
    let env = TestEnv::without_worker(all_groups).await;
    let mut cfg = env.cfg.clone();
    // Nothing listens on port 1: every publish fails at once.
    cfg.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    let worker = voip_push_worker::start(cfg, CancellationToken::new())
        .await
        .unwrap();
    let service = bearer(SERVICE_TOKEN);
    let (status, body) = http_request_with_headers(
        worker.http_addr,
        "POST",
        "/v1/calls",
        &[("Authorization", &service)],
        r#"{"toUserId":10,"callId":"down-1"}"#,
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "unavailable");
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn groups_without_secrets_answer_404() {
    let env = TestEnv::new().await;
    let jwt = bearer(&user_jwt("10", 600, USER_JWT_SECRET));
    let auth = Some(("Authorization", jwt.as_str()));
    for (method, path) in [
        ("POST", "/v1/calls"),
        ("POST", "/api/internal/push/call"),
        ("PUT", "/v1/devices"),
        ("DELETE", "/v1/devices/abcd"),
        ("PUT", "/api/v1/me/devices"),
        ("POST", "/users/10/voip-token"),
        ("POST", "/twilio/token"),
    ] {
        let got = req(&env, method, path, auth, "{}").await;
        assert_error(&got, 404, "not_found");
    }
    // The rest of the listener is unaffected.
    assert_eq!(env.http_get("/healthz").await.0, 200);
    env.cleanup().await;
}
