//! The only place that knows the business steps of one call event:
//! parse → open the call → resolve devices → claim → push with fallback/retry →
//! record → publish → settle.
//!
//! `handle` returns a [`Disposition`]; the driver (`crate::worker`) settles the
//! message exactly once from it. `deliver.rs` has the per-device steps,
//! `publish.rs` the results.

mod cancel;
mod deliver;
mod edges;
#[cfg(test)]
mod fakes;
mod ids;
mod publish;
mod retry;
mod suspect;
#[cfg(test)]
mod tests;

pub use edges::DeliveryStore;
use ids::{base_result, call_state, claim_key, event_id};
use publish::Outgoing;
pub use publish::ResultPublisher;
// What the pipeline takes and returns are the driver's.
pub use crate::worker::{Disposition, Incoming};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tracing::{info, info_span, warn, Instrument};

use crate::apns::{Apns, App};
use crate::config::Config;
use crate::event::{
    now_ms, now_rfc3339, token_suffix, CallEvent, EventType, InvalidEvent, InvalidKind, PushResult,
    Status,
};
use crate::metrics::Metrics;
use crate::store::admit::Ring;
use crate::store::calls::CallState;
use crate::store::claims::{Claim, Finished};
use crate::store::Device;

/// Namespace of the stable `apns-id`s: UUIDv5(namespace, event id + device id), so
/// every attempt for one (event, device) carries the same id.
const APNS_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1d_3c2a_8b47_4e0f_9a61_2d5c_7e80_b934);

/// APNs' limit for VoIP payloads (4096 for other push types).
pub const MAX_VOIP_PAYLOAD: usize = 5120;

pub struct Pipeline {
    pub cfg: Arc<Config>,
    /// Devices, calls and claims (`store::Store`, Postgres).
    pub store: Arc<dyn DeliveryStore>,
    pub apns: Arc<Apns>,
    /// Where results go (the pipeline knows no broker).
    pub results: Arc<dyn ResultPublisher>,
    pub metrics: Metrics,
}

/// Everything the pushes of one event share.
struct Call<'a> {
    app: &'a App,
    event: &'a CallEvent,
    /// Rings or cancel pushes.
    kind: EventType,
    event_id: &'a str,
    /// The key of its delivery claims.
    key: &'a str,
    payload: bytes::Bytes,
    /// VoIP, or an alert (a cancel's missed-call notice, `cancel.rs`).
    push_type: crate::apns::PushType,
    deadline: Instant,
    expires_at_ms: i64,
    sent_at_ms: i64,
    base: &'a PushResult,
    /// Who claims the deliveries (this worker and this message).
    owner: &'a str,
    /// Admitted after its ring deadline: the devices this copy claims get an
    /// `expired` result, unpushed.
    late: bool,
}

impl<'a> Call<'a> {
    /// The pushes of `event` (rings or cancel pushes, by its type) with its
    /// (event id, claim key), for `msg`'s claims, in its (start, deadline) window.
    fn new(
        app: &'a App,
        event: &'a CallEvent,
        (event_id, key): (&'a str, &'a str),
        base: &'a PushResult,
        msg: &'a Incoming,
        (sent_at_ms, expires_at_ms): (i64, i64),
    ) -> Self {
        let owner = msg.claim_owner.as_str();
        let remaining_ms = (expires_at_ms - now_ms()).max(0) as u64;
        Call {
            app,
            event,
            kind: event.event_type,
            event_id,
            key,
            payload: event.device_payload_bytes(sent_at_ms, expires_at_ms),
            push_type: crate::apns::PushType::Voip,
            deadline: Instant::now() + Duration::from_millis(remaining_ms),
            expires_at_ms,
            sent_at_ms,
            base,
            owner,
            late: false,
        }
    }
}

impl Pipeline {
    pub async fn handle(&self, msg: &Incoming) -> Disposition {
        let event = match CallEvent::parse_with(&msg.body, &self.cfg.worker.limits()) {
            Ok(e) => e,
            Err(invalid) => return self.refuse(msg, invalid).await,
        };
        let span =
            info_span!("event", call_id = %event.call_id, event_type = event.event_type.as_str());
        async {
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
            match event.event_type {
                EventType::Incoming => self.initiate(msg, &event, app).await,
                EventType::Cancel => self.cancel(msg, &event, app).await,
            }
        }
        .instrument(span)
        .await
    }

    /// When the call started, and its ring deadline (ms since epoch).
    fn ring_window(&self, msg: &Incoming, event: &CallEvent) -> (i64, i64) {
        event.ring_window(msg.timestamp, self.cfg.worker.ring_timeout_secs, now_ms())
    }

    async fn initiate(&self, msg: &Incoming, event: &CallEvent, app: &App) -> Disposition {
        let event_id = event_id(msg, event);
        let key = claim_key(&event_id, event);
        let (sent_at_ms, expires_at_ms) = self.ring_window(msg, event);
        let timer = self.metrics.stage("resolve");
        // One statement (shared with concurrent rings) opens the call, finds the
        // devices and claims them. A late ring claims too, though it pushes
        // nothing: a device that a live owner holds must be told from one whose
        // owner is dead or that nobody claimed, and only the owner's copy
        // publishes its result.
        let admitted = self
            .store
            .admit_ring(Ring {
                key: key.clone(),
                call_id: event.call_id.clone(),
                bundle_id: app.config.bundle_id.clone(),
                user_id: event.to_user_id.clone(),
                ring_deadline_ms: expires_at_ms,
                owner: msg.claim_owner.clone(),
                devices: None,
            })
            .await;
        drop(timer);
        let admitted = match admitted {
            Ok(a) => a,
            Err(e) => return self.retry("admit the ring", e),
        };
        let base = base_result(&event_id, event, app);
        // Only a device nobody pushes: one whose result a copy of the event
        // already published gets no second, and one a live owner is pushing
        // gets that owner's.
        let per_device = |status: Status, reason: &str| -> Vec<PushResult> {
            admitted
                .devices
                .iter()
                .filter(|(_, c)| *c == Claim::Unclaimed)
                .map(|(d, _)| PushResult {
                    device_id: Some(d.id),
                    token_suffix: Some(token_suffix(&d.token)),
                    status,
                    reason: Some(reason.to_string()),
                    completed_at: now_rfc3339(),
                    ..base.clone()
                })
                .collect()
        };

        let remaining_ms = expires_at_ms - now_ms();
        // The results of an event that is not pushed at all; `None`: push.
        let not_pushed: Option<Vec<PushResult>> = if admitted.devices.is_empty() {
            info!(to_user_id = %event.to_user_id, "user has no live device for this app");
            Some(vec![PushResult {
                completed_at: now_rfc3339(),
                ..base.clone()
            }])
        } else if admitted.state == Some(CallState::Cancelled) {
            info!("call was cancelled before its ring went out; not pushed");
            Some(per_device(Status::Cancelled, "call cancelled"))
        } else {
            None
        };
        if not_pushed.is_none() && remaining_ms <= 0 {
            warn!(
                late_ms = -remaining_ms,
                "call event arrived after its ring deadline; not pushed"
            );
        }

        let results = if let Some(not_pushed) = not_pushed.filter(|r| !r.is_empty()) {
            // No claim of this copy's holds these results (a cancelled call's
            // ring claims nothing): settle the call and leave every claim to
            // its owner, whose own outcome it records.
            let finished = Finished {
                event_key: key.clone(),
                settle: Some((
                    event.call_id.clone(),
                    call_state(&not_pushed.iter().map(|r| r.status).collect::<Vec<_>>()),
                )),
                ..Finished::default()
            };
            let out: Vec<Outgoing> = not_pushed.into_iter().map(Outgoing::new).collect();
            if let Err(reason) = self.publish_and_finish(&out, finished).await {
                return Disposition::Retry(reason);
            }
            out.into_iter().map(|o| o.result).collect()
        } else {
            // (Also a cancelled copy whose every result is published: its
            // claims are all `Done`, nothing is pushed or published.) A late
            // copy pushes nothing either: see `claimed_push`.
            let window = (sent_at_ms, expires_at_ms);
            let mut call = Call::new(app, event, (&event_id, &key), &base, msg, window);
            call.late = remaining_ms <= 0;
            let (results, busy) = match self.push_all(&call, admitted.devices).await {
                Ok(r) => r,
                Err(reason) => return Disposition::Retry(reason),
            };
            // Past the deadline there is nothing to wait for: the live owner
            // publishes the devices it holds, and if it dies, its own message
            // comes back to a worker that takes them over.
            if busy && !call.late {
                return Disposition::Wait {
                    until: call.deadline,
                };
            }
            results
        };
        let outcome = if results.iter().any(|r| r.status == Status::Delivered) {
            "delivered"
        } else {
            // No result at all: another copy published every device's.
            results
                .first()
                .map(|r| r.status.as_str())
                .unwrap_or("duplicate")
        };
        self.metrics.events.with_label_values(&[outcome]).inc();
        Disposition::Ack
    }

    /// Pushes every claimed device at once, and publishes each device's result
    /// as soon as it is known; a device another copy of the event owns yields no
    /// result here. Publishing per device matters: two copies of one event that
    /// split its devices each leave the other's devices to it, and each device's
    /// result goes out as soon as it is known. The call is settled by the
    /// outcomes in its claims, when it is read (`store::calls::SETTLED_BY_CLAIMS`),
    /// not written here. Also says whether a live worker holds some of the claims.
    /// `Err`: a result could not be published.
    async fn push_all(
        &self,
        call: &Call<'_>,
        claims: Vec<(Device, Claim)>,
    ) -> Result<(Vec<PushResult>, bool), String> {
        let busy = claims.iter().any(|(_, c)| *c == Claim::Busy);
        let published = Mutex::new(Vec::with_capacity(claims.len()));
        let device = |(d, claim): (Device, Claim)| {
            let published = &published;
            // Boxed: the push's future is large, and `join_all` would move it.
            Box::pin(async move {
                let pushed = self.claimed_push(call, &d, claim).await;
                let mut finished = Finished {
                    event_key: call.key.to_string(),
                    ..Finished::default()
                };
                let out = pushed.map(|p| {
                    match p.outcome {
                        Some(o) => finished.outcomes.push(o),
                        None => finished.published_only.push(d.id),
                    }
                    p.out
                });
                if let Some(out) = out {
                    self.publish_counted(std::slice::from_ref(&out)).await?;
                    lock(published).push(out.result);
                    self.finish(finished).await;
                }
                Ok::<_, String>(())
            })
        };
        let done = join_all(claims.into_iter().map(device)).await;
        for r in done {
            r?;
        }
        let results = published.into_inner().unwrap_or_else(|p| p.into_inner());
        Ok((results, busy))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
