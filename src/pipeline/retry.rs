//! Which failures are worth another try, and for how long. A fault that can pass
//! (a database restart, a broker reconnect) is retried with the message held,
//! never past a bound: a ring until its ring deadline, anything else for
//! `worker.retry_cap_secs`; then it is dead-lettered as `retry_exhausted`. A
//! failure no retry can fix (Postgres refusing the values themselves) is
//! dead-lettered at once as `non_retryable`.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Disposition, Incoming, Pipeline};
use crate::event::{now_ms, CallEvent, EventType, MAX_CLOCK_AHEAD_MS};
use crate::retry_policy::RetryPolicy;
use crate::store::StoreError;

/// Longest pause between two tries of an event that hit a fault.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(15);
/// A ring already past (or near) its deadline still gets this long, so a short
/// broker hiccup ends in its `expired` result rather than a dead letter.
const MIN_RING_PATIENCE: Duration = Duration::from_secs(5);

impl Pipeline {
    /// A store failure, classified: retried later, or dead-lettered now.
    pub(super) fn retry(&self, step: &str, e: StoreError) -> Disposition {
        if !e.is_retryable() {
            warn!(step, error = %e, "the database refuses this event; dead-lettered");
            return Disposition::DeadLetter {
                kind: "non_retryable",
                message: format!("{step}: {e}"),
            };
        }
        warn!(step, error = %e, "event could not be handled now; it will be retried");
        self.metrics.events.with_label_values(&["retried"]).inc();
        Disposition::Retry(format!("{step}: {e}"))
    }

    /// The longest any message can be retried, whatever it says: a ring's deadline
    /// lies at most a clock skew plus the longest ring time ahead.
    pub fn longest_retry(&self) -> Duration {
        let w = &self.cfg.worker;
        let ring = Duration::from_millis(MAX_CLOCK_AHEAD_MS as u64)
            + Duration::from_secs(w.max_ring_timeout_secs);
        ring.max(w.retry_cap()).max(MIN_RING_PATIENCE)
    }

    /// Until when a fault in handling `msg`, first taken at `started`, is retried.
    fn retry_deadline(&self, msg: &Incoming, started: Instant) -> Instant {
        match CallEvent::parse_with(&msg.body, &self.cfg.worker.limits()) {
            Ok(e) if e.event_type == EventType::Incoming => {
                let (_, expires_at_ms) = self.ring_window(msg, &e);
                let left = u64::try_from(expires_at_ms.saturating_sub(now_ms())).unwrap_or(0);
                started + Duration::from_millis(left).max(MIN_RING_PATIENCE)
            }
            _ => started + self.cfg.worker.retry_cap(),
        }
    }

    /// Handles a message until it can be settled. A fault (database or broker
    /// down) is retried here, with the message held unacknowledged and a growing
    /// pause, rather than requeued: a requeue would count against the queue's
    /// delivery limit and send good events to the dead-letter queue during a
    /// short outage. Past its retry deadline (worked out at the first fault, so
    /// the common path parses nothing twice) it is dead-lettered; only shutdown
    /// returns it to the queue.
    pub async fn handle_until_settled(
        &self,
        msg: &Incoming,
        shutdown: &CancellationToken,
    ) -> Disposition {
        let started = Instant::now();
        let mut give_up = None;
        let mut delays = RetryPolicy::doubling(
            Duration::from_millis(self.cfg.worker.retry_delay_ms),
            MAX_RETRY_PAUSE,
        )
        .delays();
        let mut delay = delays.next_delay();
        loop {
            let reason = match self.handle(msg).await {
                Disposition::Retry(reason) if !shutdown.is_cancelled() => reason,
                other => return other,
            };
            let give_up = *give_up.get_or_insert_with(|| self.retry_deadline(msg, started));
            if Instant::now() + delay >= give_up {
                warn!(%reason, "event kept failing until its retry deadline; dead-lettered");
                return Disposition::DeadLetter {
                    kind: "retry_exhausted",
                    message: reason,
                };
            }
            warn!(%reason, retry_in_ms = delay.as_millis() as u64, "event not handled; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return Disposition::Retry(reason),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = delays.next_delay();
        }
    }
}

/// How long a store write that must follow a push is retried (a database restart
/// takes a few seconds).
const STORE_PATIENCE: Duration = Duration::from_secs(30);
/// Pauses between tries of such a write.
const STORE_RETRY: RetryPolicy =
    RetryPolicy::doubling(Duration::from_millis(100), Duration::from_secs(2));

/// Runs `write` until it succeeds, pausing 100 ms (doubling up to 2 s) between
/// tries, for up to [`STORE_PATIENCE`]; then returns its last error.
pub(super) async fn patiently<F, Fut>(what: &str, mut write: F) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let started = Instant::now();
    let mut delays = STORE_RETRY.delays();
    let mut delay = delays.next_delay();
    loop {
        match write().await {
            Err(e) if started.elapsed() < STORE_PATIENCE => {
                warn!(step = what, error = %e, "store write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = delays.next_delay();
            }
            done => return done,
        }
    }
}
