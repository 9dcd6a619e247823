-- Open claims are renewed by key (the worker keeps the list of the claims it
-- holds), so the partial index on unpublished claims is no longer needed, and
-- marking a claim published no longer has to move it out of an index.
DROP INDEX delivery_claims_open_by_worker;
