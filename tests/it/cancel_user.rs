//! A cancel names its call's callee: one for another user (a producer's bug, a
//! reused call id) cancels nothing, on the queue and over HTTP.

use std::time::Duration;

use serde_json::json;
use voip_push_worker::event::{Environment, Status};
use voip_push_worker::store::calls::CallState;

use crate::common::{eventually, http_request_with_headers, TestEnv};

const SERVICE: &str = "Bearer cancel-user-token";

/// Waits until the call is settled as delivered (just after its result).
async fn settled(env: &TestEnv, call: &str) {
    eventually("the call settled", Duration::from_secs(10), || async move {
        let state = env.store.call_state(call).await.unwrap();
        (state == Some(CallState::Delivered)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_cancel_for_another_user_is_refused_and_silences_nothing() {
    let mut env = TestEnv::new().await;
    env.device(
        "cu-a",
        Some(Environment::Production),
        Environment::Production,
    )
    .await;

    // A delivered call: a cancel naming someone else leaves it as it is and
    // sends no cancel push.
    env.publish(json!({"callId": "cu-1", "toUserId": "cu-a"}))
        .await;
    assert_eq!(
        env.results_for("cu-1", 1).await[0].status,
        Status::Delivered
    );
    settled(&env, "cu-1").await;
    env.publish_cancel(
        json!({"type": "call.cancel", "callId": "cu-1", "toUserId": "cu-b", "reason": "caller_hangup"}),
    )
    .await;
    let refused = env.results_for("cu-1", 1).await.remove(0);
    assert_eq!(refused.status, Status::InvalidEvent, "{refused:?}");
    assert!(refused.reason.as_deref().unwrap_or("").contains("toUserId"));
    let dead = eventually(
        "the refused cancel dead-lettered",
        Duration::from_secs(10),
        || {
            let env = &env;
            async move {
                let d = env.dead_letters().await;
                (!d.is_empty()).then_some(d)
            }
        },
    )
    .await;
    assert_eq!(dead[0].1.as_deref(), Some("bad_field"));
    let trace = env.store.trace_call("cu-1").await.unwrap().unwrap();
    assert_eq!(trace.state, CallState::Delivered);
    assert_eq!(trace.cancelled_at, None);

    // A cancel for someone else that comes before the ring does not stop it.
    env.publish_cancel(
        json!({"type": "call.cancel", "callId": "cu-2", "toUserId": "cu-b", "reason": "caller_hangup"}),
    )
    .await;
    eventually("the early cancel recorded", Duration::from_secs(10), || {
        let env = &env;
        async move { env.store.callee("cu-2").await.unwrap() }
    })
    .await;
    env.publish(json!({"callId": "cu-2", "toUserId": "cu-a"}))
        .await;
    assert_eq!(
        env.results_for("cu-2", 1).await[0].status,
        Status::Delivered
    );
    let rang = env
        .sim
        .requests()
        .iter()
        .filter(|r| r.headers.get("apns-collapse-id").map(String::as_str) == Some("cu-2"))
        .count();
    assert_eq!(rang, 1, "the ring went out");
    env.cleanup().await;
}

#[tokio::test]
async fn the_cancel_endpoint_refuses_another_users_call() {
    let mut env = TestEnv::with(|c| c.http.service_token = Some("cancel-user-token".into())).await;
    env.device(
        "cu-h",
        Some(Environment::Production),
        Environment::Production,
    )
    .await;
    env.publish(json!({"callId": "cu-h1", "toUserId": "cu-h"}))
        .await;
    assert_eq!(
        env.results_for("cu-h1", 1).await[0].status,
        Status::Delivered
    );
    settled(&env, "cu-h1").await;
    let cancel = |user: &'static str| {
        let addr = env.worker().http_addr;
        async move {
            http_request_with_headers(
                addr,
                "POST",
                "/v1/calls/cu-h1/cancel",
                &[("Authorization", SERVICE)],
                &json!({"toUserId": user}).to_string(),
            )
            .await
        }
    };
    let (status, body) = cancel("someone-else").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("wrong_user"), "{body}");
    assert_eq!(
        env.store.call_state("cu-h1").await.unwrap(),
        Some(CallState::Delivered)
    );
    let (status, body) = cancel("cu-h").await;
    assert_eq!(status, 202, "{body}");
    eventually("the cancel recorded", Duration::from_secs(10), || {
        let env = &env;
        async move {
            let state = env.store.call_state("cu-h1").await.unwrap();
            (state == Some(CallState::Cancelled)).then_some(())
        }
    })
    .await;
    env.cleanup().await;
}
