//! A call's status over HTTP (long poll) and its cancel endpoint.

use std::time::Duration;

use serde_json::json;
use voip_push_worker::event::{Environment, Status};

use crate::common::{delayed, eventually, TestEnv};
use crate::lifecycle::pushes_of;

const SERVICE: &str = "Bearer lifecycle-service-token";

async fn api(env: &TestEnv, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, text) = crate::common::http_request_with_headers(
        env.worker().http_addr,
        method,
        path,
        &[("Authorization", SERVICE)],
        body,
    )
    .await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn status_endpoint_long_polls_and_cancel_endpoint_stops_the_ring() {
    let mut env =
        TestEnv::with(|c| c.http.service_token = Some("lifecycle-service-token".into())).await;
    let slow = env
        .device("u8", Some(Environment::Production), Environment::Production)
        .await;
    env.sim.script(&slow, [delayed(700)]);

    // Unknown call: 404 (after waiting, when asked to wait).
    let (status, body) = api(&env, "GET", "/v1/calls/nope?waitMs=200", "").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, _) = crate::common::http_get(env.worker().http_addr, "/v1/calls/nope").await;
    assert_eq!(status, 401, "the service token is required");

    // The long poll returns once the call settles, with every attempt.
    env.publish(json!({"callId":"st-1","toUserId":"u8"})).await;
    eventually("the call to be opened", Duration::from_secs(10), || {
        let store = env.store.clone();
        async move { store.call_state("st-1").await.unwrap() }
    })
    .await;
    let started = std::time::Instant::now();
    let (status, t) = api(&env, "GET", "/v1/calls/st-1?waitMs=10000", "").await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["state"], "delivered", "{t}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "returned when settled, not at the wait's end"
    );
    assert_eq!(t["deliveries"][0]["attempts"][0]["apnsStatus"], 200);
    assert_eq!(
        env.results_for("st-1", 1).await[0].status,
        Status::Delivered
    );

    // Cancel over HTTP before the initiate: 202, and the initiate never rings.
    let (status, body) = api(
        &env,
        "POST",
        "/v1/calls/st-2/cancel",
        &json!({"toUserId":"u8","reason":"declined"}).to_string(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert!(body["eventId"].is_string());
    let (status, t) = api(&env, "GET", "/v1/calls/st-2?waitMs=5000", "").await;
    assert_eq!((status, t["state"].as_str()), (200, Some("cancelled")));
    assert_eq!(t["cancelReason"], "declined");
    env.publish(json!({"callId":"st-2","toUserId":"u8"})).await;
    assert_eq!(
        env.results_for("st-2", 1).await[0].status,
        Status::Cancelled
    );
    assert!(pushes_of(&env.sim.requests(), "st-2").is_empty());

    let (status, body) = api(
        &env,
        "POST",
        "/v1/calls/st-3/cancel",
        &json!({"reason":"declined"}).to_string(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("missing_field"))
    );
    let (status, _) = api(
        &env,
        "POST",
        "/v1/calls/st-3/cancel",
        &json!({"toUserId":"u8","reason":"bored"}).to_string(),
    )
    .await;
    assert_eq!(status, 400);
    env.cleanup().await;
}
