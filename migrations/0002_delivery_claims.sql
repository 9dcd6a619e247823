-- One row per (event, device): who is pushing it, and what came of it.
-- A redelivered or duplicated event finds the row and never pushes that device
-- again; a worker that died mid-push is recognised by its lapsed lease.
CREATE TABLE delivery_claims (
    event_key    text        NOT NULL,
    device_id    bigint      NOT NULL,
    -- The worker process holding the claim, and until when; live workers renew
    -- their leases every few seconds.
    owner        text        NOT NULL,
    lease_until  timestamptz NOT NULL,
    -- The result event, once the push has an outcome.
    result       jsonb,
    -- When the broker confirmed that result.
    published_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_key, device_id)
);

-- Lease renewal and purging scan by these.
CREATE INDEX delivery_claims_open_by_owner ON delivery_claims (owner) WHERE published_at IS NULL;
CREATE INDEX delivery_claims_created ON delivery_claims (created_at);
