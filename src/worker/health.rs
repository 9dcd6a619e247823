//! What `/healthz` and `/readyz` read, shared by the watched lanes of the driver
//! (`calls` and `cancels`): are they consuming, is the loop alive, and is any
//! message held past its deadline while nothing settles (a wedged worker that
//! would otherwise look healthy).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Held past its deadline for this long with nothing settled, a worker is
/// stalled: longer than any single step waits for a store or broker (30 s).
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// A message is overdue this long after the longest retry bound: one last try
/// may still be waiting out the store's or the broker's patience (30 s each).
pub const OVERDUE_GRACE: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct ConsumerHealth {
    /// Every lane connected and consuming.
    pub consuming: AtomicBool,
    /// Lanes the worker runs, and how many are consuming now.
    pub lanes: AtomicUsize,
    consuming_lanes: AtomicUsize,
    /// Unix seconds of the loop's last sign of life.
    pub heartbeat: AtomicU64,
    /// Times the loop started consuming (1 + reconnects).
    pub sessions: AtomicU64,
    /// Each message in hand, by a sequence number, and when it is overdue.
    held: Mutex<HashMap<u64, Instant>>,
    next_hold: AtomicU64,
    /// When a message was last settled; `None` before the first.
    last_settled: Mutex<Option<Instant>>,
}

/// A message in hand; dropping it (settled, or its task ended) releases it.
pub struct Held {
    health: Arc<ConsumerHealth>,
    id: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.health.held.lock().expect("held lock").remove(&self.id);
        *self.health.last_settled.lock().expect("settled lock") = Some(Instant::now());
    }
}

impl ConsumerHealth {
    pub(super) fn lane_up(&self) {
        let up = self.consuming_lanes.fetch_add(1, Ordering::SeqCst) + 1;
        self.consuming.store(
            up >= self.lanes.load(Ordering::SeqCst).max(1),
            Ordering::SeqCst,
        );
    }

    pub(super) fn lane_down(&self) {
        self.consuming_lanes.fetch_sub(1, Ordering::SeqCst);
        self.consuming.store(false, Ordering::SeqCst);
    }

    pub(super) fn beat(&self) {
        self.heartbeat
            .store(crate::apns::token::unix_now(), Ordering::Relaxed);
    }

    /// Records a message in hand that is overdue from `overdue_at`.
    pub fn hold(self: &Arc<Self>, overdue_at: Instant) -> Held {
        let id = self.next_hold.fetch_add(1, Ordering::Relaxed);
        self.held.lock().expect("held lock").insert(id, overdue_at);
        Held {
            health: self.clone(),
            id,
        }
    }

    /// Messages held past their deadline now.
    pub fn overdue(&self, now: Instant) -> usize {
        let held = self.held.lock().expect("held lock");
        held.values().filter(|at| **at <= now).count()
    }

    /// Why the worker is stalled, if it is: messages held past their deadline
    /// and none settled for [`STALL_AFTER`].
    pub fn stalled(&self, now: Instant) -> Option<String> {
        let overdue = self.overdue(now);
        if overdue == 0 {
            return None;
        }
        let last = *self.last_settled.lock().expect("settled lock");
        let quiet = last.map(|t| now.saturating_duration_since(t));
        match quiet {
            Some(q) if q < STALL_AFTER => None,
            Some(q) => Some(format!(
                "{overdue} events held past their deadline and none settled for {} s",
                q.as_secs()
            )),
            None => Some(format!(
                "{overdue} events held past their deadline and none settled yet"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_only_when_overdue_and_nothing_settles() {
        let health = Arc::new(ConsumerHealth::default());
        let now = Instant::now();
        let later = now + Duration::from_secs(600);
        let on_time = health.hold(later);
        assert_eq!(health.overdue(now), 0);
        assert!(health.stalled(now).is_none());

        let late = health.hold(now);
        assert_eq!(health.overdue(now), 1);
        assert!(health.stalled(now).unwrap().contains("1 events held"));

        // Another message settles: the worker makes progress, for a while.
        drop(on_time);
        assert!(health.stalled(Instant::now()).is_none());
        assert!(health
            .stalled(Instant::now() + STALL_AFTER + Duration::from_secs(1))
            .is_some());

        drop(late);
        assert_eq!(health.overdue(later), 0);
        assert!(health.stalled(later).is_none());
    }
}
