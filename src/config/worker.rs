//! The worker's own settings: ring time, concurrency, retries, retention.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct WorkerConfig {
    /// A call older than this is not pushed. 45 s is about how long a caller waits
    /// before giving up, and what CallKit apps commonly use as their ring time.
    pub ring_timeout_secs: u64,
    /// Events handled at once (the AMQP prefetch is twice this, so the next events
    /// are at hand when a slot frees). 128: at saturation a deeper hand means larger
    /// shared statements and fewer frames, cheaper in every process than 64 (README,
    /// "Benchmark").
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
    /// What devices already rung get when their call is cancelled (README,
    /// "Ending a call").
    pub cancel_push: CancelPush,
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
            concurrency: 128,
            retry_delay_ms: 1_000,
            drain_timeout_secs: 15,
            retry_min_delay_ms: 250,
            retry_max_delay_ms: 5_000,
            claim_retention_hours: 168,
            cancel_push: CancelPush::Alert,
            cancel_concurrency: 16,
            call_retention_days: 7,
            max_ring_timeout_secs: 120,
            retry_cap_secs: 120,
        }
    }
}

/// The push a cancel sends to the devices its call rang.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CancelPush {
    /// A `call.cancel` VoIP push: the app must report it to CallKit as a call and
    /// end it at once — a phantom call, which Apple's PushKit rules ask servers
    /// not to send.
    Voip,
    /// A visible "Missed call" notification (push type `alert`, the bundle id as
    /// topic) to each rung device with an alert token, when nobody answered.
    /// Apple's rule: VoIP pushes announce incoming calls only; anything else goes
    /// through the User Notifications framework.
    #[default]
    Alert,
    /// Nothing: the app learns of the end over its own connection.
    Off,
}

impl CancelPush {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelPush::Voip => "voip",
            CancelPush::Alert => "alert",
            CancelPush::Off => "off",
        }
    }
}

/// `voip`, `alert` or `off`; `true` and `false` (the setting's older form) keep
/// meaning `voip` and `off`, as TOML booleans or as environment strings.
impl<'de> Deserialize<'de> for CancelPush {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = CancelPush;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("voip, alert or off")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<CancelPush, E> {
                Ok(if v { CancelPush::Voip } else { CancelPush::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CancelPush, E> {
                match v.to_ascii_lowercase().as_str() {
                    "voip" | "true" => Ok(CancelPush::Voip),
                    "alert" => Ok(CancelPush::Alert),
                    "off" | "false" => Ok(CancelPush::Off),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
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
