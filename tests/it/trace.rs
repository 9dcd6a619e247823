//! `trace`: a call's every attempt and its state, from the command line,
//! after a real ring through RabbitMQ, Postgres and the APNs simulator.

use serde_json::json;
use voip_push_worker::event::{Environment, Status};

use crate::common::{binary_for, TestEnv};

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
