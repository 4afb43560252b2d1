-- Dropping the table drops its index too.
DROP TABLE objects;
