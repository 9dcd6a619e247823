-- The time indexes serve only the purge every 10 minutes, yet every claim, call
-- and attempt written paid for a btree entry. Rows arrive in time order, so a
-- BRIN index (a summary per range of pages, next to nothing to maintain) finds
-- what to purge as well.
DROP INDEX delivery_claims_created;
CREATE INDEX delivery_claims_created ON delivery_claims USING brin (created_at);
DROP INDEX delivery_attempts_at;
CREATE INDEX delivery_attempts_at ON delivery_attempts USING brin (at);
DROP INDEX calls_created;
CREATE INDEX calls_created ON calls USING brin (created_at);
