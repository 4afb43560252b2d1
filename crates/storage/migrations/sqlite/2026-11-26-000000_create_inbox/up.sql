-- The durable inbox of accepted callbacks: one row per distinct id waiting for (or being
-- given) an upstream fetch. A callback is accepted once its ids are committed here; an id
-- leaves only in the transaction that records the outcome of a fetch that started after
-- every request its row counts. The PostgreSQL backend keeps the same columns.
--
-- - `generation` counts the requests of the id while it waited: requesting a waiting id
--   again bumps it, and a fetch settles the row only if the generation is still the one
--   it claimed.
-- - `requested_at` is when the first still-waiting request arrived.
-- - `lease_owner` and `lease_until` are the worker that claimed the id and until when;
--   both are NULL while the id waits for a worker. A lease that ran out makes the id
--   claimable again.
--
-- Times are INTEGER microseconds since the Unix epoch (UTC), as in `objects`.
-- `object_id` is `INTEGER PRIMARY KEY` (SQLite's rowid), as `objects.id` is.
CREATE TABLE inbox (
    object_id    INTEGER PRIMARY KEY NOT NULL,
    generation   BIGINT  NOT NULL DEFAULT 1,
    requested_at BIGINT  NOT NULL,
    lease_owner  TEXT    NULL,
    lease_until  BIGINT  NULL
);

-- Workers claim the longest-waiting ids first, and the health check asks for the oldest.
CREATE INDEX inbox_requested_at_idx ON inbox (requested_at);

-- Fetches that failed for good, for operators. Bounded: every write that adds failures
-- deletes all but the newest 10 000 (by `seq`). AUTOINCREMENT: a `seq` is never reused,
-- so a larger `seq` is always a newer failure, even after the newest rows were deleted.
CREATE TABLE fetch_failures (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    object_id BIGINT  NOT NULL,
    code      TEXT    NOT NULL,
    reason    TEXT    NOT NULL,
    failed_at BIGINT  NOT NULL
);
