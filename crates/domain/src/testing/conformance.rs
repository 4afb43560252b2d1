//! The conformance suite of the [`ObjectStore`](crate::ports::ObjectStore) port: written
//! once, run against the in-memory fake and every database adapter.
