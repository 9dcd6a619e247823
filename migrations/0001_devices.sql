-- Device tokens per user and app. A PushKit VoIP token is unique per app, so the
-- natural key is (bundle_id, voip_token); a token that moves to another user moves.
CREATE TABLE devices (
    id              bigserial PRIMARY KEY,
    user_id         text        NOT NULL,
    bundle_id       text        NOT NULL,
    voip_token      text        NOT NULL CHECK (voip_token ~ '^[0-9a-f]+$'),
    -- 'unknown' until registered or learned from an APNs answer.
    environment     text        NOT NULL DEFAULT 'unknown'
                                CHECK (environment IN ('sandbox', 'production', 'unknown')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Last (re-)registration; compared with APNs' 410 timestamp.
    updated_at      timestamptz NOT NULL DEFAULT now(),
    last_success_at timestamptz,
    invalidated_at  timestamptz,
    invalid_reason  text,
    UNIQUE (bundle_id, voip_token)
);

-- The hot query: a user's live tokens for one app.
CREATE INDEX devices_live_by_user ON devices (user_id, bundle_id) WHERE invalidated_at IS NULL;
