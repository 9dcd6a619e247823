//! The closed label sets of the metrics (and the latency buckets).

/// Buckets for APNs round trips and end-to-end latency: a ring should be on the
/// phone in well under a second, so resolution is finest there.
pub(super) const LATENCY_BUCKETS: &[f64] = &[
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
    "duplicate",
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
/// (`record` also settles the call: one statement since the outcome is recorded
/// after its publish.)
pub const STAGES: &[&str] = &["resolve", "claim", "deliver", "record", "publish"];
/// The statements concurrent events share (`store::batch`).
pub const BATCHED_STATEMENTS: &[&str] =
    &["admit_ring", "finish_event", "is_cancelled", "live_devices"];
/// Requests per shared statement: up to its most (64).
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
