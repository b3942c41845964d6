-- The W3C trace context (`traceparent` header) of a delivery kept with its body: a parked or
-- unmatched delivery replayed on (re)connect continues the trace that began at ingest's POST.
-- NULL where traces were off or the row keeps no body.
ALTER TABLE webhook_inbox ADD COLUMN traceparent text;
