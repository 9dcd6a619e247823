-- Calls as state: what "why didn't it ring?" is answered from, and what a cancel
-- is checked against before every attempt.
CREATE TABLE calls (
    call_id            text PRIMARY KEY,
    bundle_id          text        NOT NULL,
    to_user_id         text        NOT NULL,
    state              text        NOT NULL DEFAULT 'ringing'
                                   CHECK (state IN ('ringing', 'delivered', 'failed', 'expired', 'cancelled')),
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    ring_deadline      timestamptz,
    settled_at         timestamptz,
    -- clock_timestamp(), not now(): the moment the row changed, after any lock
    -- wait, so it orders correctly against the pushes it waited for.
    cancelled_at       timestamptz,
    cancel_reason      text,
    answered_device_id text
);
CREATE INDEX calls_created ON calls (created_at);

-- Every APNs request, with its answer (apns_status NULL: none came).
CREATE TABLE delivery_attempts (
    id          bigserial PRIMARY KEY,
    call_id     text        NOT NULL,
    device_id   bigint      NOT NULL,
    event_type  text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    environment text        NOT NULL,
    apns_status smallint,
    reason      text,
    apns_id     text,
    latency_ms  integer     NOT NULL
);
CREATE INDEX delivery_attempts_call ON delivery_attempts (call_id, device_id);
CREATE INDEX delivery_attempts_at ON delivery_attempts (at);

-- Claims name their call, so a call's deliveries can be listed.
ALTER TABLE delivery_claims ADD COLUMN call_id text;
CREATE INDEX delivery_claims_call ON delivery_claims (call_id) WHERE call_id IS NOT NULL;
