//! A call's status and its cancel over HTTP (CONTRACT §10): `GET /v1/calls/{id}`
//! answers from Postgres (with `?waitMs=N` to wait until the call settles), and
//! `POST /v1/calls/{id}/cancel` publishes a `call.cancel` event.

use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::calls::accept_object;
use super::{json_object, text_field, ApiError, ApiResult, ApiState};
use crate::store::calls::CallState;

/// A long poll waits at most this long, whatever `waitMs` asks: past it, load
/// balancers and clients give up anyway.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a long poll looks at the call again.
const POLL_EVERY: Duration = Duration::from_millis(100);

const REASONS: &[&str] = &["caller_hangup", "answered_elsewhere", "declined", "timeout"];

#[derive(Deserialize)]
pub struct StatusQuery {
    #[serde(rename = "waitMs")]
    wait_ms: Option<u64>,
}

/// `GET /v1/calls/{callId}[?waitMs=N]` (service token).
pub async fn get_call(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(call_id): Path<String>,
    Query(q): Query<StatusQuery>,
) -> ApiResult {
    s.require_service(&headers)?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let trace = s.store.trace_call(&call_id).await?;
        let settled = trace
            .as_ref()
            .is_some_and(|t| t.state != CallState::Ringing);
        if settled || tokio::time::Instant::now() >= deadline {
            return match trace {
                Some(t) => Ok(Json(t).into_response()),
                None => Err(ApiError::not_found(&format!(
                    "no call {call_id:?} is recorded"
                ))),
            };
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// `POST /v1/calls/{callId}/cancel` (service token):
/// `{"toUserId", "reason"?, "answeredDeviceId"?}` → `202 {"eventId"}`.
pub async fn post_cancel(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(call_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    s.require_service(&headers)?;
    let obj = json_object(body)?;
    let to_user_id = text_field(&obj, &["toUserId", "to_user_id"])?
        .ok_or_else(|| ApiError::bad_request("missing_field", "toUserId is required"))?;
    let reason = text_field(&obj, &["reason"])?.unwrap_or_else(|| "caller_hangup".into());
    if !REASONS.contains(&reason.as_str()) {
        return Err(ApiError::bad_request(
            "bad_field",
            format!("reason {reason:?} is not one of {}", REASONS.join(", ")),
        ));
    }
    let mut event = json!({
        "type": "call.cancel",
        "callId": call_id,
        "toUserId": to_user_id,
        "reason": reason,
    });
    if let Some(d) = text_field(&obj, &["answeredDeviceId", "answered_device_id"])? {
        event["answeredDeviceId"] = Value::from(d);
    }
    if let Some(b) = text_field(&obj, &["bundleId", "bundle_id"])? {
        event["bundleId"] = Value::from(b);
    }
    let Value::Object(event) = event else {
        unreachable!("built as an object")
    };
    let event_id = accept_object(&s, event).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"eventId": event_id}))).into_response())
}
