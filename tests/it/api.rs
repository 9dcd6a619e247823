//! The HTTP API for existing backends (CONTRACT §9), against a running worker:
//! the request shapes are the seed backends' own.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use voip_push_worker::api::jwt::{sign_hs256, Verifier};
use voip_push_worker::config::{AppConfig, Config};
use voip_push_worker::event::{Environment, Status};

use crate::common::{eventually, http_request_with_headers, random_token, TestEnv, BUNDLE};

const SERVICE_TOKEN: &str = "svc-7d1c0f2b9a";
const USER_JWT_SECRET: &str = "users-jwt-5e8a41";
const TWILIO_SECRET: &str = "twilio-key-secret-93b2";
/// The seed iOS app's bundle id.
const CHUTALK: &str = "rcc.takaokanet.com.ChuTalk";

fn now() -> i64 {
    voip_push_worker::event::now_ms() / 1000
}

/// A user's bearer JWT, HS256 with the configured secret (or another one).
fn user_jwt(sub: &str, exp_in_secs: i64, secret: &str) -> String {
    sign_hs256(
        &json!({"alg":"HS256","typ":"JWT"}),
        &json!({"sub": sub, "iat": now(), "exp": now() + exp_in_secs}),
        secret.as_bytes(),
    )
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Every group on: service token, user JWTs, Twilio; the seed app's bundle id is
/// a configured app too (same team key).
fn all_groups(cfg: &mut Config) {
    cfg.http.service_token = Some(SERVICE_TOKEN.into());
    cfg.http.user_jwt_secret = Some(USER_JWT_SECRET.into());
    cfg.twilio.account_sid = Some("AC0123456789abcdef0123456789abcdef".into());
    cfg.twilio.api_key_sid = Some("SK0123456789abcdef0123456789abcdef".into());
    cfg.twilio.api_key_secret = Some(TWILIO_SECRET.into());
    cfg.twilio.twiml_app_sid = Some("AP0123456789abcdef0123456789abcdef".into());
    cfg.twilio.push_credential_sid = Some("CR0123456789abcdef0123456789abcdef".into());
    let first = cfg.apns.apps[0].clone();
    cfg.apns.apps.push(AppConfig {
        bundle_id: CHUTALK.into(),
        ..first
    });
}

async fn req(
    env: &TestEnv,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: &str,
) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = auth.into_iter().collect();
    let (status, text) =
        http_request_with_headers(env.worker().http_addr, method, path, &headers, body).await;
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
    };
    (status, value)
}

async fn tokens_of(env: &TestEnv, user: &str, bundle: &str) -> Vec<String> {
    let mut t: Vec<String> = env
        .store
        .live_devices(user, bundle)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.token)
        .collect();
    t.sort();
    t
}

fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{got:?}");
    assert_eq!(got.1["error"], code, "{got:?}");
    assert!(got.1["message"].is_string(), "{got:?}");
}

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
async fn app_registers_its_own_token_with_a_user_jwt() {
    let env = TestEnv::with(all_groups).await;
    let token = random_token().to_ascii_uppercase();
    let body = format!(
        r#"{{"platform":"ios","bundleId":"rcc.takaokanet.com.ChuTalk","voipDeviceToken":"{token}"}}"#
    );
    let jwt10 = bearer(&user_jwt("10", 600, USER_JWT_SECRET));
    let as10 = Some(("Authorization", jwt10.as_str()));

    // Bad credentials and bad tokens change nothing.
    let refused = [
        (None, 401),
        (Some(bearer(&user_jwt("10", 600, "not-the-secret"))), 401),
        (Some(bearer(&user_jwt("10", -3600, USER_JWT_SECRET))), 401),
        (Some("Bearer not.a.jwt".to_string()), 401),
        (Some(bearer(SERVICE_TOKEN)), 403),
        // Without `exp` a leaked token would be good for ever.
        (
            Some(bearer(&sign_hs256(
                &json!({"alg":"HS256","typ":"JWT"}),
                &json!({"sub": "10", "iat": now()}),
                USER_JWT_SECRET.as_bytes(),
            ))),
            401,
        ),
        // A subject with a control character is no user id.
        (
            Some(bearer(&user_jwt("1\u{0}0", 600, USER_JWT_SECRET))),
            401,
        ),
    ];
    for (auth, want) in &refused {
        let auth = auth.as_deref().map(|a| ("Authorization", a));
        let got = req(&env, "PUT", "/api/v1/me/devices", auth, &body).await;
        assert_eq!(got.0, *want, "{auth:?}: {got:?}");
    }
    for bad in ["abc", "zz00", &"ab".repeat(101)] {
        let b = format!(r#"{{"platform":"ios","bundleId":"{CHUTALK}","voipDeviceToken":"{bad}"}}"#);
        assert_error(
            &req(&env, "PUT", "/api/v1/me/devices", as10, &b).await,
            400,
            "bad_token",
        );
    }
    let android =
        format!(r#"{{"platform":"android","bundleId":"{CHUTALK}","voipDeviceToken":"{token}"}}"#);
    assert_error(
        &req(&env, "PUT", "/api/v1/me/devices", as10, &android).await,
        400,
        "bad_platform",
    );
    assert!(tokens_of(&env, "10", CHUTALK).await.is_empty());

    // The app's request, verbatim: stored lower-cased for the JWT's subject.
    let (status, answer) = req(&env, "PUT", "/api/v1/me/devices", as10, &body).await;
    assert_eq!(status, 200, "{answer}");
    let lower = token.to_ascii_lowercase();
    assert_eq!(tokens_of(&env, "10", CHUTALK).await, vec![lower.clone()]);

    // An invalidated token comes back to life on re-registration, with a fresh
    // registration time.
    let before = env.store.live_devices("10", CHUTALK).await.unwrap()[0].clone();
    assert!(env
        .store
        .invalidate(before.id, "Unregistered", None)
        .await
        .unwrap());
    assert!(tokens_of(&env, "10", CHUTALK).await.is_empty());
    assert_eq!(
        req(&env, "PUT", "/api/v1/me/devices", as10, &body).await.0,
        200
    );
    let after = env.store.live_devices("10", CHUTALK).await.unwrap()[0].clone();
    assert_eq!(after.id, before.id);
    assert!(after.updated_at_ms >= before.updated_at_ms);

    // The same phone signed in as another user: the token moves.
    let jwt11 = bearer(&user_jwt("11", 600, USER_JWT_SECRET));
    let as11 = Some(("Authorization", jwt11.as_str()));
    assert_eq!(
        req(&env, "PUT", "/api/v1/me/devices", as11, &body).await.0,
        200
    );
    assert!(tokens_of(&env, "10", CHUTALK).await.is_empty());
    assert_eq!(tokens_of(&env, "11", CHUTALK).await, vec![lower]);
    env.cleanup().await;
}

#[tokio::test]
async fn backends_register_and_unregister_with_the_service_token() {
    let env = TestEnv::with(all_groups).await;
    let service = bearer(SERVICE_TOKEN);
    let auth = Some(("Authorization", service.as_str()));
    let token = random_token();
    let body = format!(r#"{{"userId":42,"token":"{token}","environment":"sandbox"}}"#);
    let (status, answer) = req(&env, "PUT", "/v1/devices", auth, &body).await;
    assert_eq!(status, 200, "{answer}");
    let devices = env.store.live_devices("42", BUNDLE).await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].environment, Some(Environment::Sandbox));
    assert_eq!(answer["deviceId"], devices[0].id);

    let jwt = bearer(&user_jwt("42", 600, USER_JWT_SECRET));
    let as_user = Some(("Authorization", jwt.as_str()));
    let path = format!("/v1/devices/{token}");
    assert_eq!(req(&env, "DELETE", &path, as_user, "").await.0, 403);
    assert_eq!(req(&env, "DELETE", &path, None, "").await.0, 401);
    assert_error(
        &req(&env, "DELETE", "/v1/devices/xyz", auth, "").await,
        400,
        "bad_token",
    );
    assert_eq!(tokens_of(&env, "42", BUNDLE).await, vec![token.clone()]);
    let upper = format!("/v1/devices/{}", token.to_ascii_uppercase());
    assert_eq!(req(&env, "DELETE", &upper, auth, "").await.0, 204);
    assert!(tokens_of(&env, "42", BUNDLE).await.is_empty());

    // Every request above is counted by its route's template and status code;
    // no token ever becomes a label.
    let (_, text) = env.http_get("/metrics").await;
    let count = |labels: &str| {
        crate::common::metric(&text, &format!("voip_push_api_requests_total{{{labels}}}"))
    };
    assert_eq!(count(r#"code="200",route="/v1/devices""#), 1.0);
    assert_eq!(count(r#"code="401",route="/v1/devices/{token}""#), 1.0);
    assert_eq!(count(r#"code="403",route="/v1/devices/{token}""#), 1.0);
    assert_eq!(count(r#"code="400",route="/v1/devices/{token}""#), 1.0);
    assert_eq!(count(r#"code="204",route="/v1/devices/{token}""#), 1.0);
    assert_eq!(
        crate::common::metric(
            &text,
            r#"voip_push_api_request_duration_seconds_count{route="/v1/devices/{token}"}"#
        ),
        4.0
    );
    assert!(
        !text.to_ascii_lowercase().contains(&token[..16]),
        "a token leaked into /metrics"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn twilio_backend_registers_voip_tokens_per_identity() {
    let env = TestEnv::with(all_groups).await;
    let token = random_token();
    let jwt = bearer(&user_jwt("alice", 600, USER_JWT_SECRET));
    let alice = Some(("Authorization", jwt.as_str()));
    let path = "/users/alice/voip-token";
    let invalid = json!({"error": "Invalid platform or missing token"});

    for body in [
        format!(r#"{{"deviceToken":"{token}","platform":"android"}}"#),
        r#"{"platform":"ios"}"#.to_string(),
        format!(r#"{{"deviceToken":"{token}"}}"#),
    ] {
        assert_eq!(
            req(&env, "POST", path, alice, &body).await,
            (400, invalid.clone()),
            "{body}"
        );
    }
    let body = format!(r#"{{"deviceToken":"{token}","platform":"ios"}}"#);
    let bob = bearer(&user_jwt("bob", 600, USER_JWT_SECRET));
    assert_error(
        &req(&env, "POST", path, Some(("Authorization", &bob)), &body).await,
        403,
        "forbidden",
    );
    assert_error(
        &req(&env, "POST", path, None, &body).await,
        401,
        "unauthorized",
    );
    assert!(tokens_of(&env, "alice", BUNDLE).await.is_empty());

    assert_eq!(
        req(&env, "POST", path, alice, &body).await,
        (200, json!({"success": true}))
    );
    assert_eq!(tokens_of(&env, "alice", BUNDLE).await, vec![token]);

    // A backend may register for anyone with the service token.
    let service = bearer(SERVICE_TOKEN);
    let other = random_token();
    let body = format!(r#"{{"deviceToken":"{other}","platform":"ios"}}"#);
    let got = req(
        &env,
        "POST",
        "/users/carol/voip-token",
        Some(("Authorization", &service)),
        &body,
    )
    .await;
    assert_eq!(got.0, 200, "{got:?}");
    assert_eq!(tokens_of(&env, "carol", BUNDLE).await, vec![other]);
    env.cleanup().await;
}

#[tokio::test]
async fn twilio_token_verifies_and_carries_the_voice_grant() {
    let env = TestEnv::with(all_groups).await;
    let token = random_token();
    let jwt = bearer(&user_jwt("alice", 600, USER_JWT_SECRET));
    let alice = Some(("Authorization", jwt.as_str()));
    let body = format!(r#"{{"identity":"alice","platform":"ios","deviceToken":"{token}"}}"#);

    let bob = bearer(&user_jwt("bob", 600, USER_JWT_SECRET));
    assert_error(
        &req(
            &env,
            "POST",
            "/twilio/token",
            Some(("Authorization", &bob)),
            &body,
        )
        .await,
        403,
        "forbidden",
    );
    assert!(tokens_of(&env, "alice", BUNDLE).await.is_empty());

    let (status, answer) = req(&env, "POST", "/twilio/token", alice, &body).await;
    assert_eq!(status, 200, "{answer}");
    let access = answer["token"].as_str().unwrap();
    let claims = Verifier::hs256(TWILIO_SECRET.as_bytes())
        .verify(access, now())
        .expect("signed with the API key secret");
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(access.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        header,
        json!({"typ":"JWT","alg":"HS256","cty":"twilio-fpa;v=1"})
    );
    let sk = "SK0123456789abcdef0123456789abcdef";
    assert_eq!(claims["iss"], sk);
    assert_eq!(claims["sub"], "AC0123456789abcdef0123456789abcdef");
    assert!(claims["jti"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{sk}-")));
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(claims["exp"].as_i64().unwrap() - iat, 3600);
    let grants = &claims["grants"];
    assert_eq!(grants["identity"], "alice");
    assert_eq!(
        grants["voice"]["push_credential_sid"],
        "CR0123456789abcdef0123456789abcdef"
    );
    assert_eq!(
        grants["voice"]["outgoing"]["application_sid"],
        "AP0123456789abcdef0123456789abcdef"
    );
    assert_eq!(grants["voice"]["incoming"]["allow"], true);
    assert_eq!(tokens_of(&env, "alice", BUNDLE).await, vec![token]);
    assert!(Verifier::hs256(b"other").verify(access, now()).is_err());
    env.cleanup().await;
}

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
    db.execute(
        "INSERT INTO users VALUES (10, 'User 10', $1), (12, 'User 12', $2), (13, 'User 13', NULL)",
        &[&token.to_ascii_uppercase(), &stale],
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

    // A token APNs refuses in both environments is cleared by invalidate_query.
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

#[tokio::test]
async fn oversized_bodies_are_413_and_registration_is_rate_limited() {
    let env = TestEnv::with(|cfg| {
        all_groups(cfg);
        cfg.http.max_body_bytes = 1024;
        cfg.http.rate_limit_burst = 3;
        cfg.http.rate_limit_per_minute = 1;
    })
    .await;
    let service = bearer(SERVICE_TOKEN);
    let auth = Some(("Authorization", service.as_str()));
    let big = format!(
        r#"{{"toUserId":10,"callId":"big","fromDisplayName":"{}"}}"#,
        "x".repeat(2000)
    );
    assert_error(
        &req(&env, "POST", "/v1/calls", auth, &big).await,
        413,
        "too_large",
    );

    // Three registrations fill the bucket; the fourth is refused and not stored.
    let tokens: Vec<String> = (0..4).map(|_| random_token()).collect();
    for (i, t) in tokens.iter().enumerate() {
        let body = format!(r#"{{"userId":"rl","token":"{t}"}}"#);
        let got = req(&env, "PUT", "/v1/devices", auth, &body).await;
        if i < 3 {
            assert_eq!(got.0, 200, "{got:?}");
        } else {
            assert_error(&got, 429, "rate_limited");
        }
    }
    let mut stored = tokens_of(&env, "rl", BUNDLE).await;
    let mut want = tokens[..3].to_vec();
    stored.sort();
    want.sort();
    assert_eq!(stored, want);
    // Ingestion is not rate limited.
    let (status, _) = req(
        &env,
        "POST",
        "/v1/calls",
        auth,
        r#"{"toUserId":"rl","callId":"after-limit"}"#,
    )
    .await;
    assert_eq!(status, 202);
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

    env.publish(json!({"callId":"ud-1","toUserId":"u20"})).await;
    let r = &env.results_for("ud-1", 1).await[0];
    assert_eq!(r.status, Status::TokenInvalidated, "{r:?}");
    let requests = env.sim.requests();
    assert!(
        requests.iter().all(|q| q.token == stale),
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

#[tokio::test]
async fn registration_events_on_the_devices_exchange() {
    let exchange = crate::common::unique("it.devices.");
    let queue = crate::common::unique("it.devices.q.");
    let (x, q) = (exchange.clone(), queue.clone());
    let env = TestEnv::with(move |cfg| {
        cfg.devices.exchange = x;
        cfg.devices.queue = q;
    })
    .await;
    let publish = |key: &'static str, body: Value| {
        let env = &env;
        let exchange = exchange.clone();
        async move {
            let props =
                lapin::BasicProperties::default().with_content_type("application/json".into());
            // The worker declares the exchange once it consumes: retry until then.
            eventually("the devices exchange", Duration::from_secs(20), || {
                let (props, body, exchange) = (props.clone(), body.to_string(), exchange.clone());
                async move {
                    env.publisher
                        .publish(&exchange, key, body.as_bytes(), props)
                        .await
                        .ok()
                }
            })
            .await;
        }
    };
    // The exchange exists a moment before the worker's queue is bound to it: wait
    // for the worker to consume, or the first registrations would go nowhere.
    eventually("the devices consumer", Duration::from_secs(20), || {
        let (cfg, queue) = (env.cfg.amqp.clone(), queue.clone());
        async move {
            let conn = voip_push_worker::amqp::connect(&cfg, "test probe")
                .await
                .ok()?;
            let ch = conn.create_channel().await.ok()?;
            let q = ch
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .ok();
            let _ = conn.close(200, "done".into()).await;
            q.filter(|q| q.consumer_count() > 0).map(|_| ())
        }
    })
    .await;
    let token = random_token().to_ascii_uppercase();
    let lower = token.to_ascii_lowercase();
    publish("device.register", json!({"userId":"e1","token":"nothex"})).await;
    publish(
        "device.register",
        json!({"userId":"e1","token":token,"environment":"production"}),
    )
    .await;
    let devices = eventually("the registration", Duration::from_secs(10), || async {
        let d = env.store.live_devices("e1", BUNDLE).await.unwrap();
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(devices.len(), 1, "the malformed token was not stored");
    assert_eq!(devices[0].token, lower);
    assert_eq!(devices[0].environment, Some(Environment::Production));

    // What cannot be applied is dead-lettered with its reason, not dropped.
    publish(
        "device.register",
        json!({"userId":"e\u{0}1","token":random_token()}),
    )
    .await;
    publish("device.register", json!({"token":random_token()})).await;
    let mut reasons = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while reasons.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "dead-lettered registrations: {reasons:?}"
        );
        let got = env
            .dead_letters_in(&env.cfg.devices.dead_letter_queue)
            .await;
        reasons.extend(got.into_iter().map(|(_, r)| r.unwrap_or_default()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reasons.sort();
    assert_eq!(reasons, ["bad_field", "bad_field", "missing_field"]);
    env.wait_metric(
        "voip_push_dead_letters_total{lane=\"devices\",reason=\"bad_field\"}",
        2.0,
    )
    .await;

    // A move to another user, then an unregister.
    publish("device.register", json!({"userId":"e2","token":token})).await;
    eventually("the move", Duration::from_secs(10), || async {
        (tokens_of(&env, "e2", BUNDLE).await == vec![lower.clone()]).then_some(())
    })
    .await;
    assert!(tokens_of(&env, "e1", BUNDLE).await.is_empty());
    publish("device.unregister", json!({"token":token})).await;
    eventually("the unregister", Duration::from_secs(10), || async {
        tokens_of(&env, "e2", BUNDLE).await.is_empty().then_some(())
    })
    .await;

    let cfg = env.cfg.amqp.clone();
    env.cleanup().await;
    if let Ok(conn) = voip_push_worker::amqp::connect(&cfg, "test cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
            let _ = ch
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
}
