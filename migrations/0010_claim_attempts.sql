-- A delivery's APNs attempts are kept in its claim, written in the same update
-- as its result: a row of their own per attempt (with two btree entries and a
-- BRIN range) was a third of what Postgres spent per push. `delivery_attempts`
-- keeps the attempts recorded before, until they are purged.
ALTER TABLE delivery_claims ADD COLUMN attempts jsonb;
