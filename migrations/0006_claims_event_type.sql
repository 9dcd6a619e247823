-- Which kind of push a claim is for (`call.incoming` or `call.cancel`): a cancel
-- waits for the rings of its call that are still in flight, and finds them by it.
ALTER TABLE delivery_claims ADD COLUMN event_type text;
