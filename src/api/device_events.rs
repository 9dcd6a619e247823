//! Device registration over RabbitMQ, for backends that already publish events:
//! `device.register` / `device.unregister` on the `voip.devices` topic exchange,
//! consumed from the quorum queue `voip-push.devices`. The body is the one of
//! `PUT /v1/devices` (`{"userId","token","bundleId"?,"environment"?}`; for an
//! unregister only `token` matters) and the same rules apply. An event that
//! cannot be applied goes to `voip-push.devices.dead` with its reason; one that
//! meets database faults is retried, held, for `worker.retry_cap_secs`.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::ExchangeKind;
use lapin::ExchangeKind::Fanout;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::devices::{alert_token, environment, register, register_alert_token};
use super::{text_field, ApiError, ApiState};
use crate::amqp::{connect, consume, declare_exchange, declare_quorum_queue, AmqpError, RECONNECT};
use crate::event::token_suffix;
use crate::retry_policy::RetryPolicy;
use crate::store::normalize_token;

/// Registrations are tiny and each is one upsert: a handful in flight is plenty.
const PREFETCH: u16 = 16;
/// First pause before a registration that met a database fault is tried again
/// (doubling up to [`MAX_RETRY_PAUSE`]), so an outage is not a hot loop.
const DB_RETRY_PAUSE: Duration = Duration::from_secs(1);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(15);

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Register,
    Unregister,
}

/// Consumes registration events until `shutdown`, reconnecting after broker
/// failures. Does nothing when `devices.queue` is empty.
pub async fn run(state: ApiState, shutdown: CancellationToken) {
    if state.cfg.devices.queue.is_empty() {
        return;
    }
    let mut delays = RECONNECT.delays();
    while !shutdown.is_cancelled() {
        match session(&state, &shutdown, &mut || delays = RECONNECT.delays()).await {
            Ok(true) => return,
            Ok(false) => warn!("device events: the broker ended the consumer; reconnecting"),
            Err(e) => {
                let delay = delays.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "device events: cannot consume; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// One connection's life: `Ok(true)` at shutdown, `Ok(false)` when the broker
/// ended the consumer. `connected` resets the reconnect backoff.
async fn session(
    state: &ApiState,
    shutdown: &CancellationToken,
    connected: &mut (dyn FnMut() + Send),
) -> Result<bool, AmqpError> {
    let cfg = &state.cfg.devices;
    let conn = connect(&state.cfg.amqp, "device events").await?;
    let ch = conn.create_channel().await?;
    declare_exchange(&ch, &cfg.exchange, ExchangeKind::Topic).await?;
    declare_exchange(&ch, &cfg.dead_letter_exchange, Fanout).await?;
    declare_quorum_queue(
        &ch,
        &cfg.dead_letter_queue,
        FieldTable::default(),
        &cfg.dead_letter_exchange,
        "",
    )
    .await?;
    declare_quorum_queue(
        &ch,
        &cfg.queue,
        FieldTable::default(),
        &cfg.exchange,
        "device.*",
    )
    .await?;
    let mut consumer = consume(&ch, &cfg.queue, PREFETCH).await?;
    connected();
    info!(queue = %cfg.queue, exchange = %cfg.exchange, "consuming device registration events");
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = conn.close(200, "shutdown".into()).await;
                return Ok(true);
            }
            n = consumer.next() => n,
        };
        match next {
            Some(Ok(d)) => settle(state, d, shutdown).await?,
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(false),
        }
    }
}

/// Applies one event and acknowledges it. A malformed one is dead-lettered with
/// its reason; a database fault is retried with the message held, then
/// dead-lettered as `retry_exhausted`; at shutdown it returns to the queue.
async fn settle(
    state: &ApiState,
    d: Delivery,
    shutdown: &CancellationToken,
) -> Result<(), AmqpError> {
    let started = Instant::now();
    let mut delays = RetryPolicy::doubling(DB_RETRY_PAUSE, MAX_RETRY_PAUSE).delays();
    let mut delay = delays.next_delay();
    let (reason, detail) = loop {
        match apply(state, d.routing_key.as_str(), &d.data).await {
            Ok(()) => {
                d.acker.ack(BasicAckOptions::default()).await?;
                return Ok(());
            }
            Err(e) if e.status.is_server_error() => {
                if started.elapsed() + delay >= state.cfg.worker.retry_cap() {
                    break ("retry_exhausted", e.message);
                }
                warn!(error = %e.message, retry_in_ms = delay.as_millis() as u64,
                    "device event: database unavailable; will retry");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = delays.next_delay();
            }
            Err(e) => break (dead_letter_reason(e.code), e.message),
        }
    };
    warn!(routing_key = %d.routing_key, reason, error = %detail, "device event dead-lettered");
    state.metrics.dead_lettered("devices", reason);
    let exchange = &state.cfg.devices.dead_letter_exchange;
    if let Err(e) =
        crate::amqp::dead_letter::publish(&state.publisher, exchange, &d, reason, &detail).await
    {
        // The queue has no dead-letter policy of its own: the event is dropped,
        // and said so.
        error!(error = %e, "could not dead-letter a device event; it is dropped");
        d.acker
            .reject(BasicRejectOptions { requeue: false })
            .await?;
        return Ok(());
    }
    d.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
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
