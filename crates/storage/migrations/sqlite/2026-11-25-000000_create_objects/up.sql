-- The objects the upstream reported online. Operators and external checks read this
-- table by these names.
--
-- Times: `last_seen` and `expires_at` are INTEGER microseconds since the Unix epoch (UTC),
-- exactly `domain::Timestamp::as_unix_micros()`; PostgreSQL keeps the same instants as
-- `timestamptz`, which has the same microsecond precision. A row is logically gone from
-- `expires_at` on, whether or not the sweeper has deleted it yet.
--
-- `id` is declared `INTEGER PRIMARY KEY` rather than `BIGINT PRIMARY KEY`: only that exact
-- spelling makes the column SQLite's 64-bit rowid itself, so the table is one B-tree
-- keyed by id instead of a rowid table plus a separate unique index on id. The range is
-- the same signed 64 bits.
CREATE TABLE objects (
    id         INTEGER PRIMARY KEY NOT NULL,
    last_seen  BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- The sweeper asks for `min(expires_at)` and deletes by `expires_at <= cutoff`.
CREATE INDEX objects_expires_at_idx ON objects (expires_at);
