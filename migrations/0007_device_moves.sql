-- A token registered by another user moves to them (the phone changed accounts or
-- hands); the last move is kept so `devices list` can tell both users what happened.
ALTER TABLE devices
    ADD COLUMN previous_user_id text,
    ADD COLUMN moved_at         timestamptz;

-- `devices list --user U` also shows the devices that moved away from U.
CREATE INDEX devices_moved_from ON devices (previous_user_id) WHERE previous_user_id IS NOT NULL;
