//! A call's status and its cancel over HTTP (CONTRACT §10): `GET /v1/calls/{id}`
//! answers from Postgres (with `?waitMs=N` to wait until the call settles), and
//! `POST /v1/calls/{id}/cancel` publishes a `call.cancel` event.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::calls::accept_object;
use super::{json_object, text_field, ApiError, ApiResult, ApiState};
use crate::config::{Config, PostgresConfig};
use crate::metrics::{Held, Metrics};
use crate::store::calls::CallState;
use crate::store::{Store, StoreError};

/// A long poll waits at most this long, whatever `waitMs` asks: past it, load
/// balancers and clients give up anyway.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a long poll looks at the call again (one indexed read of its state).
const POLL_EVERY: Duration = Duration::from_millis(100);
/// What a long poll over `http.max_long_polls` is told to wait before trying again.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

const REASONS: &[&str] = &["caller_hangup", "answered_elsewhere", "declined", "timeout"];

/// Status reads and long polls: their own small pool, so that however many
/// clients poll, they never take a connection a ring needs; and a cap on the
/// long polls waiting at once.
#[derive(Clone)]
pub struct StatusReads {
    store: Store,
    waiting: Arc<Semaphore>,
    metrics: Metrics,
}

impl StatusReads {
    /// No connection is opened here: the pool connects on first use.
    pub fn connect(cfg: &Config, metrics: Metrics) -> Result<Self, StoreError> {
        let pg = PostgresConfig {
            pool_size: cfg.http.long_poll_pool_size,
            ..cfg.postgres.clone()
        };
        Ok(Self {
            store: Store::connect(&pg)?,
            waiting: Arc::new(Semaphore::new(cfg.http.max_long_polls)),
            metrics,
        })
    }
}

#[derive(Deserialize)]
pub struct StatusQuery {
    #[serde(rename = "waitMs")]
    wait_ms: Option<u64>,
}

/// `GET /v1/calls/{callId}[?waitMs=N]` (service token). Over
/// `http.max_long_polls` waiting polls, a poll that would wait is a 503 with
/// `Retry-After` at once (a poll without `waitMs` is always answered).
pub async fn get_call(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(call_id): Path<String>,
    Query(q): Query<StatusQuery>,
) -> ApiResult {
    s.require_service(&headers)?;
    let reads = &s.status;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    let _slot = if wait.is_zero() {
        None
    } else {
        let Ok(slot) = reads.waiting.clone().try_acquire_owned() else {
            reads.metrics.long_polls_refused.inc();
            let busy = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many long polls are waiting; retry later, or poll without waitMs",
            );
            return Ok((
                [(header::RETRY_AFTER, BUSY_RETRY_AFTER_SECS.to_string())],
                busy,
            )
                .into_response());
        };
        Some((slot, Held::new(&reads.metrics.long_polls_waiting)))
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let state = reads.store.call_state(&call_id).await?;
        let settled = state.is_some_and(|st| st != CallState::Ringing);
        if settled || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    match reads.store.trace_call(&call_id).await? {
        Some(t) => Ok(Json(t).into_response()),
        None => Err(ApiError::not_found(&format!(
            "no call {call_id:?} is recorded"
        ))),
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
    // The worker would refuse it too (dead letter); saying so here tells the
    // backend at once. A call not seen yet may be cancelled before its ring.
    if let Some(callee) = s.store.callee(&call_id).await? {
        if callee != to_user_id {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "wrong_user",
                "toUserId is not this call's callee; nothing was cancelled",
            ));
        }
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
