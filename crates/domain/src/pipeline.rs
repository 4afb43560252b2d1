//! The fetch → persist pipeline: every distinct id of an accepted callback is fetched
//! upstream by a fetch that starts after the callback was accepted, and online objects
//! are written to the store in batches.
//!
//! Per id there is at most one fetch in flight plus one pending: a callback that names an
//! id whose fetch is already running marks it to be fetched once more when that fetch
//! ends; a callback that names an id still waiting for a fetch slot shares that fetch,
//! which will start after it was accepted.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::expiry::ExpiryWaker;
use crate::id::{DistinctIds, ObjectId};
use crate::ports::{Clock, FetchError, ObjectSource, ObjectStore, StoreError, StoredObject};
use crate::time::Timestamp;

/// How the pipeline behaves.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// How long after `last_seen` an object expires.
    pub ttl: Duration,
    /// How many upstream fetches may be in flight at once.
    pub max_in_flight: usize,
    /// How many objects one store write may carry.
    pub max_batch: usize,
    /// How many distinct ids may wait or be in flight before callbacks are refused.
    pub max_pending_ids: usize,
    /// How many failures are kept for operators to read.
    pub failures_kept: usize,
    /// How many times a failed store write is tried before its ids are recorded as failed.
    pub store_attempts: u32,
    /// The first pause between store write attempts; it doubles each time.
    pub store_retry_base: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            max_in_flight: 512,
            max_batch: 1_000,
            max_pending_ids: 1_000_000,
            failures_kept: 1_000,
            store_attempts: 6,
            store_retry_base: Duration::from_millis(100),
        }
    }
}

/// One id whose processing failed, kept for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedFetch {
    /// The object.
    pub id: ObjectId,
    /// A short stable code: `timeout`, `status`, `store`, …
    pub code: &'static str,
    /// The cause, as text.
    pub reason: String,
    /// When the failure was recorded.
    pub at: Timestamp,
}

/// Counters of what the pipeline did since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Callbacks accepted.
    pub accepted_callbacks: u64,
    /// Distinct ids accepted, summed over callbacks.
    pub accepted_ids: u64,
    /// Upstream fetches started.
    pub fetches_started: u64,
    /// Fetches that reported the object online.
    pub online: u64,
    /// Fetches that reported the object offline.
    pub offline: u64,
    /// Ids recorded as failed (upstream or store).
    pub failed: u64,
    /// Objects written to the store.
    pub stored: u64,
    /// Store writes done.
    pub store_batches: u64,
    /// Distinct ids waiting for or in a fetch right now.
    pub pending_ids: u64,
}

/// Why a callback was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Too much work is waiting; the client should retry later.
    #[error("too many ids are waiting to be processed ({pending} of at most {limit})")]
    Overloaded {
        /// Ids waiting now.
        pending: usize,
        /// The configured bound.
        limit: usize,
    },
    /// The service is shutting down.
    #[error("the service is shutting down")]
    ShuttingDown,
}

#[derive(Debug, Clone, Copy)]
enum IdState {
    /// Waiting for a fetch slot; the fetch has not started.
    Queued,
    /// A fetch is running; `again` when a callback accepted after it started needs another.
    InFlight { again: bool },
}

#[derive(Debug, Default)]
struct WorkState {
    ids: HashMap<ObjectId, IdState>,
    queue: VecDeque<ObjectId>,
    closed: bool,
}

#[derive(Debug, Default)]
struct Counters {
    accepted_callbacks: AtomicU64,
    accepted_ids: AtomicU64,
    fetches_started: AtomicU64,
    online: AtomicU64,
    offline: AtomicU64,
    failed: AtomicU64,
    stored: AtomicU64,
    store_batches: AtomicU64,
}

struct Shared {
    config: PipelineConfig,
    clock: Arc<dyn Clock>,
    work: Mutex<WorkState>,
    work_ready: Notify,
    counters: Counters,
    failures: Mutex<VecDeque<FailedFetch>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks cannot leave the state half-updated
    // in a way later users could not cope with, so a poisoned lock is simply taken over.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn record_failure(&self, id: ObjectId, code: &'static str, reason: String) {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        let mut failures = lock(&self.failures);
        if failures.len() >= self.config.failures_kept.max(1) {
            failures.pop_front();
        }
        failures.push_back(FailedFetch {
            id,
            code,
            reason,
            at: self.clock.now(),
        });
    }

    /// Takes the next queued id and marks its fetch as started.
    fn next_id(&self) -> Option<ObjectId> {
        let mut work = lock(&self.work);
        let id = work.queue.pop_front()?;
        work.ids.insert(id, IdState::InFlight { again: false });
        Some(id)
    }

    /// Ends the fetch of `id`, queueing another one when a later callback asked for it.
    fn finish(&self, id: ObjectId) {
        let mut work = lock(&self.work);
        match work.ids.get(&id) {
            Some(IdState::InFlight { again: true }) => {
                work.ids.insert(id, IdState::Queued);
                work.queue.push_back(id);
                drop(work);
                self.work_ready.notify_one();
            }
            _ => {
                work.ids.remove(&id);
            }
        }
    }

    fn is_done(&self) -> bool {
        let work = lock(&self.work);
        work.closed && work.queue.is_empty()
    }
}

/// A cheap, cloneable handle for submitting accepted callbacks and reading the counters.
#[derive(Debug, Clone)]
pub struct PipelineHandle {
    shared: Arc<Shared>,
}

impl PipelineHandle {
    /// Hands the distinct ids of an accepted callback to the pipeline.
    pub fn submit(&self, ids: &DistinctIds) -> Result<(), SubmitError> {
        let shared = &self.shared;
        let mut work = lock(&shared.work);
        if work.closed {
            return Err(SubmitError::ShuttingDown);
        }
        let limit = shared.config.max_pending_ids;
        if work.ids.len() + ids.len() > limit {
            return Err(SubmitError::Overloaded {
                pending: work.ids.len(),
                limit,
            });
        }
        let mut queued = 0usize;
        for &id in ids.as_slice() {
            match work.ids.entry(id) {
                Entry::Vacant(slot) => {
                    slot.insert(IdState::Queued);
                    work.queue.push_back(id);
                    queued += 1;
                }
                Entry::Occupied(mut slot) => {
                    if let IdState::InFlight { again } = slot.get_mut() {
                        *again = true;
                    }
                }
            }
        }
        drop(work);
        shared
            .counters
            .accepted_callbacks
            .fetch_add(1, Ordering::Relaxed);
        shared
            .counters
            .accepted_ids
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        for _ in 0..queued.min(shared.config.max_in_flight) {
            shared.work_ready.notify_one();
        }
        Ok(())
    }

    /// The counters since start.
    pub fn stats(&self) -> PipelineStats {
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PipelineStats {
            accepted_callbacks: load(&c.accepted_callbacks),
            accepted_ids: load(&c.accepted_ids),
            fetches_started: load(&c.fetches_started),
            online: load(&c.online),
            offline: load(&c.offline),
            failed: load(&c.failed),
            stored: load(&c.stored),
            store_batches: load(&c.store_batches),
            pending_ids: lock(&self.shared.work).ids.len() as u64,
        }
    }

    /// The most recent failures, oldest first.
    pub fn recent_failures(&self) -> Vec<FailedFetch> {
        lock(&self.shared.failures).iter().cloned().collect()
    }
}

/// The running pipeline: fetch workers and the batching store writer.
#[derive(Debug)]
pub struct Pipeline {
    handle: PipelineHandle,
    tasks: JoinSet<()>,
    abort: CancellationToken,
}

impl Pipeline {
    /// Starts the workers and the writer on the current tokio runtime.
    pub fn start(
        source: Arc<dyn ObjectSource>,
        store: Arc<dyn ObjectStore>,
        clock: Arc<dyn Clock>,
        expiry: ExpiryWaker,
        config: PipelineConfig,
    ) -> Self {
        let max_in_flight = config.max_in_flight.max(1);
        let max_batch = config.max_batch.max(1);
        let shared = Arc::new(Shared {
            config,
            clock,
            work: Mutex::new(WorkState::default()),
            work_ready: Notify::new(),
            counters: Counters::default(),
            failures: Mutex::new(VecDeque::new()),
        });
        let abort = CancellationToken::new();
        let (results_tx, results_rx) = mpsc::channel(max_batch * 2);
        let mut tasks = JoinSet::new();
        for _ in 0..max_in_flight {
            tasks.spawn(fetch_worker(
                Arc::clone(&shared),
                Arc::clone(&source),
                results_tx.clone(),
                abort.clone(),
            ));
        }
        drop(results_tx);
        tasks.spawn(store_writer(
            Arc::clone(&shared),
            store,
            expiry,
            results_rx,
            max_batch,
            abort.clone(),
        ));
        Self {
            handle: PipelineHandle { shared },
            tasks,
            abort,
        }
    }

    /// A handle for submitting callbacks.
    pub fn handle(&self) -> PipelineHandle {
        self.handle.clone()
    }

    /// Refuses new callbacks, lets the work already accepted finish for at most `grace`,
    /// then stops; returns how many distinct ids were left unprocessed.
    pub async fn shutdown(mut self, grace: Duration) -> usize {
        lock(&self.handle.shared.work).closed = true;
        self.handle.shared.work_ready.notify_waiters();
        let drained = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        if !drained {
            self.abort.cancel();
            while self.tasks.join_next().await.is_some() {}
        }
        let left = lock(&self.handle.shared.work).ids.len();
        if left == 0 {
            tracing::info!("pipeline drained");
        } else {
            tracing::warn!(
                left,
                ?grace,
                "pipeline stopped before all accepted ids were processed"
            );
        }
        left
    }
}

enum Fetched {
    Online(StoredObject),
}

async fn fetch_worker(
    shared: Arc<Shared>,
    source: Arc<dyn ObjectSource>,
    results: mpsc::Sender<Fetched>,
    abort: CancellationToken,
) {
    loop {
        let Some(id) = shared.next_id() else {
            let ready = shared.work_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if shared.is_done() {
                return;
            }
            if let Some(id) = shared.next_id() {
                // Someone else may be waiting on the notification we consumed.
                shared.work_ready.notify_one();
                if !process(&shared, &*source, &results, &abort, id).await {
                    return;
                }
                continue;
            }
            tokio::select! {
                () = &mut ready => continue,
                () = abort.cancelled() => return,
            }
        };
        if !process(&shared, &*source, &results, &abort, id).await {
            return;
        }
    }
}

/// Fetches one id and routes the outcome; returns false when the pipeline is aborting.
async fn process(
    shared: &Shared,
    source: &dyn ObjectSource,
    results: &mpsc::Sender<Fetched>,
    abort: &CancellationToken,
    id: ObjectId,
) -> bool {
    shared
        .counters
        .fetches_started
        .fetch_add(1, Ordering::Relaxed);
    let outcome = tokio::select! {
        outcome = source.fetch(id) => outcome,
        () = abort.cancelled() => return false,
    };
    let keep_going = match outcome {
        Ok(status) if status.id != id => {
            let err = FetchError::IdMismatch {
                asked: id,
                got: status.id.get(),
            };
            fetch_failed(shared, id, &err);
            true
        }
        Ok(status) if status.online => {
            shared.counters.online.fetch_add(1, Ordering::Relaxed);
            let last_seen = shared.clock.now();
            let object = StoredObject {
                id,
                last_seen,
                expires_at: last_seen.saturating_add(shared.config.ttl),
            };
            results.send(Fetched::Online(object)).await.is_ok()
        }
        Ok(_) => {
            shared.counters.offline.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(err) => {
            fetch_failed(shared, id, &err);
            true
        }
    };
    shared.finish(id);
    keep_going
}

fn fetch_failed(shared: &Shared, id: ObjectId, err: &FetchError) {
    tracing::warn!(object_id = %id, code = err.code(), error = %err, "fetch failed");
    shared.record_failure(id, err.code(), err.to_string());
}

async fn store_writer(
    shared: Arc<Shared>,
    store: Arc<dyn ObjectStore>,
    expiry: ExpiryWaker,
    mut results: mpsc::Receiver<Fetched>,
    max_batch: usize,
    abort: CancellationToken,
) {
    let mut received = Vec::with_capacity(max_batch);
    let mut by_id: HashMap<ObjectId, StoredObject> = HashMap::with_capacity(max_batch);
    loop {
        received.clear();
        let n = tokio::select! {
            n = results.recv_many(&mut received, max_batch) => n,
            () = abort.cancelled() => return,
        };
        if n == 0 {
            return; // every worker is gone: the pipeline is shut down
        }
        // One id may have been fetched twice since the last write: keep its latest sighting,
        // so the batch names each id once.
        by_id.clear();
        for Fetched::Online(object) in received.drain(..) {
            by_id
                .entry(object.id)
                .and_modify(|kept| {
                    if object.last_seen > kept.last_seen {
                        *kept = object;
                    }
                })
                .or_insert(object);
        }
        let batch: Vec<StoredObject> = by_id.values().copied().collect();
        match write_with_retries(&shared, &*store, &batch, &abort).await {
            Ok(()) => {
                shared
                    .counters
                    .store_batches
                    .fetch_add(1, Ordering::Relaxed);
                shared
                    .counters
                    .stored
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if let Some(earliest) = batch.iter().map(|o| o.expires_at).min() {
                    expiry.offer(earliest);
                }
            }
            Err(err) => {
                tracing::error!(ids = batch.len(), error = %err, "store write failed for good; ids recorded as failed");
                for object in &batch {
                    shared.record_failure(object.id, "store", err.to_string());
                }
            }
        }
    }
}

async fn write_with_retries(
    shared: &Shared,
    store: &dyn ObjectStore,
    batch: &[StoredObject],
    abort: &CancellationToken,
) -> Result<(), StoreError> {
    let attempts = shared.config.store_attempts.max(1);
    let mut pause = shared.config.store_retry_base;
    let mut attempt = 1;
    loop {
        match store.upsert_seen(batch).await {
            Ok(()) => return Ok(()),
            Err(err) if attempt >= attempts => return Err(err),
            Err(err) => {
                tracing::warn!(attempt, ids = batch.len(), error = %err, retry_in = ?pause, "store write failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = abort.cancelled() => return Err(err),
                }
                pause = (pause * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests;
