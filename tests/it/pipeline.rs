//! The core pipeline end to end: RabbitMQ → Postgres → APNs simulator over
//! TLS/HTTP/2 → results on RabbitMQ.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use voip_push_worker::event::{now_ms, token_suffix, Environment, Status};

use crate::common::{eventually, metric, TestEnv, BUNDLE};

#[tokio::test]
async fn seeds_event_rings_each_live_device_exactly_once() {
    let mut env = TestEnv::new().await;
    let prod = env
        .device("10", Some(Environment::Production), Environment::Production)
        .await;
    let sandbox = env
        .device("10", Some(Environment::Sandbox), Environment::Sandbox)
        .await;
    let dead = env
        .device("10", Some(Environment::Production), Environment::Production)
        .await;
    let ids = env.store.live_devices("10", BUNDLE).await.unwrap();
    let dead_id = ids.iter().find(|d| d.token == dead).unwrap().id;
    assert!(env
        .store
        .invalidate(dead_id, "Unregistered", None)
        .await
        .unwrap());
    let _other_user = env
        .device("11", Some(Environment::Production), Environment::Production)
        .await;

    let before = now_ms();
    env.publish(
        json!({"type":"call.incoming","callId":"11-10","fromUserId":11,"fromDisplayName":"User 11",
        "room":"p2p:11-10","hasVideo":true,"toUserId":10}),
    )
    .await;
    let results = env.results_for("11-10", 2).await;

    // One result per live device, both delivered, each in its own environment.
    let mut by_token: Vec<(String, Option<Environment>, Status)> = results
        .iter()
        .map(|r| (r.token_suffix.clone().unwrap(), r.environment, r.status))
        .collect();
    by_token.sort_by_key(|t| t.0.clone());
    let mut want = vec![
        (
            token_suffix(&prod),
            Some(Environment::Production),
            Status::Delivered,
        ),
        (
            token_suffix(&sandbox),
            Some(Environment::Sandbox),
            Status::Delivered,
        ),
    ];
    want.sort_by_key(|t| t.0.clone());
    assert_eq!(by_token, want);
    for r in &results {
        assert_eq!(r.event_type, "call.incoming");
        assert_eq!(r.to_user_id.as_deref(), Some("10"));
        assert_eq!(r.bundle_id.as_deref(), Some(BUNDLE));
        assert_eq!(r.apns_status, Some(200));
        assert_eq!(r.attempts, 1);
        assert!(!r.fallback_used);
        let whole = serde_json::to_string(r).unwrap();
        assert!(
            !whole.contains(&prod) && !whole.contains(&sandbox),
            "a whole token leaked into a result"
        );
    }

    // Exactly one request per live device, with the VoIP headers and payload.
    let requests = env.sim.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    let tokens: HashSet<_> = requests.iter().map(|r| r.token.clone()).collect();
    assert_eq!(tokens, HashSet::from([prod.clone(), sandbox.clone()]));
    for req in &requests {
        assert_eq!(req.status, 200);
        assert_eq!(req.headers["apns-push-type"], "voip");
        assert_eq!(req.headers["apns-topic"], format!("{BUNDLE}.voip"));
        assert_eq!(req.headers["apns-priority"], "10");
        assert_eq!(req.headers["apns-collapse-id"], "11-10");
        let result = results
            .iter()
            .find(|r| r.token_suffix.as_deref() == Some(&token_suffix(&req.token)))
            .unwrap();
        assert_eq!(Some(&req.headers["apns-id"]), result.apns_id.as_ref());
        let p = &req.payload;
        assert_eq!(p["type"], "call.incoming");
        assert_eq!(p["callId"], "11-10");
        assert_eq!(p["fromUserId"], 11);
        assert_eq!(p["fromDisplayName"], "User 11");
        assert_eq!(p["room"], "p2p:11-10");
        assert_eq!(p["hasVideo"], true);
        let sent_at = p["sentAt"].as_i64().unwrap();
        assert!(
            sent_at >= before - 1000 && sent_at <= now_ms(),
            "sentAt {sent_at}"
        );
        assert_eq!(p["expiresAt"].as_i64().unwrap(), sent_at + 45_000);
        let expiration: i64 = req.headers["apns-expiration"].parse().unwrap();
        assert_eq!(
            expiration,
            (sent_at + 45_000 + 999) / 1000,
            "apns-expiration is the ring deadline"
        );
    }

    // Success is recorded on the devices.
    let live = env.store.live_devices("10", BUNDLE).await.unwrap();
    assert_eq!(live.len(), 2);

    // Metrics moved.
    let text = env
        .wait_metric("voip_push_events_total{outcome=\"delivered\"}", 1.0)
        .await;
    assert_eq!(
        metric(
            &text,
            "voip_push_deliveries_total{environment=\"production\",status=\"delivered\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "voip_push_deliveries_total{environment=\"sandbox\",status=\"delivered\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "voip_push_apns_requests_total{code=\"200\",environment=\"production\",reason=\"none\"}"),
        1.0
    );
    assert_eq!(metric(&text, "voip_push_end_to_end_seconds_count"), 2.0);
    assert_eq!(metric(&text, "voip_push_provider_tokens_signed_total"), 1.0);
    assert!(text.contains("voip_push_in_flight"));
    assert!(!text.contains(&prod[..16]), "a token leaked into metrics");
    env.cleanup().await;
}

#[tokio::test]
async fn snake_case_and_string_typed_variants_each_push_once() {
    let mut env = TestEnv::new().await;
    let token = env
        .device("10", Some(Environment::Production), Environment::Production)
        .await;
    let variants = [
        json!({"type":"call.incoming","call_id":"v-snake","from_user_id":11,"from_display_name":"User 11",
            "room":"p2p:11-10","has_video":true,"to_user_id":10}),
        json!({"type":"call.incoming","callId":"v-strings","fromUserId":"11","fromDisplayName":"User 11",
            "room":"p2p:11-10","hasVideo":"true","toUserId":"10"}),
        json!({"callId":"v-numeric-bool","fromUserId":11,"hasVideo":1,"toUserId":10}),
        json!({"call_id":"v-calltype","to_user_id":"10","callType":"video"}),
        json!({"callId":"v-false","toUserId":10,"hasVideo":"false"}),
    ];
    for v in &variants {
        env.publish(v.clone()).await;
    }
    for (v, call_id, video) in [
        (&variants[0], "v-snake", true),
        (&variants[1], "v-strings", true),
        (&variants[2], "v-numeric-bool", true),
        (&variants[3], "v-calltype", true),
        (&variants[4], "v-false", false),
    ] {
        let results = env.results_for(call_id, 1).await;
        assert_eq!(results[0].status, Status::Delivered, "{v}");
        assert_eq!(results[0].to_user_id.as_deref(), Some("10"));
        let pushes: Vec<_> = env
            .sim
            .requests()
            .into_iter()
            .filter(|r| r.headers["apns-collapse-id"] == call_id)
            .collect();
        assert_eq!(pushes.len(), 1, "{call_id}: {pushes:#?}");
        assert_eq!(pushes[0].token, token);
        assert_eq!(pushes[0].payload["hasVideo"], video, "{call_id}");
        assert_eq!(pushes[0].payload["type"], "call.incoming");
    }
    assert_eq!(env.sim.requests().len(), variants.len());
    env.cleanup().await;
}

#[tokio::test]
async fn user_without_device_gets_no_device() {
    let mut env = TestEnv::new().await;
    env.publish(json!({"callId":"nobody-1","toUserId":"4242"}))
        .await;
    let results = env.results_for("nobody-1", 1).await;
    assert_eq!(results[0].status, Status::NoDevice);
    assert_eq!(results[0].device_id, None);
    assert_eq!(results[0].attempts, 0);
    assert!(env.sim.requests().is_empty());
    env.wait_metric("voip_push_events_total{outcome=\"no_device\"}", 1.0)
        .await;
    env.cleanup().await;
}

#[tokio::test]
async fn malformed_events_are_dead_lettered_and_good_events_still_flow() {
    let mut env = TestEnv::new().await;
    let token = env.device("10", None, Environment::Production).await;
    env.publish_raw(&[0xff, 0x00, 0x13, 0x37]).await;
    env.publish_raw(b"{\"callId\": ").await;
    env.publish(json!({"callId":"bad-1","fromUserId":11})).await;
    env.publish(json!({"callId":"bad-2","toUserId":10,"type":"call.bogus"}))
        .await;
    env.publish(json!({"callId":"good-1","toUserId":10})).await;

    let bad1 = env.results_for("bad-1", 1).await;
    assert_eq!(bad1[0].status, Status::InvalidEvent);
    assert!(
        bad1[0].reason.as_deref().unwrap().contains("toUserId"),
        "{:?}",
        bad1[0].reason
    );
    let bad2 = env.results_for("bad-2", 1).await;
    assert_eq!(bad2[0].status, Status::InvalidEvent);
    let good = env.results_for("good-1", 1).await;
    assert_eq!(good[0].status, Status::Delivered);
    assert_eq!(good[0].environment, Some(Environment::Production));

    let dead = eventually("four dead letters", Duration::from_secs(10), || {
        let env = &env;
        async move {
            let d = env.dead_letters().await;
            (d.len() == 4).then_some(d)
        }
    })
    .await;
    let reasons: HashSet<_> = dead
        .iter()
        .map(|(_, r)| r.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        reasons,
        HashSet::from([
            "not_utf8".into(),
            "not_json".into(),
            "missing_field".into(),
            "unknown_type".into()
        ])
    );
    assert!(
        dead.iter()
            .any(|(body, _)| body == &[0xff, 0x00, 0x13, 0x37]),
        "the original bytes are kept"
    );
    assert_eq!(env.sim.requests().len(), 1);
    assert_eq!(env.sim.requests()[0].token, token);

    env.wait_metric("voip_push_events_total{outcome=\"invalid\"}", 4.0)
        .await;
    env.wait_metric("voip_push_events_total{outcome=\"delivered\"}", 1.0)
        .await;
    env.cleanup().await;
}

#[tokio::test]
async fn event_past_its_ring_deadline_is_not_pushed() {
    let mut env = TestEnv::new().await;
    env.device("10", Some(Environment::Production), Environment::Production)
        .await;
    let two_minutes_ago = now_ms() - 120_000;
    env.publish(json!({"callId":"late-1","toUserId":10,"sentAt":two_minutes_ago}))
        .await;
    // A per-event ring time overrides the configured one.
    env.publish(
        json!({"callId":"late-2","toUserId":10,"sentAt":now_ms() - 10_000,"ringTimeoutSecs":5}),
    )
    .await;
    env.publish(
        json!({"callId":"on-time","toUserId":10,"sentAt":now_ms() - 10_000,"ringTimeoutSecs":60}),
    )
    .await;
    assert_eq!(
        env.results_for("late-1", 1).await[0].status,
        Status::Expired
    );
    assert_eq!(
        env.results_for("late-2", 1).await[0].status,
        Status::Expired
    );
    assert_eq!(
        env.results_for("on-time", 1).await[0].status,
        Status::Delivered
    );
    let requests = env.sim.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].headers["apns-collapse-id"], "on-time");
    env.cleanup().await;
}

#[tokio::test]
async fn health_and_readiness_endpoints_answer() {
    let env = TestEnv::new().await;
    assert_eq!(env.http_get("/healthz").await.0, 200);
    let (status, body) = env.http_get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(env.http_get("/nope").await.0, 404);
    env.cleanup().await;
}

/// A copy of an event that arrives after the ring deadline, when the first copy
/// rang and published, pushes nothing and publishes no second result.
#[tokio::test]
async fn a_late_duplicate_of_a_rung_event_publishes_nothing() {
    let mut env = TestEnv::new().await;
    env.device(
        "late-1",
        Some(Environment::Production),
        Environment::Production,
    )
    .await;
    // Rung in time, with two seconds of its 45 s ring left.
    let sent_at = now_ms() - 43_000;
    let body = json!({"type": "call.incoming", "callId": "late-call", "fromUserId": 1,
        "toUserId": "late-1", "sentAt": sent_at})
    .to_string();
    let props = || lapin::BasicProperties::default().with_message_id("late-msg".into());
    env.publish_with(body.as_bytes(), props()).await;
    let first = env.results_for("late-call", 1).await;
    assert_eq!(first[0].status, Status::Delivered);

    eventually(
        "the ring deadline to pass",
        Duration::from_secs(5),
        || async { (now_ms() > sent_at + 45_000).then_some(()) },
    )
    .await;
    env.publish_with(body.as_bytes(), props()).await;
    // Counted once its results (none) are confirmed and it is settled.
    eventually(
        "the late copy to be handled",
        Duration::from_secs(10),
        || async {
            let (_, text) = env.http_get("/metrics").await;
            let events: f64 = text
                .lines()
                .filter(|l| l.starts_with("voip_push_events_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            (events >= 2.0).then_some(())
        },
    )
    .await;
    let second = env.watch.next(Duration::from_millis(500)).await;
    assert!(second.is_none(), "a second result: {second:?}");
    assert_eq!(env.sim.requests().len(), 1, "pushed once");
    env.cleanup().await;
}
