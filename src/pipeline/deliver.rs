//! One device of one event: claim it, push it (through the call's lock for rings),
//! learn from APNs' answer, record the outcome.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Call, Pipeline, APNS_ID_NAMESPACE, MAX_VOIP_PAYLOAD};
use crate::apns::{AttemptHooks, AttemptRecord, DeliveryOutcome, DevicePush, FinalAction};
use crate::event::{now_ms, now_rfc3339, token_suffix, EventType, PushResult, Status};
use crate::store::calls::RingPermit;
use crate::store::claims::Claim;
use crate::store::{Device, Store, StoreError};

/// How often a worker looks again at a claim another live worker holds.
const CLAIM_POLL: Duration = Duration::from_millis(250);

/// Rings: each attempt first takes the call's lock and stops if it was cancelled.
struct RingHooks<'a> {
    store: &'a Store,
    call_id: &'a str,
    device_id: i64,
    /// The first attempt's lock, taken with the claim.
    first: std::sync::Mutex<Option<RingPermit>>,
}

impl AttemptHooks for RingHooks<'_> {
    type Permit = RingPermit;

    async fn before(&self) -> Result<Option<RingPermit>, String> {
        let first = self.first.lock().expect("permit lock").take();
        if let Some(permit) = first {
            return Ok(Some(permit));
        }
        self.store
            .ring_permit(self.call_id, self.device_id, EventType::Incoming.as_str())
            .await
            .map_err(|e| e.to_string())
    }

    async fn after(&self, permit: RingPermit, attempt: AttemptRecord) {
        if let Err(e) = permit.record(&attempt).await {
            warn!(device_id = self.device_id, error = %e, "could not record the attempt");
        }
    }
}

/// Cancel pushes: always allowed, recorded for the trace.
struct CancelHooks<'a> {
    store: &'a Store,
    call_id: &'a str,
    device_id: i64,
}

impl AttemptHooks for CancelHooks<'_> {
    type Permit = ();

    async fn before(&self) -> Result<Option<()>, String> {
        Ok(Some(()))
    }

    async fn after(&self, _: (), attempt: AttemptRecord) {
        let recorded = self
            .store
            .record_attempt(
                self.call_id,
                self.device_id,
                EventType::Cancel.as_str(),
                &attempt,
            )
            .await;
        if let Err(e) = recorded {
            warn!(device_id = self.device_id, error = %e, "could not record the attempt");
        }
    }
}

impl Pipeline {
    /// Pushes to one device at most once per event, across redeliveries,
    /// duplicates and replicas (see `store::claims`). `None`: another worker
    /// published (or will publish) this device's result.
    pub(super) async fn claimed_push(
        &self,
        call: &Call<'_>,
        device: &Device,
    ) -> Result<Option<PushResult>, StoreError> {
        loop {
            let timer = self.metrics.stage("claim");
            let (claim, first) = match call.kind {
                // A ring claims in one transaction with its first attempt's lock.
                EventType::Incoming => {
                    self.store
                        .claim_for_ring(call.event_id, device.id, call.owner, &call.event.call_id)
                        .await?
                }
                EventType::Cancel => (
                    self.store
                        .claim(call.event_id, device.id, call.owner, &call.event.call_id)
                        .await?,
                    None,
                ),
            };
            drop(timer);
            if matches!(claim, Claim::Push | Claim::Republish(_)) {
                self.open_claims.add(call.event_id, device.id);
            }
            match claim {
                Claim::Push => {
                    let timer = self.metrics.stage("deliver");
                    let result = self.push_device(call, device, first).await;
                    drop(timer);
                    let _timer = self.metrics.stage("record");
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
        let recorded = super::retry::patiently("record the push in its claim", || {
            self.store.complete_claim(event_id, device_id, &stored)
        })
        .await;
        if let Err(e) = recorded {
            warn!(device_id, error = %e, "could not record the push in its claim");
        }
    }

    async fn push_device(
        &self,
        call: &Call<'_>,
        device: &Device,
        first: Option<RingPermit>,
    ) -> PushResult {
        let apns_id = uuid::Uuid::new_v5(
            &APNS_ID_NAMESPACE,
            format!("{}/{}", call.event_id, device.id).as_bytes(),
        );
        let suffix = token_suffix(&device.token);
        let started = Instant::now();
        let base = PushResult {
            device_id: Some(device.id),
            token_suffix: Some(suffix.clone()),
            apns_id: Some(apns_id.to_string()),
            ..call.base.clone()
        };
        if call.payload.len() > MAX_VOIP_PAYLOAD {
            // APNs would answer 413; refusing here keeps a request we know is bad
            // off the connection.
            warn!(
                bytes = call.payload.len(),
                "VoIP payload over APNs' 5120-byte limit; not sent"
            );
            return PushResult {
                status: Status::Failed,
                reason: Some("PayloadTooLarge".into()),
                completed_at: now_rfc3339(),
                ..base
            };
        }
        let push = DevicePush {
            token: &device.token,
            environment: device.environment,
            apns_id,
            collapse_id: &call.event.call_id,
            payload: call.payload.clone(),
            deadline: call.deadline,
            expiration_unix: (call.expires_at_ms as u64).div_ceil(1000),
            proven: device.proven,
        };
        let (store, call_id, device_id) = (&self.store, call.event.call_id.as_str(), device.id);
        let out = match call.kind {
            EventType::Incoming => {
                let hooks = RingHooks {
                    store,
                    call_id,
                    device_id,
                    first: std::sync::Mutex::new(first),
                };
                self.apns
                    .deliver(call.app, &push, &hooks, &self.metrics)
                    .await
            }
            EventType::Cancel => {
                let hooks = CancelHooks {
                    store,
                    call_id,
                    device_id,
                };
                self.apns
                    .deliver(call.app, &push, &hooks, &self.metrics)
                    .await
            }
        };
        // A ring's success was recorded with its attempt, in the call's transaction.
        let success_recorded = call.kind == EventType::Incoming && device.id > 0;
        let status = self.learn(device, &out, success_recorded).await;
        if status == Status::Delivered && call.kind == EventType::Incoming {
            let e2e = (now_ms() - call.sent_at_ms).max(0) as f64 / 1000.0;
            self.metrics.end_to_end.observe(e2e);
        }
        let last = out.last.as_ref();
        info!(device_id = device.id, token = %suffix, status = status.as_str(),
            environment = out.environment.as_str(), attempts = out.attempts,
            fallback = out.fallback_used, "delivery finished");
        PushResult {
            status,
            environment: Some(out.environment),
            fallback_used: out.fallback_used,
            apns_id: Some(
                last.and_then(|r| r.apns_id.clone())
                    .unwrap_or_else(|| apns_id.to_string()),
            ),
            apns_status: last.map(|r| r.status),
            reason: match out.action {
                FinalAction::Cancelled => Some("call cancelled".into()),
                _ => last
                    .and_then(|r| r.reason.clone())
                    .or(out.last_error.clone()),
            },
            attempts: out.attempts,
            latency_ms: Some(started.elapsed().as_millis() as u64),
            completed_at: now_rfc3339(),
            ..base
        }
    }

    /// Applies what APNs taught us about the token; returns the result status.
    /// A database error here is logged, not retried: the push already happened, and
    /// re-running the event would ring the phone again.
    async fn learn(
        &self,
        device: &Device,
        out: &DeliveryOutcome,
        success_recorded: bool,
    ) -> Status {
        let reason = out
            .last
            .as_ref()
            .and_then(|r| r.reason.clone())
            .unwrap_or_else(|| "unknown".into());
        let result: Result<Status, StoreError> = async {
            Ok(match out.action {
                FinalAction::Delivered => {
                    if !success_recorded {
                        self.store
                            .record_success(device.id, out.environment)
                            .await?;
                    }
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
                FinalAction::Cancelled => Status::Cancelled,
            })
        }
        .await;
        result.unwrap_or_else(|e| {
            warn!(device_id = device.id, error = %e, "could not record the delivery outcome");
            match out.action {
                FinalAction::Delivered => Status::Delivered,
                FinalAction::Expired => Status::Expired,
                FinalAction::Cancelled => Status::Cancelled,
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
}
