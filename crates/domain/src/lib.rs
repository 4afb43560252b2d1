//! The heart of callback-service: types, ports and the fetch → persist → expire pipeline.
//!
//! This crate knows nothing about HTTP, databases or any other I/O: adapters implement
//! the [`ports`] and the binaries wire them together. Every port has an in-memory fake in
//! `testing` (feature `testing`) so the pipeline can be driven by tokio's paused clock.

pub mod app;
pub mod breaker;
pub mod expiry;
pub mod id;
pub mod log_budget;
pub mod metrics;
pub mod pipeline;
pub mod ports;
pub mod readiness;
pub mod retry;
pub mod time;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use app::{AcceptError, Accepted, Application, Health};
pub use breaker::{BreakerConfig, BreakerState, BreakerStatus};
pub use expiry::{ExpiryConfig, ExpiryWaker, Sweeper};
pub use id::{DistinctIds, InvalidObjectId, ObjectId};
pub use pipeline::{Pipeline, PipelineConfig, PipelineHandle, PipelineStats, SubmitError};
pub use ports::{
    Backlog, BoxFuture, Claim, Clock, Completion, Database, DeadLetter, FailureFilter,
    FailureQuery, FailureRecord, FetchError, Inbox, NoTracePropagation, ObjectSource, ObjectStatus,
    ObjectStore, Outcome, Requested, Retry, StoreError, StoredObject, TraceParent,
    TracePropagation,
};
pub use readiness::{NotReady, ReadinessMonitor};
pub use time::{SystemClock, Timestamp};
