//! Every metric registered, and the known series exported at zero.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::*;

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
        let batch_requests = HistogramVec::new(
            HistogramOpts::new(
                "voip_push_batch_requests",
                "Requests per shared Postgres statement, by statement (admit_ring, \
                 finish_event, is_cancelled, live_devices): how many events each \
                 statement's fixed cost was shared by.",
            )
            .buckets(BATCH_BUCKETS.to_vec()),
            &["statement"],
        )
        .expect("metric");
        registry
            .register(Box::new(batch_requests.clone()))
            .expect("register");
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
            stage_timers: STAGES
                .iter()
                .map(|s| stage_duration.with_label_values(&[s]))
                .collect(),
            stage_duration,
            batch_requests,
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
        for statement in BATCHED_STATEMENTS {
            self.batch_requests.with_label_values(&[statement]);
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
}
