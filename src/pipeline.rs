//! The only place that knows the business steps of one call event:
//! parse → resolve devices → send with fallback/retry → record → publish → settle.
//!
//! `handle` returns a [`Disposition`]; the consumer settles the message exactly once
//! from it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tracing::{info, info_span, warn, Instrument};

use crate::amqp::Publisher;
use crate::apns::{Apns, App, DeliveryOutcome, FinalAction};
use crate::config::Config;
use crate::event::{
    now_ms, now_rfc3339, token_suffix, CallEvent, EventType, InvalidEvent, InvalidKind, PushResult,
    Status,
};
use crate::metrics::Metrics;
use crate::store::claims::Claim;
use crate::store::{Device, Store, StoreError};

/// A message as taken from the queue.
#[derive(Clone, Debug, Default)]
pub struct Incoming {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    /// AMQP `timestamp` property, UNIX seconds.
    pub timestamp: Option<u64>,
    /// The owner recorded on this message's delivery claims: the worker's id and
    /// a sequence number, so two copies of one event in one worker still exclude
    /// each other.
    pub claim_owner: String,
}

/// How the consumer settles a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Handled; every result is confirmed by the broker.
    Ack,
    /// Could not be handled now (database or broker trouble): back to the queue
    /// after a pause.
    Retry(String),
    /// Never handleable: to the dead-letter queue with this reason.
    DeadLetter { kind: &'static str, message: String },
}

/// Namespace of the stable `apns-id`s: UUIDv5(namespace, event id + device id), so
/// every attempt for one (event, device) carries the same id.
const APNS_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1d_3c2a_8b47_4e0f_9a61_2d5c_7e80_b934);

pub struct Pipeline {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub apns: Arc<Apns>,
    pub publisher: Arc<Publisher>,
    pub metrics: Metrics,
}

/// Publishing results is retried this long (the publisher reconnects in between)
/// before the event is returned to the queue.
/// APNs' limit for VoIP payloads (4096 for other push types).
pub const MAX_VOIP_PAYLOAD: usize = 5120;

/// How long recording a finished push is retried (a database restart takes a
/// few seconds).
const COMPLETE_CLAIM_PATIENCE: Duration = Duration::from_secs(30);

/// How often a worker looks again at a claim another live worker holds.
const CLAIM_POLL: Duration = Duration::from_millis(250);

/// Everything the pushes of one call event share.
struct Call<'a> {
    app: &'a App,
    event: &'a CallEvent,
    event_id: &'a str,
    payload: bytes::Bytes,
    deadline: Instant,
    expires_at_ms: i64,
    sent_at_ms: i64,
    base: &'a PushResult,
    /// Who claims the deliveries (this worker and this message).
    owner: &'a str,
}

const RESULT_PUBLISH_PATIENCE: Duration = Duration::from_secs(30);

impl Pipeline {
    pub async fn handle(&self, msg: &Incoming) -> Disposition {
        let event = match CallEvent::parse(&msg.body) {
            Ok(e) => e,
            Err(invalid) => return self.refuse(msg, invalid).await,
        };
        let span =
            info_span!("event", call_id = %event.call_id, event_type = event.event_type.as_str());
        self.handle_event(msg, event).instrument(span).await
    }

    async fn handle_event(&self, msg: &Incoming, event: CallEvent) -> Disposition {
        let event_id = event_id(msg, &event);
        if event.event_type == EventType::Cancel {
            // Cancel handling (suppressing rings, cancel pushes) needs call state;
            // until it lands a cancel is acknowledged and counted, never pushed.
            info!("call.cancel received; no push is sent for it");
            self.metrics.events.with_label_values(&["cancel"]).inc();
            return Disposition::Ack;
        }
        let Some(app) = self.apns.app(event.bundle_id.as_deref()) else {
            let invalid = InvalidEvent {
                kind: InvalidKind::BadField,
                message: format!(
                    "bundleId {:?} is not a configured app",
                    event.bundle_id.as_deref().unwrap_or("")
                ),
                call_id: Some(event.call_id.clone()),
            };
            return self.refuse(msg, invalid).await;
        };

        let sent_at_ms = event
            .sent_at_ms
            .or(msg.timestamp.map(|s| s as i64 * 1000))
            .unwrap_or_else(now_ms);
        let ring_secs = event
            .ring_timeout_secs
            .unwrap_or(self.cfg.worker.ring_timeout_secs);
        let expires_at_ms = sent_at_ms + ring_secs as i64 * 1000;

        let devices = match self
            .store
            .live_devices(&event.to_user_id, &app.config.bundle_id)
            .await
        {
            Ok(d) => d,
            Err(e) => return self.retry("resolve devices", e),
        };
        let base = PushResult {
            event_id: event_id.clone(),
            event_type: event.event_type.as_str().into(),
            call_id: Some(event.call_id.clone()),
            to_user_id: Some(event.to_user_id.clone()),
            device_id: None,
            token_suffix: None,
            bundle_id: Some(app.config.bundle_id.clone()),
            status: Status::NoDevice,
            environment: None,
            fallback_used: false,
            apns_id: None,
            apns_status: None,
            reason: None,
            attempts: 0,
            latency_ms: None,
            completed_at: String::new(),
        };

        let remaining_ms = expires_at_ms - now_ms();
        let results: Vec<PushResult> = if devices.is_empty() {
            info!(to_user_id = %event.to_user_id, "user has no live device for this app");
            vec![PushResult {
                completed_at: now_rfc3339(),
                ..base
            }]
        } else if remaining_ms <= 0 {
            warn!(
                late_ms = -remaining_ms,
                "call event arrived after its ring deadline; not pushed"
            );
            devices
                .iter()
                .map(|d| PushResult {
                    device_id: Some(d.id),
                    token_suffix: Some(token_suffix(&d.token)),
                    status: Status::Expired,
                    reason: Some("ring deadline passed before the event was handled".into()),
                    completed_at: now_rfc3339(),
                    ..base.clone()
                })
                .collect()
        } else {
            let deadline = Instant::now() + Duration::from_millis(remaining_ms as u64);
            let payload =
                bytes::Bytes::from(event.device_payload(sent_at_ms, expires_at_ms).to_string());
            let call = Call {
                app,
                event: &event,
                event_id: &event_id,
                payload,
                deadline,
                expires_at_ms,
                sent_at_ms,
                base: &base,
                owner: &msg.claim_owner,
            };
            let claimed = join_all(devices.iter().map(|d| self.claimed_push(&call, d))).await;
            let mut results = Vec::with_capacity(claimed.len());
            for r in claimed {
                match r {
                    Ok(Some(result)) => results.push(result),
                    Ok(None) => {}
                    Err(e) => return self.retry("claim a delivery", e),
                }
            }
            results
        };

        for r in &results {
            let env = r.environment.map(|e| e.as_str()).unwrap_or("none");
            self.metrics
                .deliveries
                .with_label_values(&[r.status.as_str(), env])
                .inc();
        }
        if let Err(e) = self.publish_results(&results).await {
            return Disposition::Retry(format!("publish results: {e}"));
        }
        let published: Vec<i64> = results.iter().filter_map(|r| r.device_id).collect();
        if !published.is_empty() {
            if let Err(e) = self.store.mark_published(&event_id, &published).await {
                // Harmless: a redelivery would re-publish the stored results, never push.
                warn!(error = %e, "could not mark results as published");
            }
        }
        let outcome = if results.iter().any(|r| r.status == Status::Delivered) {
            "delivered"
        } else {
            results
                .first()
                .map(|r| r.status.as_str())
                .unwrap_or("no_device")
        };
        self.metrics.events.with_label_values(&[outcome]).inc();
        Disposition::Ack
    }

    /// Pushes to one device at most once per event, across redeliveries,
    /// duplicates and replicas (see `store::claims`). `None`: another worker
    /// published (or will publish) this device's result.
    async fn claimed_push(
        &self,
        call: &Call<'_>,
        device: &Device,
    ) -> Result<Option<PushResult>, StoreError> {
        loop {
            match self
                .store
                .claim(call.event_id, device.id, call.owner)
                .await?
            {
                Claim::Push => {
                    let result = self.push_device(call, device).await;
                    self.complete_claim(call.event_id, device.id, &result).await;
                    return Ok(Some(result));
                }
                Claim::Republish(stored) => {
                    info!(
                        device_id = device.id,
                        "already pushed by an earlier attempt; re-publishing its result"
                    );
                    self.metrics
                        .retries
                        .with_label_values(&["redelivered"])
                        .inc();
                    return Ok(serde_json::from_value(stored).ok());
                }
                Claim::Done => {
                    info!(
                        device_id = device.id,
                        "already pushed and published; skipping"
                    );
                    return Ok(None);
                }
                Claim::Busy => {
                    // Another live worker is pushing this device for this event (a
                    // duplicate message); it publishes the result. Wait in case it
                    // dies and its lease lapses.
                    if Instant::now() >= call.deadline {
                        return Ok(None);
                    }
                    tokio::time::sleep(CLAIM_POLL).await;
                }
            }
        }
    }

    /// Records a push's outcome in its claim. The push already happened, so this
    /// is retried through a short database outage: until it is recorded, a retry of
    /// the event would push the device again.
    async fn complete_claim(&self, event_id: &str, device_id: i64, result: &PushResult) {
        let stored = serde_json::to_value(result).expect("results serialise");
        let mut delay = Duration::from_millis(100);
        let started = Instant::now();
        loop {
            match self
                .store
                .complete_claim(event_id, device_id, &stored)
                .await
            {
                Ok(()) => return,
                Err(e) if started.elapsed() < COMPLETE_CLAIM_PATIENCE => {
                    warn!(device_id, error = %e, "could not record the push yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    warn!(device_id, error = %e, "could not record the push in its claim");
                    return;
                }
            }
        }
    }

    async fn push_device(&self, call: &Call<'_>, device: &Device) -> PushResult {
        let Call {
            app,
            event,
            event_id,
            ref payload,
            deadline,
            expires_at_ms,
            sent_at_ms,
            base,
            owner: _,
        } = *call;
        let payload = payload.clone();
        let apns_id = uuid::Uuid::new_v5(
            &APNS_ID_NAMESPACE,
            format!("{event_id}/{}", device.id).as_bytes(),
        );
        let suffix = token_suffix(&device.token);
        let started = Instant::now();
        if payload.len() > MAX_VOIP_PAYLOAD {
            // APNs would answer 413; refusing here keeps a request we know is bad
            // off the connection.
            warn!(
                bytes = payload.len(),
                "VoIP payload over APNs' 5120-byte limit; not sent"
            );
            return PushResult {
                device_id: Some(device.id),
                token_suffix: Some(suffix),
                status: Status::Failed,
                reason: Some("PayloadTooLarge".into()),
                apns_id: Some(apns_id.to_string()),
                completed_at: now_rfc3339(),
                ..base.clone()
            };
        }
        let out = self
            .apns
            .deliver(
                app,
                &device.token,
                device.environment,
                apns_id,
                &event.call_id,
                payload,
                deadline,
                (expires_at_ms as u64).div_ceil(1000),
                &self.metrics,
            )
            .await;
        let status = self.record(device, &out).await;
        if status == Status::Delivered {
            let e2e = (now_ms() - sent_at_ms).max(0) as f64 / 1000.0;
            self.metrics.end_to_end.observe(e2e);
        }
        let last = out.last.as_ref();
        info!(device_id = device.id, token = %suffix, status = status.as_str(),
            environment = out.environment.as_str(), attempts = out.attempts,
            fallback = out.fallback_used, "delivery finished");
        PushResult {
            device_id: Some(device.id),
            token_suffix: Some(suffix),
            status,
            environment: Some(out.environment),
            fallback_used: out.fallback_used,
            apns_id: Some(
                last.and_then(|r| r.apns_id.clone())
                    .unwrap_or_else(|| apns_id.to_string()),
            ),
            apns_status: last.map(|r| r.status),
            reason: last
                .and_then(|r| r.reason.clone())
                .or(out.last_error.clone()),
            attempts: out.attempts,
            latency_ms: Some(started.elapsed().as_millis() as u64),
            completed_at: now_rfc3339(),
            ..base.clone()
        }
    }

    /// Applies what APNs taught us about the token; returns the result status.
    /// A database error here is logged, not retried: the push already happened, and
    /// re-running the event would ring the phone again.
    async fn record(&self, device: &Device, out: &DeliveryOutcome) -> Status {
        let reason = out
            .last
            .as_ref()
            .and_then(|r| r.reason.clone())
            .unwrap_or_else(|| "unknown".into());
        let result: Result<Status, StoreError> = async {
            Ok(match out.action {
                FinalAction::Delivered => {
                    self.store
                        .record_success(device.id, out.environment)
                        .await?;
                    Status::Delivered
                }
                FinalAction::Invalidate => {
                    self.store.invalidate(device.id, &reason, None).await?;
                    self.count_invalidation(&reason);
                    Status::TokenInvalidated
                }
                FinalAction::Unregistered => {
                    let at = out.last.as_ref().and_then(|r| r.timestamp_ms);
                    if self
                        .store
                        .invalidate(device.id, &reason, at.or(Some(now_ms())))
                        .await?
                    {
                        self.count_invalidation(&reason);
                        Status::TokenInvalidated
                    } else {
                        info!(
                            device_id = device.id,
                            "410 predates the token's latest registration; token kept"
                        );
                        Status::Failed
                    }
                }
                FinalAction::Failed => Status::Failed,
                FinalAction::Expired => Status::Expired,
            })
        }
        .await;
        result.unwrap_or_else(|e| {
            warn!(device_id = device.id, error = %e, "could not record the delivery outcome");
            match out.action {
                FinalAction::Delivered => Status::Delivered,
                FinalAction::Expired => Status::Expired,
                _ => Status::Failed,
            }
        })
    }

    fn count_invalidation(&self, reason: &str) {
        self.metrics
            .tokens_invalidated
            .with_label_values(&[crate::apns::outcome::reason_label(Some(reason))])
            .inc();
    }

    /// A malformed event: an `invalid_event` result when a call id was readable,
    /// then the dead-letter queue.
    async fn refuse(&self, msg: &Incoming, invalid: InvalidEvent) -> Disposition {
        warn!(kind = invalid.kind.label(), call_id = invalid.call_id.as_deref().unwrap_or(""),
            error = %invalid.message, "refusing malformed call event");
        if let Some(call_id) = &invalid.call_id {
            let result = PushResult {
                event_id: msg
                    .message_id
                    .clone()
                    .unwrap_or_else(|| stable_event_id(call_id, "invalid")),
                event_type: EventType::Incoming.as_str().into(),
                call_id: Some(call_id.clone()),
                to_user_id: None,
                device_id: None,
                token_suffix: None,
                bundle_id: None,
                status: Status::InvalidEvent,
                environment: None,
                fallback_used: false,
                apns_id: None,
                apns_status: None,
                reason: Some(invalid.to_string()),
                attempts: 0,
                latency_ms: None,
                completed_at: now_rfc3339(),
            };
            self.metrics
                .deliveries
                .with_label_values(&["invalid_event", "none"])
                .inc();
            if let Err(e) = self.publish_results(std::slice::from_ref(&result)).await {
                return Disposition::Retry(format!("publish invalid_event result: {e}"));
            }
        }
        self.metrics.events.with_label_values(&["invalid"]).inc();
        Disposition::DeadLetter {
            kind: invalid.kind.label(),
            message: invalid.message,
        }
    }

    fn retry(&self, step: &str, e: StoreError) -> Disposition {
        warn!(step, error = %e, "event could not be handled now; it will be retried");
        self.metrics.events.with_label_values(&["retried"]).inc();
        Disposition::Retry(format!("{step}: {e}"))
    }

    /// Publishes every result and waits for the broker's confirms, retrying (with
    /// reconnects) for a while before giving up.
    async fn publish_results(&self, results: &[PushResult]) -> Result<(), String> {
        let exchange = &self.cfg.amqp.results_exchange;
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut pending: Vec<&PushResult> = results.iter().collect();
        loop {
            let outcomes = join_all(pending.iter().map(|r| async move {
                let body = serde_json::to_vec(r).expect("results serialise");
                let key = format!("push.{}", r.status.as_str());
                self.publisher
                    .publish_json(exchange, &key, &body, None)
                    .await
            }))
            .await;
            let mut failed = Vec::new();
            let mut last_error = String::new();
            for (r, outcome) in pending.iter().zip(outcomes) {
                match outcome {
                    Ok(()) => self
                        .metrics
                        .results_published
                        .with_label_values(&[r.status.as_str()])
                        .inc(),
                    Err(e) => {
                        last_error = e.to_string();
                        failed.push(*r);
                    }
                }
            }
            if failed.is_empty() {
                return Ok(());
            }
            if started.elapsed() > RESULT_PUBLISH_PATIENCE {
                return Err(last_error);
            }
            warn!(failed = failed.len(), error = %last_error, "result publish failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            pending = failed;
        }
    }
}

/// The event's id: the producer's `message_id`, or one derived from the call id
/// and type so a redelivery gets the same id.
fn event_id(msg: &Incoming, event: &CallEvent) -> String {
    match &msg.message_id {
        Some(id) if !id.is_empty() => id.clone(),
        _ => stable_event_id(&event.call_id, event.event_type.as_str()),
    }
}

fn stable_event_id(call_id: &str, kind: &str) -> String {
    uuid::Uuid::new_v5(&APNS_ID_NAMESPACE, format!("{call_id}/{kind}").as_bytes()).to_string()
}
