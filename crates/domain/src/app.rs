//! The application service the transports call: accept a callback, read what is stored,
//! report health.

use std::sync::Arc;
use std::time::Duration;

use crate::breaker::BreakerStatus;
use crate::id::{DistinctIds, ObjectId};
use crate::pipeline::{PipelineHandle, PipelineStats, SubmitError};
use crate::ports::{
    Clock, DeadLetter, FailureFilter, FailureQuery, ObjectStore, StoreError, StoredObject,
};
use crate::readiness::{NotReady, ReadinessMonitor, ReadinessState};
use crate::time::Timestamp;

/// What an accepted callback was recorded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// How many distinct ids it named.
    pub distinct: usize,
}

/// Why a callback was not accepted; the client may try again later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    /// The backlog is full.
    #[error("{reason}")]
    Overloaded {
        /// What is full.
        reason: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// The database could not record the callback.
    #[error("{reason}")]
    Unavailable {
        /// What went wrong.
        reason: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// The service is shutting down.
    #[error("the service is shutting down")]
    ShuttingDown {
        /// When to try again (another instance, or this one after restart).
        retry_after: Duration,
    },
}

impl AcceptError {
    /// How long the client should wait before trying again.
    pub fn retry_after(&self) -> Duration {
        match self {
            AcceptError::Overloaded { retry_after, .. }
            | AcceptError::Unavailable { retry_after, .. }
            | AcceptError::ShuttingDown { retry_after } => *retry_after,
        }
    }
}

/// What `GET /` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The database's answer to a ping, or the error of the latest inbox write while
    /// writes are failing.
    pub database: Result<(), StoreError>,
    /// `Err` with the cause while the upstream is failing. Callbacks are still accepted
    /// (they wait in the inbox), so this alone does not make the service unhealthy.
    pub upstream: Result<(), String>,
    /// Where the upstream circuit breaker stands: while it is open, nothing is fetched.
    pub breaker: BreakerStatus,
    /// The pipeline's counters.
    pub pipeline: PipelineStats,
}

impl Health {
    /// Whether every component is fine.
    pub fn is_ok(&self) -> bool {
        self.database.is_ok()
    }
}

/// The use cases of callback-service, over the ports.
#[derive(Clone)]
pub struct Application {
    pipeline: PipelineHandle,
    store: Arc<dyn ObjectStore>,
    clock: Arc<dyn Clock>,
    readiness: Arc<ReadinessState>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("pipeline", &self.pipeline)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Builds the application over a running pipeline and its store.
    pub fn new(
        pipeline: PipelineHandle,
        store: Arc<dyn ObjectStore>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            pipeline,
            store,
            clock,
            readiness: Arc::default(),
        }
    }

    /// Whether this instance can take callbacks now (`GET /readyz`): not shutting down,
    /// the database answered its latest ping and inbox writes succeed, the backlog below
    /// `pipeline.max_pending_ids`. Never waits: the database's part comes from the
    /// [`Application::readiness_monitor`], which must run for this to turn ready.
    pub fn readiness(&self) -> Result<(), NotReady> {
        self.readiness.check(&self.pipeline)
    }

    /// The task that pings the database for [`Application::readiness`]; run it once.
    pub fn readiness_monitor(&self) -> ReadinessMonitor {
        ReadinessMonitor {
            state: Arc::clone(&self.readiness),
            pipeline: self.pipeline.clone(),
            store: Arc::clone(&self.store),
        }
    }

    /// Says a shutdown has begun: from now on [`Application::readiness`] is
    /// [`NotReady::ShuttingDown`], while requests are still served, so load balancers
    /// stop sending before the listener closes.
    pub fn begin_shutdown(&self) {
        self.readiness.begin_shutdown();
        self.readiness.check(&self.pipeline).ok();
    }

    /// Records a callback durably; once this returns `Ok`, every distinct id will be
    /// processed, even if the service is killed right after.
    ///
    /// No span of its own: the transport's request span covers it (one span less per
    /// callback on the hot path), and the ids' fetches become children of that span.
    pub async fn accept_callback(&self, ids: DistinctIds) -> Result<Accepted, AcceptError> {
        let distinct = ids.len();
        match self.pipeline.submit(ids).await {
            Ok(()) => Ok(Accepted { distinct }),
            Err(err @ SubmitError::Overloaded { .. }) => Err(AcceptError::Overloaded {
                reason: err.to_string(),
                retry_after: Duration::from_secs(1),
            }),
            Err(err @ SubmitError::Unavailable(_)) => Err(AcceptError::Unavailable {
                reason: err.to_string(),
                retry_after: Duration::from_secs(1),
            }),
            Err(SubmitError::ShuttingDown) => Err(AcceptError::ShuttingDown {
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// The time now, as the application's clock tells it (the transport checks callers'
    /// timestamps against it).
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The stored object `id`, unless absent or past its TTL.
    pub async fn object(&self, id: ObjectId) -> Result<Option<StoredObject>, StoreError> {
        self.store.get(id, self.clock.now()).await
    }

    /// Up to `limit` stored objects after `after`, by ascending id, none past its TTL.
    pub async fn objects(
        &self,
        after: Option<ObjectId>,
        limit: usize,
    ) -> Result<Vec<StoredObject>, StoreError> {
        self.store.list(self.clock.now(), after, limit).await
    }

    /// Pings the database, adds whether its writes are failing, and reads the pipeline's
    /// counters.
    pub async fn health(&self) -> Health {
        Health {
            database: match self.store.ping().await {
                Ok(()) => self.pipeline.write_health(),
                Err(err) => Err(err),
            },
            upstream: self.pipeline.upstream_health(),
            breaker: self.pipeline.breaker(),
            pipeline: self.pipeline.stats(),
        }
    }

    /// The pipeline's counters, without touching the database.
    pub fn stats(&self) -> PipelineStats {
        self.pipeline.stats()
    }

    /// The dead letters (ids whose processing failed for good) `query` selects, newest
    /// first, as the database keeps them.
    pub async fn failures(&self, query: &FailureQuery) -> Result<Vec<DeadLetter>, StoreError> {
        self.pipeline.failures(query).await
    }

    /// Puts the objects of the dead letters `filter` selects back in the inbox, so they are
    /// fetched again; returns how many dead letters were replayed.
    pub async fn replay_failures(&self, filter: &FailureFilter) -> Result<u64, StoreError> {
        self.pipeline.replay_failures(filter).await
    }

    /// Deletes the dead letters `filter` selects; returns how many went.
    pub async fn purge_failures(&self, filter: &FailureFilter) -> Result<u64, StoreError> {
        self.pipeline.purge_failures(filter).await
    }
}
