//! APNs delivery rules end to end: token lifecycle, provider tokens, connections,
//! several apps.

use serde_json::json;
use std::collections::HashSet;
use voip_push_worker::apns_sim::Scripted;
use voip_push_worker::event::{now_ms, Environment, Status};

use crate::common::{metric, random_token, scripted, TestEnv, BUNDLE, BUNDLE2};

#[tokio::test]
async fn gone_410_invalidates_only_tokens_registered_before_apples_timestamp() {
    let mut env = TestEnv::new().await;
    let stale = env
        .device("70", Some(Environment::Production), Environment::Production)
        .await;
    let fresh = env
        .device("71", Some(Environment::Production), Environment::Production)
        .await;
    // Apple learned `stale` was gone after it was registered; `fresh` was
    // registered again after Apple's timestamp (a reinstall), so it stays live.
    env.sim.script(
        &stale,
        [Scripted {
            timestamp_ms: Some(now_ms() + 60_000),
            ..scripted(410, "Unregistered")
        }],
    );
    env.sim.script(
        &fresh,
        [Scripted {
            timestamp_ms: Some(now_ms() - 3_600_000),
            ..scripted(410, "ExpiredToken")
        }],
    );
    env.publish(json!({"callId":"gone-1","toUserId":70})).await;
    env.publish(json!({"callId":"gone-2","toUserId":71})).await;
    let r1 = &env.results_for("gone-1", 1).await[0];
    assert_eq!(
        (r1.status, r1.apns_status, r1.attempts),
        (Status::TokenInvalidated, Some(410), 1)
    );
    let r2 = &env.results_for("gone-2", 1).await[0];
    assert_eq!(
        (r2.status, r2.reason.as_deref()),
        (Status::Failed, Some("ExpiredToken"))
    );
    assert!(env
        .store
        .live_devices("70", BUNDLE)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(env.store.live_devices("71", BUNDLE).await.unwrap().len(), 1);

    // Invalidated: never pushed again; re-registration brings it back.
    env.publish(json!({"callId":"gone-3","toUserId":70})).await;
    assert_eq!(
        env.results_for("gone-3", 1).await[0].status,
        Status::NoDevice
    );
    env.store
        .register_device("70", BUNDLE, &stale, None)
        .await
        .unwrap();
    env.publish(json!({"callId":"gone-4","toUserId":70})).await;
    assert_eq!(
        env.results_for("gone-4", 1).await[0].status,
        Status::Delivered
    );
    let stale_requests = env
        .sim
        .requests()
        .iter()
        .filter(|r| r.token == stale)
        .count();
    assert_eq!(stale_requests, 2, "gone-1 and gone-4 only");
    let (_, text) = env.http_get("/metrics").await;
    assert_eq!(
        metric(
            &text,
            "voip_push_tokens_invalidated_total{reason=\"Unregistered\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "voip_push_tokens_invalidated_total{reason=\"ExpiredToken\"}"
        ),
        0.0
    );
    env.cleanup().await;
}

#[tokio::test]
async fn device_token_not_for_topic_is_invalidated_and_success_is_recorded() {
    let mut env = TestEnv::new().await;
    // Applied at once once a success proved the app's configuration.
    env.prove_app(&[Environment::Production]).await;
    let alert_token = random_token();
    // An alert token of the app, sent as if it were the VoIP token.
    env.sim
        .register_token(Environment::Production, &alert_token, "com.example.other");
    env.store
        .register_device("80", BUNDLE, &alert_token, Some(Environment::Production))
        .await
        .unwrap();
    let good = env
        .device("80", Some(Environment::Production), Environment::Production)
        .await;
    env.publish(json!({"callId":"topic-1","toUserId":80})).await;
    let results = env.results_for("topic-1", 2).await;
    let statuses: HashSet<_> = results
        .iter()
        .map(|r| (r.token_suffix.clone().unwrap(), r.status))
        .collect();
    assert!(statuses.contains(&(alert_token[56..].to_string(), Status::TokenInvalidated)));
    assert!(statuses.contains(&(good[56..].to_string(), Status::Delivered)));

    // The success is written with the outcome, recorded after the result.
    env.recorded_trace("topic-1").await;
    let client = env.db.client().await;
    let rows = client
        .query(
            "SELECT voip_token, last_success_at IS NOT NULL, invalid_reason FROM devices WHERE user_id = '80'",
            &[],
        )
        .await
        .unwrap();
    for row in rows {
        let token: String = row.get(0);
        let succeeded: bool = row.get(1);
        let reason: Option<String> = row.get(2);
        if token == good {
            assert!(succeeded && reason.is_none());
        } else {
            assert!(!succeeded);
            assert_eq!(reason.as_deref(), Some("DeviceTokenNotForTopic"));
        }
    }
    drop(client);
    env.cleanup().await;
}

#[tokio::test]
async fn expired_provider_token_is_refreshed_once_on_a_fresh_connection() {
    let mut env = TestEnv::new().await;
    let token = env
        .device("90", Some(Environment::Production), Environment::Production)
        .await;
    env.sim
        .script(&token, [scripted(403, "ExpiredProviderToken")]);
    env.publish(json!({"callId":"exp-1","toUserId":90})).await;
    let r = &env.results_for("exp-1", 1).await[0];
    assert_eq!((r.status, r.attempts), (Status::Delivered, 2));
    let requests = env.sim.requests();
    assert_eq!(requests.len(), 2);
    assert_ne!(
        requests[0].provider_token_id, requests[1].provider_token_id,
        "a new token after the refusal"
    );
    let (_, text) = env.http_get("/metrics").await;
    assert_eq!(metric(&text, "voip_push_provider_tokens_signed_total"), 2.0);

    // A second refusal in the same delivery is not refreshed again: it fails.
    env.sim.script(
        &token,
        [
            scripted(403, "ExpiredProviderToken"),
            scripted(403, "ExpiredProviderToken"),
        ],
    );
    env.publish(json!({"callId":"exp-2","toUserId":90})).await;
    let r = &env.results_for("exp-2", 1).await[0];
    assert_eq!((r.status, r.attempts), (Status::Failed, 2));
    let (_, text) = env.http_get("/metrics").await;
    assert_eq!(metric(&text, "voip_push_provider_tokens_signed_total"), 3.0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_thousand_pushes_use_one_provider_token_per_key() {
    let mut env = TestEnv::new().await;
    let users: Vec<String> = (0..200).map(|i| format!("bulk-{i}")).collect();
    for user in &users {
        for _ in 0..5 {
            env.device(user, Some(Environment::Production), Environment::Production)
                .await;
        }
    }
    for (i, user) in users.iter().enumerate() {
        env.publish(json!({"callId": format!("bulk-call-{i}"), "toUserId": user}))
            .await;
    }
    for i in 0..users.len() {
        let results = env.results_for(&format!("bulk-call-{i}"), 5).await;
        assert!(results.iter().all(|r| r.status == Status::Delivered));
    }
    let requests = env.sim.requests();
    assert_eq!(requests.len(), 1000);
    let tokens: HashSet<_> = requests
        .iter()
        .map(|r| r.provider_token_id.clone())
        .collect();
    assert_eq!(tokens.len(), 1, "one provider token for 1,000 pushes");
    let (_, text) = env.http_get("/metrics").await;
    assert_eq!(metric(&text, "voip_push_provider_tokens_signed_total"), 1.0);
    assert!(
        metric(
            &text,
            "voip_push_apns_connections_opened_total{environment=\"production\"}"
        ) <= 2.0
    );
    env.cleanup().await;
}

#[tokio::test]
async fn each_app_pushes_with_its_own_topic_key_and_connections() {
    let mut env = TestEnv::new().await;
    let chat = env
        .device(
            "100",
            Some(Environment::Production),
            Environment::Production,
        )
        .await;
    let work = random_token();
    env.sim
        .register_token(Environment::Production, &work, BUNDLE2);
    env.store
        .register_device("100", BUNDLE2, &work, Some(Environment::Production))
        .await
        .unwrap();

    env.publish(json!({"callId":"app-1","toUserId":100})).await;
    env.publish(json!({"callId":"app-2","toUserId":100,"bundleId":BUNDLE2}))
        .await;
    env.publish(json!({"callId":"app-3","toUserId":100,"bundleId":"com.example.unknown"}))
        .await;
    let r1 = &env.results_for("app-1", 1).await[0];
    assert_eq!(
        (r1.status, r1.bundle_id.as_deref()),
        (Status::Delivered, Some(BUNDLE))
    );
    let r2 = &env.results_for("app-2", 1).await[0];
    assert_eq!(
        (r2.status, r2.bundle_id.as_deref()),
        (Status::Delivered, Some(BUNDLE2))
    );
    let r3 = &env.results_for("app-3", 1).await[0];
    assert_eq!(r3.status, Status::InvalidEvent);
    assert!(r3
        .reason
        .as_deref()
        .unwrap()
        .contains("com.example.unknown"));

    let requests = env.sim.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    let chat_req = requests.iter().find(|r| r.token == chat).unwrap();
    let work_req = requests.iter().find(|r| r.token == work).unwrap();
    assert_eq!(chat_req.headers["apns-topic"], format!("{BUNDLE}.voip"));
    assert_eq!(work_req.headers["apns-topic"], format!("{BUNDLE2}.voip"));
    assert_ne!(chat_req.provider_token_id, work_req.provider_token_id);
    let (_, text) = env.http_get("/metrics").await;
    assert_eq!(metric(&text, "voip_push_provider_tokens_signed_total"), 2.0);
    // Two keys, so two connections: APNs binds a connection to one key.
    assert_eq!(
        metric(
            &text,
            "voip_push_apns_connections_opened_total{environment=\"production\"}"
        ),
        2.0
    );
    env.cleanup().await;
}

/// A display name far too long for APNs' 5,120-byte VoIP payload used to turn the
/// call into a silent `failed` (PayloadTooLarge); it is cut, and the phone rings.
#[tokio::test]
async fn a_long_display_name_is_cut_and_the_call_rings() {
    let mut env = TestEnv::new().await;
    env.device(
        "110",
        Some(Environment::Production),
        Environment::Production,
    )
    .await;
    let name = "名前".repeat(600);
    env.publish(
        json!({"callId":"big-1","toUserId":110,"fromDisplayName":name,
        "room":"r".repeat(6000)}),
    )
    .await;
    let r = &env.results_for("big-1", 1).await[0];
    assert_eq!((r.status, r.attempts), (Status::Delivered, 1));
    let requests = env.sim.requests();
    assert_eq!(requests.len(), 1);
    let payload = &requests[0].payload;
    let shown = payload["fromDisplayName"].as_str().expect("a name");
    assert!(!shown.is_empty() && name.starts_with(shown), "{shown}");
    assert!(
        payload.to_string().len() <= 5120,
        "{}",
        payload.to_string().len()
    );
    env.cleanup().await;
}

/// Two copies of one event that split its devices (each holds a claim the other
/// waits for): each device's result goes out as soon as it is known, so neither
/// copy holds the other up until the ring deadline.
#[tokio::test]
async fn a_copy_of_the_event_holding_one_device_does_not_hold_up_the_others_result() {
    use lapin::BasicProperties;
    use voip_push_worker::store::claims::Claim;

    let mut env = TestEnv::new().await;
    let first = env
        .device("sp", Some(Environment::Production), Environment::Production)
        .await;
    let held = env
        .device("sp", Some(Environment::Production), Environment::Production)
        .await;
    let devices = env.store.live_devices("sp", BUNDLE).await.unwrap();
    let held_id = devices.iter().find(|d| d.token == held).unwrap().id;
    // The other copy (another live worker) has claimed `held` and is still at work.
    let other = voip_push_worker::store::liveness::Liveness::start(
        &env.cfg.postgres,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap()
    .worker_id;
    let key = "msg-split/call.incoming/split-1";
    let owner = format!("{other}/1");
    let claim = env
        .store
        .claim(key, held_id, &owner, "split-1", "call.incoming")
        .await
        .unwrap();
    assert_eq!(claim, Claim::Push);

    let body = json!({"callId": "split-1", "toUserId": "sp", "fromUserId": 3}).to_string();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("msg-split".into());
    env.publish_with(body.as_bytes(), props).await;
    let results = env.results_for("split-1", 1).await;
    assert_eq!(results[0].status, Status::Delivered);
    assert_eq!(
        results[0].token_suffix.as_deref(),
        Some(&first[first.len() - 8..])
    );
    // Published while the other copy still holds its device: nothing was taken
    // over, nothing pushed twice.
    let pushed: Vec<String> = env.sim.requests().into_iter().map(|r| r.token).collect();
    assert_eq!(pushed, vec![first.clone()]);

    // The other copy finishes; this one stops waiting and settles the message.
    let theirs = voip_push_worker::store::claims::Outcome {
        device_id: held_id,
        call_id: "split-1".into(),
        event_type: "call.incoming",
        result: json!({"status": "delivered", "deviceId": held_id}).into(),
        attempts: Vec::new(),
        success: None,
    };
    let finished = voip_push_worker::store::claims::Finished {
        event_key: key.into(),
        outcomes: vec![theirs],
        ..Default::default()
    };
    env.store.finish_event(finished).await.unwrap();
    crate::common::wait_idle(&[env.worker()]).await;
    let pushed: Vec<String> = env.sim.requests().into_iter().map(|r| r.token).collect();
    assert_eq!(
        pushed,
        vec![first],
        "the held device is the other copy's to push"
    );
    env.cleanup().await;
}
