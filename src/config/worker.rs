//! The worker's own settings: ring time, concurrency, retries, retention.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct WorkerConfig {
    /// A call older than this is not pushed. 45 s is about how long a caller waits
    /// before giving up, and what CallKit apps commonly use as their ring time.
    pub ring_timeout_secs: u64,
    /// Events handled at once; also the AMQP prefetch, so the broker never hands us
    /// more than we can work on.
    pub concurrency: u16,
    /// Pause before an event that could not be handled (database or broker trouble)
    /// is returned to the queue, so a fault does not become a hot requeue loop.
    pub retry_delay_ms: u64,
    /// How long shutdown waits for in-flight events before returning the rest;
    /// above the APNs request timeout so a request under way can finish.
    pub drain_timeout_secs: u64,
    /// APNs retry spacing: exponential with jitter between these bounds.
    pub retry_min_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    /// Delivery claims (the once-per-device guard) are kept this long; a
    /// redelivery older than that is long past any ring deadline anyway.
    pub claim_retention_hours: u64,
    /// Send a `call.cancel` VoIP push to devices already rung when a call is
    /// cancelled (the app reports the call to CallKit and ends it at once).
    pub cancel_push: bool,
    /// Cancels handled at once on the cancel lane.
    pub cancel_concurrency: u16,
    /// Calls and their attempts are kept this long for `trace` and the status API.
    pub call_retention_days: u64,
    /// An event's `ringTimeoutSecs` above this is clamped to it: no phone rings
    /// for minutes, and no event is retried for hours on its ring deadline.
    pub max_ring_timeout_secs: u64,
    /// How long a cancel (or a device-registration event) that meets faults is
    /// retried before it is dead-lettered as `retry_exhausted`; rings are bounded
    /// by their ring deadline instead. Two minutes outlasts a database failover
    /// and is past any ring a late cancel could still stop.
    pub retry_cap_secs: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            ring_timeout_secs: 45,
            concurrency: 64,
            retry_delay_ms: 1_000,
            drain_timeout_secs: 15,
            retry_min_delay_ms: 250,
            retry_max_delay_ms: 5_000,
            claim_retention_hours: 168,
            cancel_push: true,
            cancel_concurrency: 16,
            call_retention_days: 7,
            max_ring_timeout_secs: 120,
            retry_cap_secs: 120,
        }
    }
}

impl WorkerConfig {
    pub fn ring_timeout(&self) -> Duration {
        Duration::from_secs(self.ring_timeout_secs)
    }

    /// The parser's bounds.
    pub fn limits(&self) -> crate::event::Limits {
        crate::event::Limits {
            max_ring_timeout_secs: self.max_ring_timeout_secs,
        }
    }

    pub fn retry_cap(&self) -> Duration {
        Duration::from_secs(self.retry_cap_secs)
    }
}
