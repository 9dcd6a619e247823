//! Call ingestion over HTTP: the event is checked exactly as the consumer would
//! check it, then published to the call exchange, and accepted (202) only once the
//! broker has confirmed it — so a 202 means the call will be worked on.

use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use lapin::types::ShortString;
use lapin::BasicProperties;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::{json_object, ApiError, ApiResult, ApiState};
use crate::event::{now_ms, CallEvent, EventType, InvalidKind};

/// How long a request waits for the broker's confirm. Past it the caller gets 503
/// and may retry; a healthy broker confirms in milliseconds.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// `POST /v1/calls` (service token): `202 {"eventId"}`.
pub async fn post_call(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    s.require_service(&headers)?;
    let event_id = accept(&s, body).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"eventId": event_id}))).into_response())
}

/// `POST /api/internal/push/call` (`X-Admin-Token`), the seed signal server's
/// shape: `202 {"success":true,"eventId"}`.
pub async fn post_internal_call(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    s.require_service(&headers)?;
    let event_id = accept(&s, body).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"success": true, "eventId": event_id})),
    )
        .into_response())
}

async fn accept(s: &ApiState, body: Result<Bytes, BytesRejection>) -> Result<String, ApiError> {
    accept_object(s, json_object(body)?).await
}

/// Checks an event like the consumer would, publishes it with a confirm, and
/// returns its event id.
pub(super) async fn accept_object(
    s: &ApiState,
    mut obj: serde_json::Map<String, Value>,
) -> Result<String, ApiError> {
    let bytes = serde_json::to_vec(&obj).unwrap_or_default();
    let event = CallEvent::parse_with(&bytes, &s.cfg.worker.limits()).map_err(|e| {
        let status = match e.kind {
            InvalidKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.kind.label(), e.message)
    })?;
    if let Some(b) = &event.bundle_id {
        if !s.cfg.apps().iter().any(|a| &a.bundle_id == b) {
            return Err(ApiError::bad_request(
                "bad_field",
                format!("bundleId {b:?} is not a configured app"),
            ));
        }
    }
    // The ring deadline counts from when we received the call, not from when a
    // worker picks it up.
    let received_ms = now_ms();
    if event.sent_at_ms.is_none() {
        obj.insert("sentAt".into(), Value::from(received_ms));
    }
    let body = serde_json::to_vec(&obj).unwrap_or_default();

    let event_id = uuid::Uuid::new_v4().to_string();
    let routing_key = match event.event_type {
        EventType::Incoming => "call.initiate",
        EventType::Cancel => "call.cancel",
    };
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(ShortString::from(event_id.clone()))
        .with_timestamp((received_ms / 1000) as u64);
    let publish =
        s.publisher
            .publish_mandatory(&s.cfg.amqp.call_exchange, routing_key, &body, props);
    match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
        Ok(Ok(())) => {
            info!(call_id = %event.call_id, to_user_id = %event.to_user_id, %event_id,
                event_type = event.event_type.as_str(), "call event accepted over HTTP");
            Ok(event_id)
        }
        Ok(Err(e)) => {
            warn!(call_id = %event.call_id, error = %e, "could not publish a call event received over HTTP");
            Err(ApiError::unavailable(match e {
                crate::amqp::AmqpError::Unroutable { .. } => {
                    "no queue is bound to the call exchange (is a worker running?); the call was not accepted"
                }
                _ => "the message broker is unavailable; the call was not accepted",
            }))
        }
        Err(_) => {
            warn!(call_id = %event.call_id, "broker did not confirm a call event in time");
            Err(ApiError::unavailable(
                "the message broker did not confirm in time; the call was not accepted",
            ))
        }
    }
}
