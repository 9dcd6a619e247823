//! Device registration over HTTP. Every path ends in `Store::register_device`: the
//! token is normalised (lower-case hex, even length, at most 200 digits) or refused
//! with 400 before anything is stored; a re-registration refreshes `updated_at` and
//! clears an invalidation; a token registered by another user moves to them, and
//! the move is logged, counted and kept (`devices list` shows it).

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use super::auth::Caller;
use super::{json_object, text_field, ApiError, ApiResult, ApiState};
use crate::event::{token_suffix, Environment};
use crate::store::normalize_token;

/// The exact answer the Twilio backends' apps expect for a non-iOS or missing token.
const INVALID_PLATFORM: &str = "Invalid platform or missing token";

pub(super) fn environment(obj: &Map<String, Value>) -> Result<Option<Environment>, ApiError> {
    match text_field(obj, &["environment"])? {
        None => Ok(None),
        Some(e) if e.eq_ignore_ascii_case("unknown") => Ok(None),
        Some(e) => Environment::parse(&e).map(Some).ok_or_else(|| {
            ApiError::bad_request(
                "bad_field",
                "environment must be sandbox, production or unknown",
            )
        }),
    }
}

fn checked_token(token: &str) -> Result<String, ApiError> {
    normalize_token(token).map_err(ApiError::from)
}

/// Registers after every check passed; answers 200 with the device id.
pub(super) async fn register(
    s: &ApiState,
    user_id: &str,
    bundle_id: &str,
    token: &str,
    env: Option<Environment>,
) -> Result<i64, ApiError> {
    let token = checked_token(token)?;
    let reg = s
        .store
        .register_device(user_id, bundle_id, &token, env)
        .await?;
    let suffix = token_suffix(&token);
    if let Some(from) = &reg.moved_from {
        // The old owner's calls stop ringing on this phone: worth a line and a
        // count (many moves can mean tokens being taken over).
        s.metrics.device_moves.inc();
        warn!(%user_id, previous_user_id = %from, %bundle_id, token_suffix = %suffix,
            device_id = reg.id, "device token moved to another user");
    }
    info!(%user_id, %bundle_id, token_suffix = %suffix, device_id = reg.id,
        "device registered");
    Ok(reg.id)
}

/// The optional alert token of a registration (`alertToken`), checked as a VoIP
/// token is: what a cancel's "Missed call" notice goes to.
pub(super) fn alert_token(obj: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    text_field(
        obj,
        &[
            "alertToken",
            "alert_token",
            "alertDeviceToken",
            "alert_device_token",
        ],
    )?
    .map(|t| checked_token(&t))
    .transpose()
}

/// Stores `token` beside the device just registered.
pub(super) async fn register_alert_token(
    s: &ApiState,
    device_id: i64,
    token: Option<String>,
) -> Result<(), ApiError> {
    if let Some(token) = token {
        s.store.set_alert_token(device_id, &token).await?;
        info!(device_id, token_suffix = %token_suffix(&token), "alert token registered");
    }
    Ok(())
}

fn registered(id: i64) -> ApiResult {
    Ok((
        StatusCode::OK,
        Json(json!({"success": true, "deviceId": id})),
    )
        .into_response())
}

/// `PUT /v1/devices` (service): `{"userId","token","bundleId"?,"environment"?}`.
pub async fn put_device(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    s.require_service(&headers)?;
    let obj = json_object(body)?;
    let user_id = text_field(&obj, &["userId", "user_id"])?
        .ok_or_else(|| ApiError::bad_request("missing_field", "userId is required"))?;
    let token = text_field(&obj, &["token", "voipDeviceToken", "voip_token"])?
        .ok_or_else(|| ApiError::bad_request("missing_field", "token is required"))?;
    let bundle_id = s.bundle_id(text_field(&obj, &["bundleId", "bundle_id"])?.as_deref())?;
    let env = environment(&obj)?;
    let alert = alert_token(&obj)?;
    let id = register(&s, &user_id, &bundle_id, &token, env).await?;
    register_alert_token(&s, id, alert).await?;
    registered(id)
}

/// `DELETE /v1/devices/{token}` (service): forgets the token in every app; 204
/// whether or not it was known.
pub async fn delete_device(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> ApiResult {
    s.require_service(&headers)?;
    let token = checked_token(&token)?;
    let n = s.store.unregister_token(&token).await?;
    info!(token_suffix = %token_suffix(&token), removed = n, "device unregistered over HTTP");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT /api/v1/me/devices` (user JWT): `{"platform":"ios","bundleId","voipDeviceToken"}`.
pub async fn put_my_device(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    if !s.auth.users_on() {
        return Err(ApiError::group_off(
            "http.user_jwt_secret or http.user_jwt_public_key_file",
        ));
    }
    let user_id = match s.auth.caller(&headers)? {
        Caller::User(sub) => sub,
        Caller::Service => {
            return Err(ApiError::forbidden(
                "this endpoint registers the calling user's device: send the user's JWT",
            ))
        }
    };
    let obj = json_object(body)?;
    let platform = text_field(&obj, &["platform"])?;
    if platform
        .as_deref()
        .is_some_and(|p| !p.eq_ignore_ascii_case("ios"))
    {
        return Err(ApiError::bad_request(
            "bad_platform",
            "only platform \"ios\" has VoIP tokens",
        ));
    }
    let token = text_field(&obj, &["voipDeviceToken", "voip_device_token", "token"])?
        .ok_or_else(|| ApiError::bad_request("missing_field", "voipDeviceToken is required"))?;
    let bundle_id = s.bundle_id(text_field(&obj, &["bundleId", "bundle_id"])?.as_deref())?;
    let env = environment(&obj)?;
    let alert = alert_token(&obj)?;
    let id = register(&s, &user_id, &bundle_id, &token, env).await?;
    register_alert_token(&s, id, alert).await?;
    registered(id)
}

/// `POST /users/{identity}/voip-token` (Twilio group; user JWT with `sub` =
/// identity, or service): `{"deviceToken","platform"}` → `200 {"success":true}`.
pub async fn post_voip_token(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(identity): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    if s.twilio.is_none() {
        return Err(ApiError::group_off("every twilio.* setting"));
    }
    s.auth.service_or_user(&headers, &identity)?;
    let obj = json_object(body)?;
    let platform = text_field(&obj, &["platform"])?;
    let token = text_field(&obj, &["deviceToken", "device_token"])?;
    let is_ios = platform.is_some_and(|p| p.eq_ignore_ascii_case("ios"));
    let (Some(token), true) = (token, is_ios) else {
        return Ok((
            StatusCode::BAD_REQUEST,
            Json(json!({"error": INVALID_PLATFORM})),
        )
            .into_response());
    };
    let bundle_id = s.bundle_id(text_field(&obj, &["bundleId", "bundle_id"])?.as_deref())?;
    let env = environment(&obj)?;
    register(&s, &identity, &bundle_id, &token, env).await?;
    Ok((StatusCode::OK, Json(json!({"success": true}))).into_response())
}

/// Registers the token a `/twilio/token` request carried, if it is an iOS one.
pub async fn register_from_twilio(
    s: &ApiState,
    identity: &str,
    obj: &Map<String, Value>,
) -> Result<(), ApiError> {
    let platform = text_field(obj, &["platform"])?;
    let token = text_field(obj, &["deviceToken", "device_token"])?;
    let is_ios = platform.is_some_and(|p| p.eq_ignore_ascii_case("ios"));
    if let (Some(token), true) = (token, is_ios) {
        let bundle_id = s.bundle_id(text_field(obj, &["bundleId", "bundle_id"])?.as_deref())?;
        let env = environment(obj)?;
        register(s, identity, &bundle_id, &token, env).await?;
    }
    Ok(())
}
