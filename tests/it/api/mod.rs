//! The HTTP API for existing backends (CONTRACT §9), against a running worker:
//! the request shapes are the seed backends' own. Shared helpers here; the
//! tests by responsibility below.

mod calls;
mod devices;
mod jwt_rules;
mod limits;
mod listener;
mod long_poll;
mod moves;
mod token_query;
mod twilio;

use serde_json::{json, Value};
use voip_push_worker::api::jwt::sign_hs256;
use voip_push_worker::config::{AppConfig, Config};

use crate::common::{http_request_with_headers, TestEnv, BUNDLE};

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

/// The app registers `token` for the first app with `PUT /api/v1/me/devices`,
/// under the `Authorization` value `auth` (a user's bearer JWT).
async fn register_mine(env: &TestEnv, auth: &str, token: &str) -> (u16, Value) {
    let body = format!(r#"{{"platform":"ios","bundleId":"{BUNDLE}","voipDeviceToken":"{token}"}}"#);
    req(
        env,
        "PUT",
        "/api/v1/me/devices",
        Some(("Authorization", auth)),
        &body,
    )
    .await
}
