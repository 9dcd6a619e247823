-- A claim is written three times (taken, result, published). With no index on
-- the columns those writes change, and room left on each page, Postgres can
-- update it in place (HOT) instead of adding an entry to every index each time.
-- Open claims are now renewed by key (the worker keeps the list), so the partial
-- index on unpublished claims is no longer needed.
DROP INDEX delivery_claims_open_by_worker;
ALTER TABLE delivery_claims SET (fillfactor = 70);
