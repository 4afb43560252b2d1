-- The durable inbox of accepted callbacks: one row per distinct id waiting for (or being
-- given) an upstream fetch. A callback is accepted once its ids are committed here; an id
-- leaves only in the transaction that records the outcome of a fetch that started after
-- every request its row counts.
--
-- - `generation` counts the requests of the id while it waited: requesting a waiting id
--   again bumps it, and a fetch settles the row only if the generation is still the one
--   it claimed.
-- - `requested_at` is when the first still-waiting request arrived.
-- - `lease_owner` and `lease_until` are the worker instance that claimed the id and until
--   when; both are NULL while the id waits for a worker. A lease that ran out makes the id
--   claimable again, so another instance takes over the work of one that died.
CREATE TABLE inbox (
    object_id    bigint      PRIMARY KEY,
    generation   bigint      NOT NULL DEFAULT 1,
    requested_at timestamptz NOT NULL,
    lease_owner  text        NULL,
    lease_until  timestamptz NULL
);

-- Workers claim the longest-waiting ids first, and the health check asks for the oldest.
CREATE INDEX inbox_requested_at_idx ON inbox (requested_at);

-- Fetches that failed for good, for operators. Bounded: every write that adds failures
-- deletes all but the newest 10 000 (by `seq`).
CREATE TABLE fetch_failures (
    seq       bigserial   PRIMARY KEY,
    object_id bigint      NOT NULL,
    code      text        NOT NULL,
    reason    text        NOT NULL,
    failed_at timestamptz NOT NULL
);
