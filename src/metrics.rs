//! Every metric name and label set, in one place. Label values come from closed
//! sets (enums' `as_str`/`label`), never from user data: no user ids, tokens or
//! call ids ever become a label.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for APNs round trips and end-to-end latency: a ring should be on the
/// phone in well under a second, so resolution is finest there.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// `voip_push_events_total{outcome}`: how an event ended.
pub const EVENT_OUTCOMES: &[&str] = &[
    "delivered",
    "no_device",
    "expired",
    "failed",
    "token_invalidated",
    "cancelled",
    "app_misconfigured",
    "invalid",
    "retried",
    "cancel",
    "dead_lettered",
];

/// `voip_push_dead_letters_total{lane,reason}`: the lanes, and every reason a
/// message is dead-lettered for (the `x-vpw-reason` header, CONTRACT §13).
pub const DEAD_LETTER_LANES: &[&str] = &["calls", "cancels", "devices"];
pub const DEAD_LETTER_REASONS: &[&str] = &[
    "too_large",
    "not_utf8",
    "not_json",
    "not_an_object",
    "missing_field",
    "bad_field",
    "unknown_type",
    "non_retryable",
    "retry_exhausted",
    "internal_error",
];

/// `status` label values of deliveries and results (CONTRACT §5).
pub const DELIVERY_STATUSES: &[&str] = &[
    "delivered",
    "failed",
    "expired",
    "token_invalidated",
    "no_device",
    "invalid_event",
    "cancelled",
    "app_misconfigured",
];

/// `voip_push_retries_total{reason}`: Apple's retryable reasons and our
/// transport failures.
pub const RETRY_REASONS: &[&str] = &[
    "TooManyRequests",
    "InternalServerError",
    "ServiceUnavailable",
    "Shutdown",
    "IdleTimeout",
    "ExpiredProviderToken",
    "UnrelatedKeyIdInToken",
    "other",
    "none",
    "connect",
    "timeout",
    "transport",
    "store",
    "redelivered",
];

/// `route` label values of the HTTP API metrics: the routes' templates (never a
/// raw path, which would carry tokens and call ids).
pub const API_ROUTES: &[&str] = &[
    "/v1/calls",
    "/v1/calls/{call_id}",
    "/v1/calls/{call_id}/cancel",
    "/api/internal/push/call",
    "/v1/devices",
    "/v1/devices/{token}",
    "/api/v1/me/devices",
    "/users/{identity}/voip-token",
    "/twilio/token",
];

/// `voip_push_stage_duration_seconds{stage}`: the steps of one event.
pub const STAGES: &[&str] = &["resolve", "claim", "deliver", "record", "publish", "settle"];

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
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(format!("voip_push_{name}"), help), labels)
                .expect("metric");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(format!("voip_push_{name}"), help)
                .buckets(LATENCY_BUCKETS.to_vec());
            let h = HistogramVec::new(opts, labels).expect("metric");
            registry.register(Box::new(h.clone())).expect("register");
            h
        };
        let events = counter(
            "events_total",
            "Call events taken from the queue, by how they ended.",
            &["outcome"],
        );
        let deliveries = counter(
            "deliveries_total",
            "Per-device delivery results, by status and the environment that answered last.",
            &["status", "environment"],
        );
        let apns_requests = counter(
            "apns_requests_total",
            "APNs requests by environment, HTTP status code and reason.",
            &["environment", "code", "reason"],
        );
        let environment_fallbacks = counter(
            "environment_fallbacks_total",
            "Retries in the other APNs environment after BadDeviceToken, by result.",
            &["from", "to", "result"],
        );
        let tokens_invalidated = counter(
            "tokens_invalidated_total",
            "Device tokens marked invalid, by APNs reason.",
            &["reason"],
        );
        let retries = counter(
            "retries_total",
            "APNs request retries, by reason.",
            &["reason"],
        );
        let apns_connections_opened = counter(
            "apns_connections_opened_total",
            "HTTP/2 connections opened to APNs, by environment.",
            &["environment"],
        );
        let apns_pings = counter(
            "apns_pings_total",
            "HTTP/2 PINGs sent to APNs, by environment and kind (idle, probe).",
            &["environment", "kind"],
        );
        let apns_connections_retired = counter(
            "apns_connections_retired_total",
            "APNs connections retired because a PING went unanswered, by environment and kind.",
            &["environment", "kind"],
        );
        let cancel_pushes_skipped = counter(
            "cancel_pushes_skipped_total",
            "Cancel pushes not sent, by reason: off and answered count cancels, no_alert_token rung devices.",
            &["reason"],
        );
        let results_published = counter(
            "results_published_total",
            "Result events confirmed by the broker, by status.",
            &["status"],
        );
        let api_requests = counter(
            "api_requests_total",
            "HTTP API requests, by route template and status code.",
            &["route", "code"],
        );
        let api_request_duration = histogram(
            "api_request_duration_seconds",
            "HTTP API request durations, by route template (long polls included).",
            &["route"],
        );
        let apns_request_duration = histogram(
            "apns_request_duration_seconds",
            "Time from sending an APNs request to its answer.",
            &["environment"],
        );
        let end_to_end = Histogram::with_opts(
            HistogramOpts::new(
                "voip_push_end_to_end_seconds",
                "Time from the event's sentAt to APNs' answer for a delivered push.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("metric");
        registry
            .register(Box::new(end_to_end.clone()))
            .expect("register");
        let stage_duration = histogram(
            "stage_duration_seconds",
            "Time an event spends in each step: resolve (call row and devices), claim, \
             deliver (APNs attempts and their records), record (the claim's result), \
             publish (results confirmed by the broker), settle (claims and call marked).",
            &["stage"],
        );
        let in_flight = IntGauge::new("voip_push_in_flight", "Call events being worked on now.")
            .expect("metric");
        registry
            .register(Box::new(in_flight.clone()))
            .expect("register");
        let provider_tokens_signed = IntCounter::new(
            "voip_push_provider_tokens_signed_total",
            "APNs provider tokens (JWTs) signed; one per key per ~50 minutes is healthy.",
        )
        .expect("metric");
        registry
            .register(Box::new(provider_tokens_signed.clone()))
            .expect("register");

        let amqp_publish_blocked = IntGauge::new(
            "voip_push_amqp_publish_blocked",
            "1 while RabbitMQ blocks publishing results (memory or disk alarm); events wait unsettled.",
        )
        .expect("metric");
        registry
            .register(Box::new(amqp_publish_blocked.clone()))
            .expect("register");
        let dead_letters = counter(
            "dead_letters_total",
            "Messages sent to a dead-letter queue, by lane and reason (x-vpw-reason).",
            &["lane", "reason"],
        );
        let events_overdue = IntGauge::new(
            "voip_push_events_overdue",
            "Events held longer than any retry bound allows (plus a grace): above 0 with no \
             progress, the worker is wedged and /readyz fails.",
        )
        .expect("metric");
        registry
            .register(Box::new(events_overdue.clone()))
            .expect("register");
        let results_unrouted = IntCounter::new(
            "voip_push_results_unrouted_total",
            "Results the broker returned because no queue is bound to the results exchange.",
        )
        .expect("metric");
        registry
            .register(Box::new(results_unrouted.clone()))
            .expect("register");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(format!("voip_push_{name}"), help).expect("metric");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let counter1 = |name: &str, help: &str| {
            let c = IntCounter::new(format!("voip_push_{name}"), help).expect("metric");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let http_connections = gauge("http_connections", "Connections open on the HTTP listener.");
        let http_connections_refused = counter1(
            "http_connections_refused_total",
            "Connections closed at once because http.max_connections were open.",
        );
        let http_read_timeouts = counter(
            "http_read_timeouts_total",
            "Connections cut off because a request's head or body did not arrive in time.",
            &["phase"],
        );
        let long_polls_waiting = gauge(
            "api_long_polls_waiting",
            "Long polls of GET /v1/calls/{id}?waitMs= waiting now.",
        );
        let long_polls_refused = counter1(
            "api_long_polls_refused_total",
            "Long polls answered 503 because http.max_long_polls were waiting.",
        );
        let device_moves = counter1(
            "device_moves_total",
            "Device tokens registered by a user other than the one they belonged to (moved).",
        );
        let apns_app_misconfigured = IntGaugeVec::new(
            Opts::new(
                "voip_push_apns_app_misconfigured",
                "1 while APNs refuses many distinct devices of the app and accepts none: a wrong \
                 bundle id or key; its refused deliveries end app_misconfigured, no token is \
                 invalidated.",
            ),
            &["app"],
        )
        .expect("metric");
        registry
            .register(Box::new(apns_app_misconfigured.clone()))
            .expect("register");
        let apns_suspect_refusals = counter(
            "apns_suspect_refusals_total",
            "Token-level APNs refusals held as suspect (nothing written) because the app has \
             not proven its configuration in that environment yet, by app and reason.",
            &["app", "reason"],
        );
        let apns_certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "voip_push_apns_certificate_expiry_timestamp_seconds",
                "When the APNs certificate of a certificate app expires (UNIX time); alert 30 days ahead.",
            ),
            &["app"],
        )
        .expect("metric");
        registry
            .register(Box::new(apns_certificate_expiry.clone()))
            .expect("register");
        let m = Self {
            registry,
            events,
            deliveries,
            apns_requests,
            apns_request_duration,
            end_to_end,
            stage_duration,
            environment_fallbacks,
            tokens_invalidated,
            retries,
            in_flight,
            provider_tokens_signed,
            apns_connections_opened,
            apns_pings,
            apns_connections_retired,
            cancel_pushes_skipped,
            results_published,
            api_requests,
            api_request_duration,
            amqp_publish_blocked,
            dead_letters,
            events_overdue,
            results_unrouted,
            http_connections,
            http_connections_refused,
            http_read_timeouts,
            long_polls_waiting,
            long_polls_refused,
            device_moves,
            apns_app_misconfigured,
            apns_suspect_refusals,
            apns_certificate_expiry,
        };
        m.zero_known_series();
        m
    }

    /// Exports the known label combinations at 0 from the start, so `rate()` and
    /// alerts see a series before its first event (a counter that appears only at
    /// its first increment hides that increment from `rate()`).
    fn zero_known_series(&self) {
        const ENVS: [&str; 2] = ["production", "sandbox"];
        for outcome in EVENT_OUTCOMES {
            self.events.with_label_values(&[outcome]);
        }
        for status in DELIVERY_STATUSES {
            for env in ["production", "sandbox", "none"] {
                self.deliveries.with_label_values(&[status, env]);
            }
        }
        for (from, to) in [("production", "sandbox"), ("sandbox", "production")] {
            for result in ["delivered", "rejected", "other"] {
                self.environment_fallbacks
                    .with_label_values(&[from, to, result]);
            }
        }
        for reason in [
            "BadDeviceToken",
            "DeviceTokenNotForTopic",
            "Unregistered",
            "ExpiredToken",
        ] {
            self.tokens_invalidated.with_label_values(&[reason]);
        }
        for reason in RETRY_REASONS {
            self.retries.with_label_values(&[reason]);
        }
        for env in ENVS {
            self.apns_requests.with_label_values(&[env, "200", "none"]);
            self.apns_request_duration.with_label_values(&[env]);
            self.apns_connections_opened.with_label_values(&[env]);
        }
        for stage in STAGES {
            self.stage_duration.with_label_values(&[stage]);
        }
        for route in API_ROUTES {
            self.api_request_duration.with_label_values(&[route]);
            self.api_requests.with_label_values(&[route, "200"]);
        }
        for status in DELIVERY_STATUSES {
            self.results_published.with_label_values(&[status]);
        }
        for phase in ["header", "body"] {
            self.http_read_timeouts.with_label_values(&[phase]);
        }
        for lane in DEAD_LETTER_LANES {
            for reason in DEAD_LETTER_REASONS {
                self.dead_letters.with_label_values(&[lane, reason]);
            }
        }
    }

    /// Counts a dead letter (and, for the call lanes, the event's end).
    pub fn dead_lettered(&self, lane: &'static str, reason: &'static str) {
        debug_assert!(
            DEAD_LETTER_REASONS.contains(&reason),
            "unknown reason {reason}"
        );
        self.dead_letters.with_label_values(&[lane, reason]).inc();
    }

    /// Observes the time until the returned timer drops in `stage`'s histogram.
    pub fn stage(&self, stage: &'static str) -> prometheus::HistogramTimer {
        debug_assert!(STAGES.contains(&stage), "unknown stage {stage}");
        self.stage_duration
            .with_label_values(&[stage])
            .start_timer()
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
