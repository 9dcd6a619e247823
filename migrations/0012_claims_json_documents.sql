-- A claim's result and attempts as `json` (the text as sent, checked once)
-- instead of `jsonb` (parsed into a binary tree and its keys sorted on every
-- write): the worker writes each once and reads them rarely (trace, a cancel's
-- rung devices), and parsing two documents per delivery was ~7% of Postgres's
-- CPU at saturation. New columns, not a type change: no table rewrite, and a
-- worker of the previous version keeps writing the old ones during a rolling
-- upgrade. Readers take the new column, else the old one.
ALTER TABLE delivery_claims
    ADD COLUMN result_json   json,
    ADD COLUMN attempts_json json;
