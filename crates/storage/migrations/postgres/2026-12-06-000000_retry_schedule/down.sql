DROP INDEX fetch_failures_object_id_idx;
DROP INDEX fetch_failures_failed_at_idx;
ALTER TABLE fetch_failures DROP COLUMN attempts;
ALTER TABLE inbox DROP COLUMN last_error;
ALTER TABLE inbox DROP COLUMN attempts;
