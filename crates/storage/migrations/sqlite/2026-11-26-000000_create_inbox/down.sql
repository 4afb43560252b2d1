-- Dropping a table drops its indexes too.
DROP TABLE fetch_failures;
DROP TABLE inbox;
