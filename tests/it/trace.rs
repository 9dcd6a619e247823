//! `trace`: a call's every attempt and its state, from the command line,
//! after a real ring through RabbitMQ, Postgres and the APNs simulator.

use serde_json::json;
use voip_push_worker::event::{Environment, Status};

use crate::common::{binary_for, TestEnv, BUNDLE};

#[tokio::test]
async fn trace_lists_every_attempt_and_the_call_state() {
    let mut env = TestEnv::new().await;
    // A sandbox token registered as production: one refused, one accepted attempt.
    env.device("u7", Some(Environment::Production), Environment::Sandbox)
        .await;
    env.publish(json!({"callId":"tr-1","toUserId":"u7"})).await;
    assert_eq!(
        env.results_for("tr-1", 1).await[0].status,
        Status::Delivered
    );
    env.publish(json!({"callId":"tr-2","toUserId":"nobody"}))
        .await;
    assert_eq!(env.results_for("tr-2", 1).await[0].status, Status::NoDevice);

    let cfg = env.cfg.clone();
    let (json_out, text_out, missing) = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| binary_for(&cfg).args(args).output().unwrap();
        (
            run(&["trace", "--call", "tr-1", "--json"]),
            run(&["trace", "--call", "tr-1"]),
            run(&["trace", "--call", "never-seen"]),
        )
    })
    .await
    .unwrap();
    assert!(
        json_out.status.success(),
        "{}",
        String::from_utf8_lossy(&json_out.stderr)
    );
    let t: serde_json::Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(t["callId"], "tr-1");
    assert_eq!(t["toUserId"], "u7");
    assert_eq!(t["state"], "delivered");
    assert!(t["createdAt"].as_str().unwrap().ends_with('Z'));
    let d = &t["deliveries"][0];
    assert_eq!(d["status"], "delivered");
    assert_eq!(d["environment"], "sandbox");
    assert_eq!(d["fallbackUsed"], true);
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(
        (
            attempts[0]["environment"].as_str(),
            attempts[0]["apnsStatus"].as_u64()
        ),
        (Some("production"), Some(400))
    );
    assert_eq!(attempts[0]["reason"], "BadDeviceToken");
    assert_eq!(
        (
            attempts[1]["environment"].as_str(),
            attempts[1]["apnsStatus"].as_u64()
        ),
        (Some("sandbox"), Some(200))
    );
    let text = String::from_utf8_lossy(&text_out.stdout);
    assert!(
        text.contains("BadDeviceToken") && text.contains("delivered via sandbox"),
        "{text}"
    );
    assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
    assert_eq!(missing.status.code(), Some(1));

    let nobody = env.store.trace_call("tr-2").await.unwrap().unwrap();
    assert_eq!(nobody.state.as_str(), "failed");
    assert!(nobody.deliveries.is_empty());
    env.cleanup().await;
}

/// A delivery whose outcome is not recorded yet reads as `ringing` of its own
/// kind: a cancel push in flight is no second ring.
#[tokio::test]
async fn a_delivery_in_flight_is_traced_as_its_own_kind() {
    let mut env = TestEnv::new().await;
    env.device("u8", Some(Environment::Production), Environment::Production)
        .await;
    env.publish(json!({"callId":"tr-3","toUserId":"u8"})).await;
    assert_eq!(
        env.results_for("tr-3", 1).await[0].status,
        Status::Delivered
    );
    env.recorded_trace("tr-3").await;
    let device = env.store.live_devices("u8", BUNDLE).await.unwrap()[0].id;
    // A cancel's claim, taken and not finished (its push on its way).
    env.store
        .claim(
            "c-1/call.cancel/tr-3",
            device,
            "w-gone/1",
            "tr-3",
            "call.cancel",
        )
        .await
        .unwrap();
    let trace = env.store.trace_call("tr-3").await.unwrap().unwrap();
    let kinds: Vec<(&str, &str)> = trace
        .deliveries
        .iter()
        .map(|d| (d.event_type.as_str(), d.status.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![("call.incoming", "delivered"), ("call.cancel", "ringing")]
    );
    env.cleanup().await;
}
