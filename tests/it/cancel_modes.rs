//! What a cancel sends the devices its call rang, by `worker.cancel_push`:
//! `voip` (a `call.cancel` VoIP push: `lifecycle::cancel_after_delivery_…`),
//! `alert` (a "Missed call" alert push to the app's alert token) or `off`.

use bytes::Bytes;
use serde_json::json;
use voip_push_worker::apns_sim::TokenKind;
use voip_push_worker::config::CancelPush;
use voip_push_worker::event::{Environment, Status};

use crate::common::{
    eventually, http_request_with_headers, metric, random_token, scripted, TestEnv, BUNDLE,
};

const SERVICE_TOKEN: &str = "cancel-modes-service-token";

fn mode(m: CancelPush) -> impl FnOnce(&mut voip_push_worker::config::Config) {
    move |c| {
        c.worker.cancel_push = m;
        c.http.service_token = Some(SERVICE_TOKEN.into());
    }
}

/// Registers a device over `PUT /v1/devices` with its VoIP token and, when
/// `alert`, its alert token (both valid at the simulator in production).
/// Returns (VoIP token, alert token).
async fn device(env: &TestEnv, user: &str, alert: bool) -> (String, Option<String>) {
    let voip = random_token();
    env.sim
        .register_token(Environment::Production, &voip, BUNDLE);
    let alert = alert.then(random_token);
    let mut body = json!({"userId": user, "token": voip, "bundleId": BUNDLE,
        "environment": "production"});
    if let Some(a) = &alert {
        env.sim
            .register_token_of_kind(Environment::Production, a, BUNDLE, TokenKind::Alert);
        body["alertToken"] = json!(a.to_uppercase());
    }
    let auth = format!("Bearer {SERVICE_TOKEN}");
    let (status, text) = http_request_with_headers(
        env.worker().http_addr,
        "PUT",
        "/v1/devices",
        &[("Authorization", &auth)],
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    (voip, alert)
}

/// Waits until a cancel skipped `reason` (each cancel also reaches the work
/// queue, where its copy is handled idempotently: it may count twice).
async fn skipped(env: &TestEnv, reason: &str) {
    let name = format!(r#"voip_push_cancel_pushes_skipped_total{{reason="{reason}"}}"#);
    eventually(&name.clone(), std::time::Duration::from_secs(20), || {
        let addr = env.worker().http_addr;
        let name = name.clone();
        async move {
            let text = crate::common::http_get(addr, "/metrics").await.1;
            (metric(&text, &name) >= 1.0).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn alert_mode_sends_a_missed_call_alert_to_rung_devices_with_an_alert_token() {
    let mut env = TestEnv::with(mode(CancelPush::Alert)).await;
    let (_, a) = device(&env, "am", true).await;
    let (_, b) = device(&env, "am", true).await;
    // Rung, but the app never registered an alert token: nothing to send.
    device(&env, "am", false).await;
    // Never rung (APNs refuses its VoIP token), though it has an alert token.
    let (dead, _) = device(&env, "am", true).await;
    env.sim
        .script(&dead, [scripted(400, "DeviceTokenNotForTopic")]);
    let (a, b) = (a.unwrap(), b.unwrap());

    env.publish(json!({"callId": "am-1", "toUserId": "am"}))
        .await;
    let rings = env.results_for("am-1", 4).await;
    assert_eq!(
        rings
            .iter()
            .filter(|r| r.status == Status::Delivered)
            .count(),
        3,
        "{rings:#?}"
    );
    env.publish_cancel(
        json!({"type":"call.cancel","callId":"am-1","toUserId":"am","reason":"caller_hangup",
            "fromDisplayName":"Alice"}),
    )
    .await;
    let cancels = env.results_for("am-1", 2).await;
    for r in &cancels {
        assert_eq!(r.event_type, "call.cancel");
        assert_eq!(r.status, Status::Delivered, "{r:?}");
    }

    let requests = env.sim.requests();
    let alerts: Vec<_> = requests
        .iter()
        .filter(|r| r.headers["apns-collapse-id"] == "am-1" && r.payload["type"] != "call.incoming")
        .collect();
    let mut tokens: Vec<_> = alerts.iter().map(|r| r.token.clone()).collect();
    tokens.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(
        tokens, want,
        "one alert per rung device with an alert token"
    );
    for p in &alerts {
        assert_eq!(p.status, 200, "{p:?}");
        assert_eq!(p.headers["apns-push-type"], "alert");
        assert_eq!(
            p.headers["apns-topic"], BUNDLE,
            "the app's own topic, no .voip"
        );
        assert_eq!(p.headers["apns-priority"], "10");
        assert_eq!(p.payload["type"], "call.missed");
        assert_eq!(p.payload["callId"], "am-1");
        assert_eq!(p.payload["aps"]["alert"]["body"], "Missed call from Alice");
    }
    assert!(
        requests.iter().all(|r| r.payload["type"] != "call.cancel"),
        "no VoIP cancel push"
    );
    skipped(&env, "no_alert_token").await;

    // Answered on one device: nobody missed the call, so no alert at all.
    env.publish(json!({"callId": "am-2", "toUserId": "am"}))
        .await;
    let rings = env.results_for("am-2", 3).await;
    let answered = rings[0].device_id.unwrap();
    env.publish_cancel(json!({"type":"call.cancel","callId":"am-2","toUserId":"am",
        "reason":"answered_elsewhere","answeredDeviceId": answered.to_string()}))
        .await;
    skipped(&env, "answered").await;
    assert!(env
        .sim
        .requests()
        .iter()
        .all(|r| r.headers["apns-collapse-id"] != "am-2" || r.payload["type"] == "call.incoming"));
    env.cleanup().await;
}

#[tokio::test]
async fn off_mode_sends_no_cancel_push_and_still_publishes_the_stopped_ring() {
    let mut env = TestEnv::with(mode(CancelPush::Off)).await;
    device(&env, "off", true).await;
    // The second device's ring is still retrying when the cancel comes.
    let (busy, _) = device(&env, "off", true).await;
    env.sim.script(
        &busy,
        std::iter::repeat_n(scripted(503, "ServiceUnavailable"), 500),
    );
    env.publish(json!({"callId": "off-1", "toUserId": "off", "ringTimeoutSecs": 30}))
        .await;
    let first = env.results_for("off-1", 1).await;
    assert_eq!(first[0].status, Status::Delivered, "{first:?}");

    env.publish_cancel(
        json!({"type":"call.cancel","callId":"off-1","toUserId":"off","reason":"caller_hangup"}),
    )
    .await;
    let stopped = env.results_for("off-1", 1).await;
    assert_eq!(stopped[0].status, Status::Cancelled, "{stopped:?}");
    skipped(&env, "off").await;
    let trace = env.store.trace_call("off-1").await.unwrap().unwrap();
    assert_eq!(trace.state.as_str(), "cancelled");
    assert!(
        env.sim
            .requests()
            .iter()
            .all(|r| r.payload["type"] == "call.incoming"),
        "no cancel push of any kind"
    );
    env.cleanup().await;
}

/// A device's PushKit token takes VoIP pushes only and its alert token the rest;
/// an alert push goes to the app's own topic and may carry 4096 bytes.
#[tokio::test]
async fn simulator_tells_alert_tokens_from_voip_tokens() {
    use voip_push_worker::apns::PushType;
    use voip_push_worker::apns_sim::TokenKind;
    let rig = crate::apns::rig().await;
    let (voip, alert) = (random_token(), random_token());
    rig.sim
        .register_token(Environment::Production, &voip, BUNDLE);
    rig.sim
        .register_token_of_kind(Environment::Production, &alert, BUNDLE, TokenKind::Alert);
    let mut to_alert = crate::apns::request(&alert, &rig.jwt);
    to_alert.push_type = PushType::Alert;
    to_alert.topic = BUNDLE.into();
    assert_eq!(
        crate::apns::answer(&rig, Environment::Production, &to_alert).await,
        (200, None)
    );
    let not_for_topic = (400, Some("DeviceTokenNotForTopic".into()));
    let voip_to_alert = crate::apns::request(&alert, &rig.jwt);
    assert_eq!(
        crate::apns::answer(&rig, Environment::Production, &voip_to_alert).await,
        not_for_topic
    );
    let mut alert_to_voip = to_alert.clone();
    alert_to_voip.token = voip.clone();
    assert_eq!(
        crate::apns::answer(&rig, Environment::Production, &alert_to_voip).await,
        not_for_topic
    );
    let mut big = to_alert.clone();
    big.payload = Bytes::from(format!(r#"{{"aps":{{}},"x":"{}"}}"#, "a".repeat(4096)));
    assert_eq!(
        crate::apns::answer(&rig, Environment::Production, &big).await,
        (413, Some("PayloadTooLarge".into()))
    );
}
