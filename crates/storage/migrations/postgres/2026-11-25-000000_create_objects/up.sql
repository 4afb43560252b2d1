-- The objects the upstream reported online. Operators and external checks read this
-- table by these names; the SQLite backend keeps the same columns.
--
-- `last_seen` and `expires_at` are `timestamptz`, microsecond precision like
-- `domain::Timestamp`, so an instant survives the round trip unchanged. A row is
-- logically gone from `expires_at` on, whether or not the sweeper has deleted it yet.
CREATE TABLE objects (
    id         bigint      PRIMARY KEY,
    last_seen  timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);

-- The sweeper asks for `min(expires_at)` and deletes by `expires_at <= cutoff`.
CREATE INDEX objects_expires_at_idx ON objects (expires_at);
