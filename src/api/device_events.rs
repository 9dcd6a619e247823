//! Device registration over RabbitMQ, for backends that already publish events:
//! `device.register` / `device.unregister` on the `voip.devices` topic exchange,
//! consumed from the quorum queue `voip-push.devices`. The body is the one of
//! `PUT /v1/devices` (`{"userId","token","bundleId"?,"environment"?}`; for an
//! unregister only `token` matters) and the same rules apply. An event that
//! cannot be applied goes to `voip-push.devices.dead` with its reason; one that
//! meets database faults is retried, held, for `worker.retry_cap_secs`. They run
//! on the driver (`crate::worker`) as the lane `devices`, one at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::devices::{alert_token, environment, register, register_alert_token};
use super::{text_field, ApiError, ApiState};
use crate::amqp::source::{QueueSource, Topology};
use crate::amqp::RECONNECT;
use crate::event::token_suffix;
use crate::retry_policy::RetryPolicy;
use crate::store::normalize_token;
use crate::worker::{self, Disposition, Handler, Incoming, Lane};

/// Sixteen delivered ahead of the one being applied: a burst of registrations
/// (an app release, a backend replaying its devices) flows without a broker
/// round trip per event, and the order is the queue's either way (one session,
/// one slot). Each is one upsert; more would only sit in memory.
const PREFETCH: u16 = 16;
/// Pauses before a registration that met a database fault is tried again: 1 s
/// doubling to 15 s, so an outage is not a hot loop.
const DB_RETRY: RetryPolicy =
    RetryPolicy::doubling(Duration::from_secs(1), Duration::from_secs(15));

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Register,
    Unregister,
}

/// Runs the `devices` lane on the driver until `shutdown` (reconnecting after
/// broker failures, draining at the end). Does nothing when `devices.queue` is
/// empty.
///
/// One at a time, in queue order (concurrency 1): a register then an
/// unregister of one token must not swap, and two registrations of a token
/// must leave the later one's user. (Several replicas consuming one queue
/// interleave it between them, as any consumer of a shared queue does.)
pub async fn run(state: ApiState, shutdown: CancellationToken) {
    if state.cfg.devices.queue.is_empty() {
        return;
    }
    let cfg = state.cfg.clone();
    let lane = Lane {
        name: "devices",
        concurrency: 1,
        prefetch: PREFETCH,
        // Registrations claim nothing.
        claim_owner: String::new(),
        drain: Duration::from_secs(cfg.worker.drain_timeout_secs),
        reconnect: RECONNECT,
        metrics: state.metrics.clone(),
        // Not part of readiness: the calls lanes are the worker's job.
        watched: None,
    };
    let source = QueueSource {
        amqp: cfg.amqp.clone(),
        role: "device events",
        queue: cfg.devices.queue.clone(),
        topology: Topology::Devices(cfg.devices.clone()),
        publisher: state.publisher.clone(),
    };
    worker::run(lane, source, Arc::new(DeviceEvents { state }), shutdown).await;
}

/// The devices lane's handler.
struct DeviceEvents {
    state: ApiState,
}

impl Handler for DeviceEvents {
    /// Applies one event: `Ack` once applied. A malformed one is dead-lettered
    /// with its reason; a database fault is retried with the message held, then
    /// dead-lettered as `retry_exhausted`; at shutdown it returns to the queue.
    async fn handle(&self, msg: &Incoming, stop: &CancellationToken) -> Disposition {
        let state = &self.state;
        let started = Instant::now();
        let mut delays = DB_RETRY.delays();
        let mut delay = delays.next_delay();
        let (kind, message) = loop {
            match apply(state, &msg.routing_key, &msg.body).await {
                Ok(()) => return Disposition::Ack,
                Err(e) if e.status.is_server_error() => {
                    if started.elapsed() + delay >= state.cfg.worker.retry_cap() {
                        break ("retry_exhausted", e.message);
                    }
                    warn!(error = %e.message, retry_in_ms = delay.as_millis() as u64,
                        "device event: database unavailable; will retry");
                    tokio::select! {
                        _ = stop.cancelled() => return Disposition::Retry(e.message),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = delays.next_delay();
                }
                Err(e) => break (dead_letter_reason(e.code), e.message),
            }
        };
        warn!(routing_key = %msg.routing_key, reason = kind, error = %message, "device event dead-lettered");
        Disposition::DeadLetter { kind, message }
    }
}

/// The dead-letter reason (a closed set) of an API refusal code.
fn dead_letter_reason(code: &str) -> &'static str {
    match code {
        "missing_field" => "missing_field",
        "unknown_type" => "unknown_type",
        "bad_body" => "not_json",
        _ => "bad_field",
    }
}

async fn apply(state: &ApiState, routing_key: &str, body: &[u8]) -> Result<(), ApiError> {
    let obj = super::json_object(Ok(bytes::Bytes::copy_from_slice(body)))?;
    let kind_text = text_field(&obj, &["type"])?.unwrap_or_else(|| routing_key.to_string());
    let kind = match kind_text.as_str() {
        "device.register" => Kind::Register,
        "device.unregister" => Kind::Unregister,
        other => {
            return Err(ApiError::bad_request(
                "unknown_type",
                format!("{other:?} is not device.register or device.unregister"),
            ))
        }
    };
    let token = text_field(
        &obj,
        &["token", "voipDeviceToken", "deviceToken", "voip_token"],
    )?
    .ok_or_else(|| ApiError::bad_request("missing_field", "token is required"))?;
    match kind {
        Kind::Register => {
            let user_id = text_field(&obj, &["userId", "user_id"])?
                .ok_or_else(|| ApiError::bad_request("missing_field", "userId is required"))?;
            let bundle_id =
                state.bundle_id(text_field(&obj, &["bundleId", "bundle_id"])?.as_deref())?;
            let env = environment(&obj)?;
            let alert = alert_token(&obj)?;
            let id = register(state, &user_id, &bundle_id, &token, env).await?;
            register_alert_token(state, id, alert).await?;
        }
        Kind::Unregister => {
            let token = normalize_token(&token)?;
            let n = state.store.unregister_token(&token).await?;
            info!(token_suffix = %token_suffix(&token), removed = n, "device unregistered by event");
        }
    }
    Ok(())
}
