-- The trace context (W3C `traceparent` text) of the newest request for the id that carried
-- one, so its fetch joins that request's trace even after a restart or on another
-- instance. NULL while traces are off. Adding a nullable column without a default is a
-- catalogue change only: no table rewrite.
ALTER TABLE inbox ADD COLUMN trace text NULL;
