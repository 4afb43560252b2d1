-- Dropping a table drops its indexes (and `fetch_failures`' sequence) too.
DROP TABLE fetch_failures;
DROP TABLE inbox;
