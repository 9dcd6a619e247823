-- Claims are updated twice after their insert (result, then published) and
-- calls once (settled); with full pages every update is a new tuple elsewhere and
-- an entry in every index. Room on each page keeps those updates on the page
-- (heap-only tuples), with no index writes. Applies to pages written from now on.
ALTER TABLE delivery_claims SET (fillfactor = 60);
ALTER TABLE calls SET (fillfactor = 80);
