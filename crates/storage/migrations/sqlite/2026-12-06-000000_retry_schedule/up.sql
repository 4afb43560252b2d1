-- The durable retry schedule. A fetch that fails transiently (connect error, timeout, 5xx,
-- 429) no longer ends an id: its row stays, unleased (`lease_owner` NULL), and
-- `lease_until` is its next attempt's time, so the claim that takes expired leases takes
-- it when it is due. `attempts` counts the failed attempts so far, `last_error` keeps the
-- latest cause (`code: reason`). ADD COLUMN with a constant default rewrites nothing:
-- existing rows read the default.
ALTER TABLE inbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE inbox ADD COLUMN last_error TEXT NULL;

-- Dead letters: `fetch_failures` keeps every one until an operator replays or purges it,
-- or `failures.retention_ms` passes (the 10 000 cap is gone). `attempts` is how many
-- fetches were tried in all; rows recorded before this migration had one.
ALTER TABLE fetch_failures ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
-- The retention purge and the time filters of `GET /failures` read by `failed_at`.
CREATE INDEX fetch_failures_failed_at_idx ON fetch_failures (failed_at);
-- Replay and purge by id, and `GET /failures?ids=`.
CREATE INDEX fetch_failures_object_id_idx ON fetch_failures (object_id);
