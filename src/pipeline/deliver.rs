//! One device of one event: push it (a ring looks at its call before every
//! attempt after the first), learn from APNs' answer, and hand back the result
//! with the outcome to record once it is published.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tracing::{info, warn};

use super::publish::Outgoing;
use super::DeliveryStore;
use super::{Call, Pipeline, APNS_ID_NAMESPACE};
use crate::apns::{
    classify, Action, App, AttemptHooks, AttemptRecord, DeliveryOutcome, DevicePush, FinalAction,
    PushType,
};
use crate::event::{now_ms, now_rfc3339, token_suffix, Environment, EventType, PushResult, Status};
use crate::store::claims::{Claim, JsonText, Outcome};
use crate::store::{Device, StoreError};

/// Collects a delivery's attempts (recorded with its outcome). For a ring, every
/// attempt after the first is preceded by a look at the call: a cancel recorded
/// since stops it. The first was admitted with the claim.
struct Hooks<'a> {
    store: &'a dyn DeliveryStore,
    call_id: &'a str,
    /// A ring: look at the call before further attempts.
    ring: bool,
    first: AtomicBool,
    attempts: Mutex<Vec<AttemptRecord>>,
}

impl AttemptHooks for Hooks<'_> {
    type Permit = ();

    async fn before(&self) -> Result<Option<()>, String> {
        if !self.ring || self.first.swap(false, Ordering::Relaxed) {
            return Ok(Some(()));
        }
        match self.store.is_cancelled(self.call_id).await {
            Ok(true) => Ok(None),
            Ok(false) => Ok(Some(())),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn after(&self, _: (), attempt: AttemptRecord) {
        self.attempts.lock().expect("attempts lock").push(attempt);
    }
}

/// A device's result to publish, and the outcome to record with it once the
/// broker has confirmed it (`None`: recorded before, re-published).
pub(super) struct ToPublish {
    pub out: Outgoing,
    pub outcome: Option<Outcome>,
}

/// A push's result with what is recorded alongside it.
struct Pushed {
    result: PushResult,
    attempts: Vec<AttemptRecord>,
    /// The environment that accepted the token.
    success: Option<Environment>,
}

/// The result of a device claimed after the ring deadline: never pushed.
fn expired_unpushed(call: &Call<'_>, device: &Device) -> Pushed {
    Pushed {
        result: PushResult {
            device_id: Some(device.id),
            token_suffix: Some(token_suffix(&device.token)),
            status: Status::Expired,
            reason: Some("ring deadline passed before the event was handled".into()),
            completed_at: now_rfc3339(),
            ..call.base.clone()
        },
        attempts: Vec::new(),
        success: None,
    }
}

impl Pipeline {
    /// Pushes to one device at most once per event, across redeliveries,
    /// duplicates and replicas, from what its claim found (see `store::claims`).
    /// `None`: another worker published (or will publish) this device's result.
    pub(super) async fn claimed_push(
        &self,
        call: &Call<'_>,
        device: &Device,
        claim: Claim,
    ) -> Option<ToPublish> {
        match claim {
            Claim::Push => {
                let timer = self.metrics.stage("deliver");
                let pushed = if call.late {
                    expired_unpushed(call, device)
                } else {
                    self.push_device(call, device).await
                };
                drop(timer);
                let out = Outgoing::new(pushed.result);
                let outcome = Outcome {
                    device_id: device.id,
                    call_id: call.event.call_id.clone(),
                    event_type: call.kind.as_str(),
                    result: JsonText(out.body.clone()),
                    attempts: pushed.attempts,
                    success: pushed.success,
                };
                Some(ToPublish {
                    out,
                    outcome: Some(outcome),
                })
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
                let out = serde_json::from_value(stored).ok().map(Outgoing::new)?;
                Some(ToPublish { out, outcome: None })
            }
            Claim::Done => {
                info!(
                    device_id = device.id,
                    "already pushed and published; skipping"
                );
                None
            }
            Claim::Busy => {
                // A copy of this event on a live worker holds the claim and
                // publishes the result; the event is looked at again later
                // (`Disposition::Wait`) in case that worker dies first.
                info!(
                    device_id = device.id,
                    "another live worker is pushing this device; looking again later"
                );
                None
            }
            // Only a cancelled call's ring finds these, and it pushes none.
            Claim::Unclaimed => None,
        }
    }

    async fn push_device(&self, call: &Call<'_>, device: &Device) -> Pushed {
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
        if call.payload.len() > call.push_type.max_payload() {
            // APNs would answer 413; refusing here keeps a request we know is bad
            // off the connection.
            warn!(
                bytes = call.payload.len(),
                push_type = call.push_type.as_str(),
                "payload over APNs' limit for its push type; not sent"
            );
            return Pushed {
                result: PushResult {
                    status: Status::Failed,
                    reason: Some("PayloadTooLarge".into()),
                    completed_at: now_rfc3339(),
                    ..base
                },
                attempts: Vec::new(),
                success: None,
            };
        }
        let push = DevicePush {
            push_type: call.push_type,
            token: &device.token,
            environment: device.environment,
            apns_id,
            collapse_id: &call.event.call_id,
            payload: call.payload.clone(),
            deadline: call.deadline,
            expiration_unix: (call.expires_at_ms as u64).div_ceil(1000),
            proven: device.proven,
        };
        let hooks = Hooks {
            store: &*self.store,
            call_id: &call.event.call_id,
            ring: call.kind == EventType::Incoming,
            first: AtomicBool::new(true),
            attempts: Mutex::new(Vec::new()),
        };
        let out = self
            .apns
            .deliver(call.app, &push, &hooks, &self.metrics)
            .await;
        let status = match call.push_type {
            PushType::Voip => self.learn(call.app, device, &out).await,
            PushType::Alert => self.learn_alert(call.app, device, &out).await,
        };
        if status == Status::Delivered && call.kind == EventType::Incoming {
            let e2e = (now_ms() - call.sent_at_ms).max(0) as f64 / 1000.0;
            self.metrics.end_to_end.observe(e2e);
        }
        let last = out.last.as_ref();
        info!(device_id = device.id, token = %suffix, status = status.as_str(),
            environment = out.environment.as_str(), attempts = out.attempts,
            fallback = out.fallback_used, "delivery finished");
        let result = PushResult {
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
        };
        Pushed {
            result,
            attempts: hooks.attempts.into_inner().expect("attempts lock"),
            // A success the device's row already says (recently, in this
            // environment) is not recorded again.
            success: (out.action == FinalAction::Delivered)
                .then_some(out.environment)
                .filter(|env| !(device.success_is_recent && device.environment == Some(*env))),
        }
    }

    /// Applies what APNs taught us about the token; returns the result status.
    /// (A success is recorded with the outcome.) A database error here is logged,
    /// not retried: the push already happened, and re-running the event would
    /// ring the phone again.
    async fn learn(&self, app: &App, device: &Device, out: &DeliveryOutcome) -> Status {
        let reason = out
            .last
            .as_ref()
            .and_then(|r| r.reason.clone())
            .unwrap_or_else(|| "unknown".into());
        let result: Result<Status, StoreError> = async {
            Ok(match out.action {
                FinalAction::Delivered => {
                    self.proven(app, device, out.environment);
                    Status::Delivered
                }
                FinalAction::Invalidate => self.token_refused(app, device, out, &reason).await?,
                FinalAction::Unregistered => {
                    let at = out.last.as_ref().and_then(|r| r.timestamp_ms);
                    if self
                        .store
                        .invalidate(device.id, &reason, at.or(Some(now_ms())))
                        .await?
                    {
                        self.metrics.token_invalidated(&reason);
                        Status::TokenInvalidated
                    } else {
                        info!(
                            device_id = device.id,
                            "410 predates the token's latest registration; token kept"
                        );
                        Status::Failed
                    }
                }
                FinalAction::Failed => match out.last.as_ref() {
                    Some(r) if classify(r.status, r.reason.as_deref()) == Action::Misconfigured => {
                        self.app_refused(app, device)
                    }
                    _ => Status::Failed,
                },
                FinalAction::Expired => Status::Expired,
                FinalAction::Cancelled => Status::Cancelled,
            })
        }
        .await;
        result.unwrap_or_else(|e| {
            warn!(device_id = device.id, error = %e, "could not record the delivery outcome");
            match out.action {
                FinalAction::Expired => Status::Expired,
                FinalAction::Cancelled => Status::Cancelled,
                _ => Status::Failed,
            }
        })
    }
}
