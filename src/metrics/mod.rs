//! Every metric name and label set, in one place. Label values come from closed
//! sets (enums' `as_str`/`label`), never from user data: no user ids, tokens or
//! call ids ever become a label.

mod build;
mod labels;

pub use labels::*;

use prometheus::{
    Encoder, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub events: IntCounterVec,
    pub deliveries: IntCounterVec,
    pub apns_requests: IntCounterVec,
    pub apns_request_duration: HistogramVec,
    pub end_to_end: Histogram,
    /// Time spent in each step of an event (`STAGES`), waits for a pooled
    /// connection or a batch included.
    pub stage_duration: HistogramVec,
    /// `stage_duration`'s series, in the order of [`STAGES`]: looked up once, not
    /// per event.
    stage_timers: std::sync::Arc<[Histogram]>,
    /// Requests per shared statement (`store::batch`), by statement
    /// ([`BATCHED_STATEMENTS`]).
    pub batch_requests: HistogramVec,
    pub environment_fallbacks: IntCounterVec,
    pub tokens_invalidated: IntCounterVec,
    pub retries: IntCounterVec,
    pub in_flight: IntGauge,
    pub provider_tokens_signed: IntCounter,
    pub apns_connections_opened: IntCounterVec,
    /// HTTP/2 PINGs sent, and connections retired for leaving one unanswered, by
    /// `kind`: `idle` (keep-alive) or `probe` (a push had no answer).
    pub apns_pings: IntCounterVec,
    pub apns_connections_retired: IntCounterVec,
    /// Cancel pushes not sent, by `reason`: `off` (the mode) and `answered`
    /// (answered or declined: no missed call) count cancels, `no_alert_token`
    /// rung devices.
    pub cancel_pushes_skipped: IntCounterVec,
    pub results_published: IntCounterVec,
    /// HTTP API requests by route template and status code, and their duration.
    pub api_requests: IntCounterVec,
    pub api_request_duration: HistogramVec,
    /// 1 while RabbitMQ blocks the result publisher (a memory or disk alarm).
    pub amqp_publish_blocked: IntGauge,
    pub dead_letters: IntCounterVec,
    pub events_overdue: IntGauge,
    pub results_unrouted: IntCounter,
    /// The HTTP listener: connections open, refused over the cap, and cut off
    /// by a read timeout (`phase` `header` or `body`).
    pub http_connections: IntGauge,
    pub http_connections_refused: IntCounter,
    pub http_read_timeouts: IntCounterVec,
    /// Long polls of `GET /v1/calls/{id}?waitMs=` waiting now, and refused
    /// over `http.max_long_polls`.
    pub long_polls_waiting: IntGauge,
    pub long_polls_refused: IntCounter,
    /// Device tokens registered by another user than the one holding them.
    pub device_moves: IntCounter,
    /// 1 while an app is held as misconfigured (`apns::guard`), by bundle id
    /// (configured apps only); token-level refusals held as suspect, by app and
    /// Apple's reason.
    pub apns_app_misconfigured: IntGaugeVec,
    pub apns_suspect_refusals: IntCounterVec,
    /// When each certificate app's certificate expires (UNIX seconds), by bundle
    /// id (configured apps only: a closed set).
    pub apns_certificate_expiry: IntGaugeVec,
}

/// Counts something in a gauge for as long as it is held.
pub struct Held(IntGauge);

impl Held {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts a dead letter (and, for the call lanes, the event's end).
    pub fn dead_lettered(&self, lane: &'static str, reason: &'static str) {
        debug_assert!(
            DEAD_LETTER_REASONS.contains(&reason),
            "unknown reason {reason}"
        );
        self.dead_letters.with_label_values(&[lane, reason]).inc();
        // On the call lanes, an event's end (one refused as invalid is counted
        // as `invalid` by the pipeline instead).
        if lane != "devices"
            && matches!(
                reason,
                "non_retryable" | "retry_exhausted" | "internal_error"
            )
        {
            self.events.with_label_values(&["dead_lettered"]).inc();
        }
    }

    /// Counts a token invalidated for Apple's `reason`.
    pub fn token_invalidated(&self, reason: &str) {
        self.tokens_invalidated
            .with_label_values(&[crate::apns::outcome::reason_label(Some(reason))])
            .inc();
    }

    /// Observes the time until the returned timer drops in `stage`'s histogram.
    pub fn stage(&self, stage: &'static str) -> prometheus::HistogramTimer {
        match STAGES.iter().position(|s| *s == stage) {
            Some(i) => self.stage_timers[i].start_timer(),
            None => {
                debug_assert!(false, "unknown stage {stage}");
                self.stage_duration
                    .with_label_values(&[stage])
                    .start_timer()
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
