-- The trace context (W3C `traceparent` text) of the newest request for the id that carried
-- one, so its fetch joins that request's trace even after a restart or on another
-- instance. NULL while traces are off.
ALTER TABLE inbox ADD COLUMN trace TEXT NULL;
