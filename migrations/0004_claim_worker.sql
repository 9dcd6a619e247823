-- Lease renewal looks claims up by worker; a prefix match on `owner` cannot use
-- an index under every collation, and would scan the whole table every few
-- seconds once it holds days of claims.
ALTER TABLE delivery_claims ADD COLUMN worker_id text;
CREATE INDEX delivery_claims_open_by_worker ON delivery_claims (worker_id) WHERE published_at IS NULL;
DROP INDEX delivery_claims_open_by_owner;
