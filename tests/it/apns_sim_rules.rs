//! The APNs simulator's rules (APNS.md), met by our client over real TLS +
//! HTTP/2 with real ES256 provider tokens: refusals, answers, the control API,
//! and what APNs does per connection (token updates, key binding, one stream at
//! a time).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use voip_push_worker::apns::token::{generate_p8_pem, unix_now, SigningKey};
use voip_push_worker::apns::PushRequest;
use voip_push_worker::apns_sim::{ApnsSim, Scripted, SimApp, SimOptions};
use voip_push_worker::event::Environment;

use crate::apns::{answer, request, rig, sim_client, Rig};
use crate::common::{delayed, http_get, http_post, random_token, scripted, TestKey, BUNDLE};

#[tokio::test]
async fn simulator_enforces_apples_rules() {
    let rig = rig().await;
    let token = random_token();
    rig.sim.register_token(Environment::Sandbox, &token, BUNDLE);
    let good = request(&token, &rig.jwt);

    assert_eq!(answer(&rig, Environment::Sandbox, &good).await, (200, None));
    // Same token, wrong environment: Apple's most common VoIP failure.
    assert_eq!(
        answer(&rig, Environment::Production, &good).await,
        (400, Some("BadDeviceToken".into()))
    );
    let unknown = request(&random_token(), &rig.jwt);
    assert_eq!(
        answer(&rig, Environment::Sandbox, &unknown).await,
        (400, Some("BadDeviceToken".into()))
    );

    // A VoIP push to the plain bundle id: APNs says the token is not for it.
    let mut r = good.clone();
    r.topic = BUNDLE.into();
    assert_eq!(
        answer(&rig, Environment::Sandbox, &r).await,
        (400, Some("DeviceTokenNotForTopic".into()))
    );
    let mut r = good.clone();
    r.topic = "com.other.app.voip".into();
    assert_eq!(
        answer(&rig, Environment::Sandbox, &r).await,
        (400, Some("TopicDisallowed".into()))
    );
    let mut r = good.clone();
    r.collapse_id = "x".repeat(65);
    assert_eq!(
        answer(&rig, Environment::Sandbox, &r).await,
        (400, Some("BadCollapseId".into()))
    );
    let mut r = good.clone();
    r.priority = 7;
    assert_eq!(
        answer(&rig, Environment::Sandbox, &r).await,
        (400, Some("BadPriority".into()))
    );
    let mut r = good.clone();
    r.payload = Bytes::from(vec![b'x'; 5121]);
    assert_eq!(
        answer(&rig, Environment::Sandbox, &r).await,
        (413, Some("PayloadTooLarge".into()))
    );
    let mut r = good.clone();
    r.payload = Bytes::from(vec![b' '; 5120]);
    assert_eq!(
        answer(&rig, Environment::Sandbox, &r).await.0,
        200,
        "5120 bytes is allowed for VoIP"
    );
    let mut r = good.clone();
    r.payload = Bytes::new();
    assert_eq!(
        answer(&rig, Environment::Sandbox, &r).await,
        (400, Some("PayloadEmpty".into()))
    );

    // Provider tokens: a key the simulator does not know, a forged signature, an old iat.
    let stranger =
        SigningKey::from_p8_pem(generate_p8_pem().as_bytes(), "TEAMAAAAAA", "KEYAAAAAAA").unwrap();
    let mut r = good.clone();
    r.provider_token = Arc::from(stranger.sign(unix_now()));
    // A fresh connection: APNs binds a connection to its first key.
    assert_eq!(
        answer(&rig, Environment::Production, &r).await,
        (403, Some("InvalidProviderToken".into()))
    );
    let other_kid =
        SigningKey::from_p8_pem(generate_p8_pem().as_bytes(), "TEAMAAAAAA", "KEYBBBBBBB").unwrap();
    r.provider_token = Arc::from(other_kid.sign(unix_now()));
    assert_eq!(
        answer(&rig, Environment::Production, &r).await,
        (403, Some("InvalidProviderToken".into()))
    );
    let mut r = good.clone();
    r.provider_token = Arc::from(rig.key.sign(unix_now() - 3601));
    assert_eq!(
        answer(&rig, Environment::Sandbox, &r).await,
        (403, Some("ExpiredProviderToken".into()))
    );

    // Every request was recorded, with the provider token only as a fingerprint.
    let recorded = rig.sim.requests();
    assert_eq!(recorded.len(), 13);
    assert!(recorded
        .iter()
        .all(|r| r.headers["authorization"].starts_with("bearer …")));
    assert!(recorded[0].provider_token_id.is_some());
    assert_eq!(
        recorded[0].apns_id.as_deref(),
        Some(good.apns_id.to_string().as_str())
    );
}

#[tokio::test]
async fn answers_carry_status_reason_apns_id_and_410_timestamp() {
    let rig = rig().await;
    let token = random_token();
    rig.sim
        .register_token(Environment::Production, &token, BUNDLE);
    rig.sim.script(
        &token,
        [Scripted {
            timestamp_ms: Some(1_700_000_000_000),
            ..scripted(410, "Unregistered")
        }],
    );
    let req = request(&token, &rig.jwt);
    let r = rig
        .client
        .send(Environment::Production, &req, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((r.status, r.reason.as_deref()), (410, Some("Unregistered")));
    assert_eq!(r.timestamp_ms, Some(1_700_000_000_000));
    assert_eq!(r.apns_id, Some(req.apns_id.to_string()));
    // The script is used up: the token is valid again.
    let r = rig
        .client
        .send(Environment::Production, &req, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn control_api_registers_lists_and_resets() {
    let key = TestKey::new(BUNDLE, "TEAMAAAAAA", "KEYAAAAAAA");
    let sim = ApnsSim::start(SimOptions {
        control_listen: Some("127.0.0.1:0".into()),
        ..SimOptions::local(SimApp::from_config(std::slice::from_ref(&key.app)).unwrap())
    })
    .await
    .unwrap();
    let control = sim.control_addr.unwrap();
    let token = random_token();
    let body =
        json!([{"token": token.to_uppercase(), "environment": "sandbox", "bundleId": BUNDLE}])
            .to_string();
    let (status, text) = http_post(control, "/tokens", &body).await;
    assert_eq!(status, 200, "{text}");

    let client = sim_client(&sim);
    let signing = SigningKey::from_p8_file(&key.app.key_file, "TEAMAAAAAA", "KEYAAAAAAA").unwrap();
    let jwt: Arc<str> = Arc::from(signing.sign(unix_now()));
    let req = request(&token, &jwt);
    let push = || client.send(Environment::Sandbox, &req, Duration::from_secs(5));
    let r = push().await.unwrap();
    assert_eq!(r.status, 200);

    let (status, text) = http_get(control, "/requests").await;
    assert_eq!(status, 200);
    let listed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["token"], token);
    assert_eq!(listed[0]["environment"], "sandbox");
    assert_eq!(listed[0]["status"], 200);
    assert_eq!(listed[0]["headers"]["apns-push-type"], "voip");

    assert_eq!(http_post(control, "/reset", "").await.0, 200);
    let (_, text) = http_get(control, "/requests").await;
    assert_eq!(text.trim(), "[]");
    let r = push().await.unwrap();
    assert_eq!(
        r.reason.as_deref(),
        Some("BadDeviceToken"),
        "reset forgets tokens"
    );
}

#[tokio::test]
async fn simulator_refuses_a_new_provider_token_within_twenty_minutes_on_one_connection() {
    let (rig, first) = rig_with_a_first_push().await;
    // Same connection, a newly minted token (another iat): refused.
    let mut second = first.clone();
    second.provider_token = Arc::from(rig.key.sign(unix_now() - 5));
    assert_eq!(
        answer(&rig, Environment::Production, &second).await,
        (429, Some("TooManyProviderTokenUpdates".into()))
    );
    // The first token still works there; the new one works on a new connection.
    assert_eq!(answer(&rig, Environment::Production, &first).await.0, 200);
    rig.client.reset(Environment::Production).await;
    assert_eq!(answer(&rig, Environment::Production, &second).await.0, 200);
}

#[tokio::test]
async fn a_new_connection_answers_one_stream_at_a_time_until_its_first_success() {
    let rig = rig().await;
    let (a, b) = (random_token(), random_token());
    for t in [&a, &b] {
        rig.sim.register_token(Environment::Production, t, BUNDLE);
    }
    let slow = delayed(300);
    rig.sim.script(&a, [slow]);
    let (ra, rb) = (request(&a, &rig.jwt), request(&b, &rig.jwt));
    let first = rig
        .client
        .send(Environment::Production, &ra, Duration::from_secs(5));
    let second = async {
        // Sent while the first is still unanswered, on the same connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
        rig.client
            .send(Environment::Production, &rb, Duration::from_secs(5))
            .await
    };
    let (x, y) = tokio::join!(first, second);
    assert_eq!((x.unwrap().status, y.unwrap().status), (200, 200));
    let recorded = rig.sim.requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].connection, recorded[1].connection);
    assert!(
        recorded[1].at_ms >= recorded[0].at_ms + 300,
        "the second stream waited for the first answer"
    );
}

#[tokio::test]
async fn a_connections_provider_token_is_judged_on_every_push_though_verified_once() {
    let (rig, good) = rig_with_a_first_push().await;

    // The same header and claims under another signature, on the connection
    // that verified the real one: forged.
    let mut forged = good.clone();
    let mut chars: Vec<char> = rig.jwt.chars().collect();
    let at = chars.len() - 10;
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    forged.provider_token = Arc::from(chars.into_iter().collect::<String>());
    assert_eq!(
        answer(&rig, Environment::Production, &forged).await,
        (403, Some("InvalidProviderToken".into()))
    );

    // The verified token ages with the clock: past an hour it has expired there.
    rig.sim.set_clock_offset(3601);
    assert_eq!(
        answer(&rig, Environment::Production, &good).await,
        (403, Some("ExpiredProviderToken".into()))
    );
    rig.sim.set_clock_offset(0);
    assert_eq!(answer(&rig, Environment::Production, &good).await.0, 200);

    let recorded = rig.sim.requests();
    assert_eq!(recorded.len(), 4);
    assert!(
        recorded
            .iter()
            .all(|r| r.connection == recorded[0].connection),
        "all on one connection"
    );
}

/// A rig whose production connection has made its first push (accepted), and
/// that push's request.
async fn rig_with_a_first_push() -> (Rig, PushRequest) {
    let rig = rig().await;
    let token = random_token();
    rig.sim
        .register_token(Environment::Production, &token, BUNDLE);
    let first = request(&token, &rig.jwt);
    assert_eq!(answer(&rig, Environment::Production, &first).await.0, 200);
    (rig, first)
}
