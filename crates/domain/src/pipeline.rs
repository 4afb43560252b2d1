//! The pipeline behind an accepted callback, around the durable [`Inbox`](crate::Inbox):
//!
//! 1. **Ingest (group commit).** Callbacks queue for one writer, which commits the distinct
//!    ids of every waiting callback in one inbox transaction and only then answers them, so
//!    `202` means durable and durability does not cap throughput.
//! 2. **Fetch.** A dispatcher leases waiting ids from the inbox, at most `max_in_flight` at a
//!    time, and fetches each upstream. Because an id waits in the inbox at most once and a
//!    new request for it bumps its generation, callbacks naming the same id share one fetch
//!    that started after all of them were accepted, and a request arriving during a fetch
//!    gets a fetch of its own afterwards (one in flight plus one pending per id).
//! 3. **Complete.** Outcomes are settled in batches, each in one transaction: online objects
//!    upserted, failures recorded, inbox rows removed. A crash anywhere before that commit
//!    leaves the lease to run out (or be released at start), and the id is fetched again.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::breaker::{Admit, Breaker, BreakerConfig, BreakerStatus};
use crate::expiry::ExpiryWaker;
use crate::id::{DistinctIds, ObjectId};
use crate::log_budget::LogBudget;
use crate::metrics::{self, PipelineMetrics};
use crate::ports::{
    Backlog, Claim, Clock, Completion, Database, DeadLetter, FailureFilter, FailureQuery,
    FailureRecord, FetchError, ObjectSource, Outcome, Requested, Retry, StoreError, StoredObject,
    TraceParent, TracePropagation,
};
use crate::retry::{Jitter, RetryPolicy};
use crate::time::Timestamp;

/// How the pipeline behaves.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// How long after `last_seen` an object expires.
    pub ttl: Duration,
    /// How many upstream fetches may be in flight at once.
    pub max_in_flight: usize,
    /// How many outcomes one completing transaction may settle.
    pub max_batch: usize,
    /// How many callbacks one inbox transaction may commit together.
    pub max_group: usize,
    /// How many distinct ids may wait before callbacks are refused with 503.
    pub max_pending_ids: usize,
    /// How long a claimed id stays leased to this instance without a heartbeat. While
    /// this instance holds claims, a heartbeat renews them every third of this, so a fetch
    /// may take longer; an instance that dies leaves its claims to others this long after
    /// its last heartbeat.
    pub lease: Duration,
    /// How often to look for ids whose lease ran out (another instance died) and to
    /// refresh the backlog figures.
    pub poll_interval: Duration,
    /// How long the first outcome of a batch waits for more before the batch is committed,
    /// unless the batch fills up first. Fewer, larger
    /// completing transactions at low rates, for at most this much extra lag.
    pub store_linger: Duration,
    /// How long an id requested again while it was being fetched waits, after that fetch,
    /// before its next fetch: requests arriving meanwhile share it. Bounds the fetch rate
    /// of a hot id to one per `refetch_delay` plus the upstream's answer time, at the cost
    /// of that much extra lag for repeated requests.
    pub refetch_delay: Duration,
    /// The first pause after a failed inbox operation; it doubles up to five seconds.
    pub retry_base: Duration,
    /// The name leases are taken under; unique per running instance, and the same across
    /// its restarts so that a restarted instance takes its own leases back at once.
    pub owner: String,
    /// When a transiently failed fetch is tried again, and for how long.
    pub retry: RetryPolicy,
    /// Seeds the retry jitter.
    pub jitter_seed: u64,
    /// How long a dead letter is kept unless an operator replays or purges it first;
    /// `Duration::ZERO` keeps them for ever.
    pub failure_retention: Duration,
    /// When fetching pauses to spare a failing upstream.
    pub breaker: BreakerConfig,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            max_in_flight: 512,
            max_batch: 1_000,
            max_group: 1_024,
            max_pending_ids: 1_000_000,
            lease: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            store_linger: Duration::from_millis(100),
            refetch_delay: Duration::from_millis(250),
            retry_base: Duration::from_millis(100),
            owner: "callback-service".to_owned(),
            retry: RetryPolicy::default(),
            jitter_seed: 0x5EED,
            failure_retention: Duration::from_secs(7 * 24 * 3600),
            breaker: BreakerConfig::default(),
        }
    }
}

const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// How many "fetch failed" lines are logged per second at most; every failure is still
/// counted and recorded in the failures table.
const FAILURE_LINES_PER_SECOND: u32 = 10;

/// How long a failed inbox write keeps the database reported as failing when no write
/// has been tried since: a health check that fails a service out of its load balancer
/// must not keep it out for good once no callback comes to try again.
const WRITE_FAILURE_REPORTED_FOR: Duration = Duration::from_secs(30);

/// A component's latest failure while it is failing, until its next success: the inbox
/// writes (disk full, read-only file, I/O errors, though the database may answer pings)
/// and the upstream (unreachable, timed out, 5xx or 429 after every retry). Every write or
/// fetch reports here; while the component works, that costs one atomic load.
#[derive(Debug)]
struct LatestFailure<E> {
    failing: AtomicBool,
    latest: std::sync::Mutex<Option<(Timestamp, E)>>,
}

impl<E> Default for LatestFailure<E> {
    fn default() -> Self {
        Self {
            failing: AtomicBool::new(false),
            latest: std::sync::Mutex::new(None),
        }
    }
}

impl<E: Clone> LatestFailure<E> {
    /// Notes how one operation at `now` ended: `Some(error)` if it failed.
    fn note(&self, failure: Option<E>, now: Timestamp) {
        match failure {
            Some(err) => {
                *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, err));
                self.failing.store(true, Ordering::Release);
            }
            None if self.failing.load(Ordering::Relaxed) => {
                self.failing.store(false, Ordering::Release);
            }
            None => {}
        }
    }

    /// The latest failure and when it happened, while failing.
    fn current(&self) -> Option<(Timestamp, E)> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Counters of what the pipeline did since start, and the inbox backlog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Callbacks accepted (committed to the inbox).
    pub accepted_callbacks: u64,
    /// Distinct ids accepted, summed over callbacks.
    pub accepted_ids: u64,
    /// Inbox transactions that accepted callbacks (group commits).
    pub group_commits: u64,
    /// Upstream fetches started.
    pub fetches_started: u64,
    /// Fetches that reported the object online.
    pub online: u64,
    /// Fetches that reported the object offline.
    pub offline: u64,
    /// Ids recorded as failed for good (dead letters).
    pub failed: u64,
    /// Transient failures handed back to the inbox for a later attempt.
    pub retries_scheduled: u64,
    /// Objects written to the store.
    pub stored: u64,
    /// Completing transactions that wrote objects.
    pub store_batches: u64,
    /// Distinct ids waiting in the inbox or being fetched (as last seen).
    pub pending_ids: u64,
    /// How long the longest-waiting id has waited, in milliseconds (as last seen).
    pub oldest_pending_ms: u64,
    /// Of the pending ids, those waiting for a retry after a transient failure (as last
    /// seen).
    pub retrying_ids: u64,
    /// How long the longest-waiting of the retrying ids has waited since its first
    /// request, in milliseconds (as last seen).
    pub oldest_retrying_ms: u64,
}

/// Why a callback was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Too much work is waiting; the client should retry later.
    #[error("too many ids are waiting to be processed ({pending} of at most {limit})")]
    Overloaded {
        /// Ids waiting now.
        pending: u64,
        /// The configured bound.
        limit: usize,
    },
    /// The inbox could not record the callback.
    #[error("the callback could not be recorded: {0}")]
    Unavailable(StoreError),
    /// The service is shutting down.
    #[error("the service is shutting down")]
    ShuttingDown,
}

#[derive(Debug, Default)]
struct Counters {
    accepted_callbacks: AtomicU64,
    accepted_ids: AtomicU64,
    group_commits: AtomicU64,
    fetches_started: AtomicU64,
    online: AtomicU64,
    offline: AtomicU64,
    failed: AtomicU64,
    retries_scheduled: AtomicU64,
    stored: AtomicU64,
    store_batches: AtomicU64,
    pending: AtomicU64,
    /// Microseconds since the epoch of the oldest waiting request; `i64::MIN` for none.
    oldest: AtomicI64,
    retrying: AtomicU64,
    /// As `oldest`, of the ids waiting for a retry.
    oldest_retrying: AtomicI64,
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

struct Shared {
    config: PipelineConfig,
    clock: Arc<dyn Clock>,
    db: Arc<dyn Database>,
    propagation: Arc<dyn TracePropagation>,
    /// Bounds the "fetch failed" lines when many ids fail at once (upstream down).
    failure_log: LogBudget,
    /// Draws the pause before each retry.
    jitter: Jitter,
    /// Whether the upstream is failing, as the latest fetches found it.
    upstream: LatestFailure<String>,
    /// Pauses claiming while the upstream keeps failing.
    breaker: Breaker,
    /// Whether inbox writes are failing, as the latest ones found.
    writes: LatestFailure<StoreError>,
    counters: Counters,
    metrics: PipelineMetrics,
    /// Ids claimed by this instance and not yet settled (being fetched, or their outcome
    /// waiting for its commit).
    unsettled: AtomicU64,
    /// Wakes the dispatcher: new work committed.
    work_ready: Notify,
    /// Wakes the dispatcher when fetch permits free up (a fetch ended); it listens only
    /// while its last claim was cut short by the permits, so an ended fetch does not cost
    /// an empty claim.
    capacity_freed: Notify,
    /// When ids handed back for a refetch become claimable (microseconds since the epoch on
    /// the pipeline's clock; `i64::MAX` for none): the dispatcher wakes then.
    next_claimable: AtomicI64,
    closed: AtomicBool,
}

impl Shared {
    /// Takes back `n` ids counted as pending (a refused reservation, or settled ids).
    fn release_pending(&self, n: u64) {
        let _ = self
            .counters
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |p| {
                Some(p.saturating_sub(n))
            });
    }

    fn note_backlog(&self, backlog: Backlog) {
        self.counters
            .pending
            .store(backlog.pending, Ordering::Relaxed);
        let c = &self.counters;
        let micros = |at: Option<Timestamp>| at.map_or(i64::MIN, Timestamp::as_unix_micros);
        c.oldest.store(micros(backlog.oldest), Ordering::Relaxed);
        c.retrying.store(backlog.retrying, Ordering::Relaxed);
        c.oldest_retrying
            .store(micros(backlog.oldest_retrying), Ordering::Relaxed);
        let now = self.clock.now();
        let waited = |at: Option<Timestamp>| {
            metrics::seconds(at.map_or(Duration::ZERO, |at| now.saturating_duration_since(at)))
        };
        let m = &self.metrics;
        m.backlog.set(backlog.pending as f64);
        m.oldest_pending.set(waited(backlog.oldest));
        m.retrying.set(backlog.retrying as f64);
        m.oldest_retrying.set(waited(backlog.oldest_retrying));
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct Request {
    ids: DistinctIds,
    /// The trace context of the callback, kept with its ids in the inbox.
    trace: Option<TraceParent>,
    reply: oneshot::Sender<Result<(), SubmitError>>,
}

/// A cheap, cloneable handle for submitting callbacks and reading the counters.
#[derive(Debug, Clone)]
pub struct PipelineHandle {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
}

impl PipelineHandle {
    /// Records the distinct ids of a callback in the inbox; returns once they are durable.
    pub async fn submit(&self, ids: DistinctIds) -> Result<(), SubmitError> {
        let outcome = self.record(ids).await;
        if let Err(err) = &outcome {
            let m = &self.shared.metrics;
            match err {
                SubmitError::Overloaded { .. } => m.rejected_overloaded.increment(1),
                SubmitError::Unavailable(_) => m.rejected_unavailable.increment(1),
                SubmitError::ShuttingDown => m.rejected_shutting_down.increment(1),
            }
        }
        outcome
    }

    async fn record(&self, ids: DistinctIds) -> Result<(), SubmitError> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        // Reserve the ids before anything waits, so concurrent callbacks cannot all pass
        // the bound at once; the reservation is taken back if the callback is not recorded.
        let n = ids.len() as u64;
        let limit = shared.config.max_pending_ids;
        let pending = shared.counters.pending.fetch_add(n, Ordering::AcqRel);
        if pending.saturating_add(n) > limit as u64 {
            shared.release_pending(n);
            return Err(SubmitError::Overloaded { pending, limit });
        }
        let (reply, answer) = oneshot::channel();
        let trace = shared.propagation.current();
        if self
            .requests
            .send(Request { ids, trace, reply })
            .await
            .is_err()
        {
            shared.release_pending(n);
            return Err(SubmitError::ShuttingDown);
        }
        // The ingest writer takes the reservation back when the inbox refuses the callback.
        answer.await.unwrap_or(Err(SubmitError::ShuttingDown))
    }

    /// The counters since start, with the backlog as last seen.
    pub fn stats(&self) -> PipelineStats {
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let now = self.shared.clock.now();
        let waited_ms = |at: &AtomicI64| match at.load(Ordering::Relaxed) {
            i64::MIN => 0,
            at => {
                let waited = now.saturating_duration_since(Timestamp::from_unix_micros(at));
                u64::try_from(waited.as_millis()).unwrap_or(u64::MAX)
            }
        };
        PipelineStats {
            accepted_callbacks: load(&c.accepted_callbacks),
            accepted_ids: load(&c.accepted_ids),
            group_commits: load(&c.group_commits),
            fetches_started: load(&c.fetches_started),
            online: load(&c.online),
            offline: load(&c.offline),
            failed: load(&c.failed),
            retries_scheduled: load(&c.retries_scheduled),
            stored: load(&c.stored),
            store_batches: load(&c.store_batches),
            pending_ids: load(&c.pending),
            oldest_pending_ms: waited_ms(&c.oldest),
            retrying_ids: load(&c.retrying),
            oldest_retrying_ms: waited_ms(&c.oldest_retrying),
        }
    }

    /// The dead letters `query` selects, newest first.
    pub async fn failures(&self, query: &FailureQuery) -> Result<Vec<DeadLetter>, StoreError> {
        self.shared.db.failures(query).await
    }

    /// Puts the objects of the dead letters `filter` selects back in the inbox, to be
    /// fetched again, and deletes those dead letters; returns how many were replayed.
    pub async fn replay_failures(&self, filter: &FailureFilter) -> Result<u64, StoreError> {
        let shared = &self.shared;
        let replayed = shared
            .db
            .replay_failures(filter, shared.clock.now())
            .await
            .inspect_err(|_| metrics::store_error("replay_failures"))?;
        if replayed > 0 {
            shared.metrics.dead_letters_replayed.increment(replayed);
            shared.work_ready.notify_one();
            tracing::info!(replayed, ?filter, "dead letters replayed into the inbox");
        }
        Ok(replayed)
    }

    /// Deletes the dead letters `filter` selects; returns how many went.
    pub async fn purge_failures(&self, filter: &FailureFilter) -> Result<u64, StoreError> {
        let purged = self
            .shared
            .db
            .purge_failures(filter)
            .await
            .inspect_err(|_| metrics::store_error("purge_failures"))?;
        if purged > 0 {
            ::metrics::counter!(metrics::DEAD_LETTERS_PURGED, "reason" => "operator")
                .increment(purged);
            tracing::info!(purged, ?filter, "dead letters purged by an operator");
        }
        Ok(purged)
    }

    /// `Err` with the cause while the upstream is failing: the latest fetch that ended
    /// found it unreachable, timing out or answering 5xx/429 after every retry.
    pub fn upstream_health(&self) -> Result<(), String> {
        self.shared
            .upstream
            .current()
            .map_or(Ok(()), |(_, cause)| Err(cause))
    }

    /// `pipeline.max_pending_ids`: past it callbacks are refused.
    pub fn max_pending_ids(&self) -> usize {
        self.shared.config.max_pending_ids
    }

    /// Where the upstream circuit breaker stands.
    pub fn breaker(&self) -> BreakerStatus {
        self.shared.breaker.status(tokio::time::Instant::now())
    }

    /// The error of the latest inbox write while writes are failing (the disk is full, say)
    /// though the database may still answer reads; `Ok` once a write succeeds again, or
    /// when none has been tried for a while.
    pub fn write_health(&self) -> Result<(), StoreError> {
        match self.shared.writes.current() {
            Some((at, err))
                if self.shared.clock.now() < at.saturating_add(WRITE_FAILURE_REPORTED_FOR) =>
            {
                Err(err)
            }
            _ => Ok(()),
        }
    }
}

/// The running pipeline: the ingest writer, the dispatcher with its fetches, the completer
/// and the backlog monitor.
#[derive(Debug)]
pub struct Pipeline {
    handle: PipelineHandle,
    ingest: tokio::task::JoinHandle<()>,
    dispatcher: tokio::task::JoinHandle<JoinSet<()>>,
    completer: tokio::task::JoinHandle<()>,
    monitor: tokio::task::JoinHandle<()>,
    heartbeat: tokio::task::JoinHandle<()>,
    stop_claiming: CancellationToken,
    abort: CancellationToken,
}

impl Pipeline {
    /// Starts the pipeline on the current tokio runtime; it at once picks up work left in
    /// the inbox by an earlier run.
    ///
    /// `propagation` carries each callback's trace context through the inbox to the spans
    /// of its fetches and store writes.
    pub fn start(
        source: Arc<dyn ObjectSource>,
        db: Arc<dyn Database>,
        clock: Arc<dyn Clock>,
        expiry: ExpiryWaker,
        propagation: Arc<dyn TracePropagation>,
        config: PipelineConfig,
    ) -> Self {
        let max_in_flight = config.max_in_flight.max(1);
        let max_batch = config.max_batch.max(1);
        let max_group = config.max_group.max(1);
        let jitter = Jitter::new(config.jitter_seed);
        let breaker = Breaker::new(config.breaker);
        let shared = Arc::new(Shared {
            config,
            clock,
            db,
            propagation,
            failure_log: LogBudget::new(FAILURE_LINES_PER_SECOND),
            jitter,
            upstream: LatestFailure::default(),
            breaker,
            writes: LatestFailure::default(),
            counters: Counters {
                oldest: AtomicI64::new(i64::MIN),
                oldest_retrying: AtomicI64::new(i64::MIN),
                ..Counters::default()
            },
            metrics: PipelineMetrics::register(),
            unsettled: AtomicU64::new(0),
            work_ready: Notify::new(),
            capacity_freed: Notify::new(),
            next_claimable: AtomicI64::new(i64::MAX),
            closed: AtomicBool::new(false),
        });
        let stop_claiming = CancellationToken::new();
        let abort = CancellationToken::new();
        let permits = Arc::new(Semaphore::new(max_in_flight));
        let (requests, requests_rx) = mpsc::channel(max_group * 2);
        let (done_tx, done_rx) = mpsc::channel(max_in_flight);
        let ingest = tokio::spawn(ingest(Arc::clone(&shared), requests_rx, max_group));
        let dispatcher = tokio::spawn(dispatch(
            Arc::clone(&shared),
            source,
            Arc::clone(&permits),
            done_tx,
            stop_claiming.clone(),
            abort.clone(),
        ));
        let completer = tokio::spawn(complete(
            Arc::clone(&shared),
            expiry,
            done_rx,
            max_batch,
            abort.clone(),
        ));
        let monitor = tokio::spawn(monitor(Arc::clone(&shared), stop_claiming.clone()));
        let heartbeat = tokio::spawn(heartbeat(Arc::clone(&shared), abort.clone()));
        Self {
            handle: PipelineHandle { shared, requests },
            ingest,
            dispatcher,
            completer,
            monitor,
            heartbeat,
            stop_claiming,
            abort,
        }
    }

    /// A handle for submitting callbacks.
    pub fn handle(&self) -> PipelineHandle {
        self.handle.clone()
    }

    /// Refuses new callbacks, stops claiming, lets the fetches in flight finish and be
    /// recorded for at most `grace`, then hands any unfinished claim back to the inbox.
    /// Returns how many claimed ids were handed back; accepted ids not yet claimed simply
    /// stay in the inbox for the next run.
    pub async fn shutdown(self, grace: Duration) -> usize {
        let Self {
            handle,
            ingest,
            dispatcher,
            mut completer,
            monitor,
            heartbeat,
            stop_claiming,
            abort,
        } = self;
        let shared = Arc::clone(&handle.shared);
        shared.closed.store(true, Ordering::Release);
        drop(handle); // the ingest writer ends once every handle is gone
        stop_claiming.cancel();
        let _ = monitor.await;
        let deadline = tokio::time::Instant::now() + grace;
        let fetched = tokio::time::timeout_at(deadline, async {
            let mut fetches = dispatcher.await.unwrap_or_default();
            while fetches.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        // Every fetch has handed its outcome over and dropped its sender, as has the
        // dispatcher: the completer commits what it holds, then returns.
        let drained = fetched
            && tokio::time::timeout_at(deadline, &mut completer)
                .await
                .is_ok();
        let in_flight =
            usize::try_from(shared.unsettled.load(Ordering::Acquire)).unwrap_or(usize::MAX);
        abort.cancel();
        if !drained {
            let _ = completer.await;
        }
        let _ = heartbeat.await;
        if tokio::time::timeout(grace, ingest).await.is_err() {
            tracing::warn!("ingest writer did not stop in time");
        }
        match shared.db.release(Some(&shared.config.owner)).await {
            Ok(0) => {}
            Ok(freed) => tracing::info!(freed, "handed unfinished claims back to the inbox"),
            Err(err) => tracing::warn!(error = %err, "could not release leases; they will run out"),
        }
        let backlog = shared.db.backlog().await.map(|b| b.pending).ok();
        if drained {
            tracing::info!(waiting_in_inbox = ?backlog, "pipeline stopped after finishing the fetches in flight");
        } else {
            tracing::warn!(unfinished = in_flight, ?grace, waiting_in_inbox = ?backlog,
                "pipeline stopped before the fetches in flight finished; they stay in the inbox");
        }
        if drained { 0 } else { in_flight }
    }
}

/// The group-commit writer: one inbox transaction for every callback waiting at once.
async fn ingest(shared: Arc<Shared>, mut requests: mpsc::Receiver<Request>, max_group: usize) {
    let mut batch: Vec<Request> = Vec::with_capacity(max_group);
    // Every id of the group with the index of its callback. Each callback's ids are
    // ascending, so a stable sort by id merges those runs; the first of each id is then
    // the first callback naming it, whose trace context the id keeps.
    let mut named: Vec<(ObjectId, usize)> = Vec::new();
    let mut ids: Vec<Requested> = Vec::new();
    loop {
        batch.clear();
        if requests.recv_many(&mut batch, max_group).await == 0 {
            return; // every handle is gone
        }
        named.clear();
        for (index, request) in batch.iter().enumerate() {
            named.extend(request.ids.as_slice().iter().map(|&id| (id, index)));
        }
        named.sort_by_key(|&(id, _)| id);
        named.dedup_by_key(|(id, _)| *id);
        ids.clear();
        ids.extend(named.iter().map(|&(id, index)| Requested {
            id,
            trace: batch[index].trace.clone(),
        }));
        let now = shared.clock.now();
        let outcome = shared.db.enqueue(&ids, now).await;
        shared.writes.note(outcome.as_ref().err().cloned(), now);
        match &outcome {
            Ok(()) => {
                let c = &shared.counters;
                let accepted_ids = batch.iter().map(|r| r.ids.len()).sum();
                add(&c.group_commits, 1);
                add(&c.accepted_callbacks, batch.len());
                add(&c.accepted_ids, accepted_ids);
                let m = &shared.metrics;
                m.group_commits.increment(1);
                m.callbacks_accepted.increment(batch.len() as u64);
                m.ids_accepted.increment(accepted_ids as u64);
                // The callbacks reserved their ids as pending when they were admitted; ids
                // several of them named are one inbox row: keep one each. (Still an upper
                // bound, ids already waiting count again, until the monitor reads the real
                // figure.)
                shared.release_pending(accepted_ids.saturating_sub(ids.len()) as u64);
                shared.work_ready.notify_one();
            }
            Err(err) => {
                let reserved: usize = batch.iter().map(|r| r.ids.len()).sum();
                shared.release_pending(reserved as u64);
                metrics::store_error("enqueue");
                tracing::warn!(callbacks = batch.len(), ids = ids.len(), error = %err,
                    "inbox write failed; callbacks answered 503");
            }
        }
        for request in batch.drain(..) {
            let answer = outcome.clone().map_err(SubmitError::Unavailable);
            let _ = request.reply.send(answer); // the client may have gone; nothing to do
        }
    }
}

/// Leases waiting ids and starts their fetches, never more than the permits allow.
async fn dispatch(
    shared: Arc<Shared>,
    source: Arc<dyn ObjectSource>,
    permits: Arc<Semaphore>,
    done: mpsc::Sender<Completion>,
    stop: CancellationToken,
    abort: CancellationToken,
) -> JoinSet<()> {
    let mut fetches = JoinSet::new();
    let mut pause = shared.config.retry_base;
    let mut wait = Duration::ZERO;
    // Whether the last claim took every free permit, so more work may be claimable as
    // soon as a permit frees up.
    let mut starved = false;
    // Whether this instance's leases left by an earlier run (killed, say) were taken back.
    let mut reclaimed = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return fetches,
            () = shared.work_ready.notified() => {}
            () = shared.capacity_freed.notified(), if starved => {}
            () = tokio::time::sleep(wait) => {}
        }
        while fetches.try_join_next().is_some() {}
        wait = shared.config.poll_interval;
        if !reclaimed {
            // Nothing of this run is leased yet: every lease under our name is stale, and
            // taking it back now saves waiting for it to run out.
            match shared.db.release(Some(&shared.config.owner)).await {
                Ok(freed) => {
                    reclaimed = true;
                    if freed > 0 {
                        tracing::info!(freed, instance_id = %shared.config.owner,
                            "took back the work an earlier run of this instance had claimed");
                    }
                }
                Err(err) => {
                    metrics::store_error("release");
                    tracing::warn!(error = %err, retry_in = ?pause,
                        "cannot take back this instance's earlier leases");
                    wait = pause;
                    pause = (pause * 2).min(MAX_RETRY_PAUSE);
                    continue;
                }
            }
        }
        // Ids handed back for a refetch become claimable at `next_claimable`: wake then.
        let now = shared.clock.now().as_unix_micros();
        let due = shared.next_claimable.load(Ordering::Acquire);
        if due <= now {
            let _ = shared.next_claimable.compare_exchange(
                due,
                i64::MAX,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        } else if due != i64::MAX {
            let until = Duration::from_micros(u64::try_from(due - now).unwrap_or(u64::MAX));
            wait = wait.min(until);
        }
        loop {
            let free = permits.available_permits();
            if free == 0 || stop.is_cancelled() {
                starved = true; // the completer wakes us when capacity frees up
                break;
            }
            // While the upstream keeps failing, claim nothing until the breaker's cool-down
            // ends, then one id as its probe; the ids wait in the inbox meanwhile.
            let instant = tokio::time::Instant::now();
            let (wanted, probe) = match shared.breaker.admit(instant) {
                Admit::All => (free, false),
                Admit::Probe => (1, true),
                Admit::Nothing { until } => {
                    starved = false; // a fetch that ends reports to the breaker, which wakes us
                    if let Some(until) = until {
                        wait = wait.min(until.saturating_duration_since(instant));
                    }
                    break;
                }
            };
            let now = shared.clock.now();
            let lease_until = now.saturating_add(shared.config.lease);
            let claims = match shared
                .db
                .claim(&shared.config.owner, now, lease_until, wanted)
                .await
            {
                Ok(claims) => {
                    pause = shared.config.retry_base;
                    claims
                }
                Err(err) => {
                    if probe {
                        shared.breaker.probe_unused(tokio::time::Instant::now());
                    }
                    metrics::store_error("claim");
                    tracing::warn!(error = %err, retry_in = ?pause, "cannot claim work from the inbox");
                    wait = pause;
                    pause = (pause * 2).min(MAX_RETRY_PAUSE);
                    break;
                }
            };
            let claimed = claims.len();
            if probe && claimed == 0 {
                shared.breaker.probe_unused(tokio::time::Instant::now());
            }
            starved = !probe && claimed == free;
            shared.unsettled.fetch_add(claimed as u64, Ordering::AcqRel);
            for claim in claims {
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    break; // cannot happen: only this task takes permits
                };
                fetches.spawn(fetch(
                    Arc::clone(&shared),
                    Arc::clone(&source),
                    claim,
                    permit,
                    done.clone(),
                    abort.clone(),
                ));
            }
            if probe || claimed < free {
                break; // nothing more is claimable now, or only the probe may run
            }
        }
    }
}

/// Fetches one claimed id and hands its outcome to the completer.
async fn fetch(
    shared: Arc<Shared>,
    source: Arc<dyn ObjectSource>,
    claim: Claim,
    permit: OwnedSemaphorePermit,
    done: mpsc::Sender<Completion>,
    abort: CancellationToken,
) {
    add(&shared.counters.fetches_started, 1);
    let m = &shared.metrics;
    let id = claim.id;
    // A child of the callback that asked, wherever and whenever that was accepted.
    let span = tracing::info_span!("fetch", object_id = %id, outcome = tracing::field::Empty);
    if let Some(parent) = &claim.trace {
        shared.propagation.set_parent(&span, parent);
    }
    let started = tokio::time::Instant::now();
    m.in_flight.increment(1);
    let answer = tokio::select! {
        answer = source.fetch(id).instrument(span.clone()) => Some(answer),
        () = abort.cancelled() => None,
    };
    m.in_flight.decrement(1);
    let Some(answer) = answer else {
        return; // aborted: the claim goes back to the inbox
    };
    m.fetch_duration.record(metrics::seconds(started.elapsed()));
    let now = shared.clock.now();
    let transient = answer.as_ref().err().filter(|err| err.is_transient());
    if shared
        .breaker
        .record(transient.is_none(), tokio::time::Instant::now())
    {
        shared.work_ready.notify_one(); // the breaker moved: claim again, or wait for it
    }
    shared
        .upstream
        .note(transient.map(ToString::to_string), now);
    let answer = answer.and_then(|status| {
        if status.id == id {
            Ok(status)
        } else {
            Err(FetchError::IdMismatch {
                asked: id,
                got: status.id.get(),
            })
        }
    });
    let outcome = match answer {
        Ok(status) if status.online => {
            span.record("outcome", "online");
            add(&shared.counters.online, 1);
            m.online.increment(1);
            Outcome::Online(StoredObject {
                id,
                last_seen: now,
                expires_at: now.saturating_add(shared.config.ttl),
            })
        }
        Ok(_) => {
            span.record("outcome", "offline");
            add(&shared.counters.offline, 1);
            m.offline.increment(1);
            Outcome::Offline
        }
        Err(err) => failed(&shared, &claim, &err, now, &span),
    };
    if !matches!(outcome, Outcome::Retry(_)) {
        m.attempts
            .record(f64::from(claim.attempts.saturating_add(1)));
    }
    // Sent before the permit is freed: when the completer falls behind, fetching waits.
    let _ = done.send(Completion { claim, outcome }).await;
    drop(permit);
    shared.capacity_freed.notify_one();
}

/// What becomes of a claim whose fetch failed at `now`: another attempt later while the
/// failure is transient and the retry horizon has not passed, else a dead letter.
fn failed(
    shared: &Shared,
    claim: &Claim,
    err: &FetchError,
    now: Timestamp,
    span: &tracing::Span,
) -> Outcome {
    let failed_attempts = claim.attempts.saturating_add(1);
    let next = err
        .is_transient()
        .then(|| {
            shared.config.retry.next_attempt(
                failed_attempts,
                claim.requested_at,
                now,
                shared.jitter.unit(),
            )
        })
        .flatten();
    let m = &shared.metrics;
    let id = claim.id;
    let code = err.code();
    span.record("outcome", code);
    let logged = shared.failure_log.admit(now);
    if let Some(at) = next {
        add(&shared.counters.retries_scheduled, 1);
        m.retried.increment(1);
        ::metrics::counter!(metrics::RETRIES_SCHEDULED, "code" => code).increment(1);
        if let Some(suppressed) = logged {
            let retry_in = at.saturating_duration_since(now);
            span.in_scope(|| {
                tracing::info!(object_id = %id, code, error = %err, attempts = failed_attempts,
                    ?retry_in, suppressed_since_last = suppressed, "fetch failed; retrying later");
            });
        }
        return Outcome::Retry(Retry {
            at,
            code: code.to_owned(),
            reason: err.to_string(),
        });
    }
    add(&shared.counters.failed, 1);
    m.failed.increment(1);
    ::metrics::counter!(metrics::FETCH_FAILURES, "code" => code).increment(1);
    if let Some(suppressed) = logged {
        let why = if err.is_transient() {
            "retry horizon passed"
        } else {
            "permanent error"
        };
        span.in_scope(|| {
            tracing::warn!(object_id = %id, code, error = %err, attempts = failed_attempts,
                why, suppressed_since_last = suppressed, "fetch failed; recorded as a dead letter");
        });
    }
    Outcome::Failed(FailureRecord {
        id,
        code: code.to_owned(),
        reason: err.to_string(),
        at: now,
        attempts: failed_attempts,
    })
}

/// Settles outcomes in batches, one transaction each.
async fn complete(
    shared: Arc<Shared>,
    expiry: ExpiryWaker,
    mut done: mpsc::Receiver<Completion>,
    max_batch: usize,
    abort: CancellationToken,
) {
    let linger = shared.config.store_linger;
    let mut received: Vec<Completion> = Vec::with_capacity(max_batch);
    let mut carried: Vec<Completion> = Vec::new();
    let mut seen = HashSet::new();
    loop {
        if carried.is_empty() {
            let n = tokio::select! {
                n = done.recv_many(&mut received, max_batch) => n,
                () = abort.cancelled() => return,
            };
            if n == 0 {
                return; // every fetch and the dispatcher are gone
            }
            // Let more outcomes join. Fetching goes on meanwhile: a fetch frees its permit
            // once its outcome is handed over.
            let until = tokio::time::Instant::now() + linger;
            while !linger.is_zero() && received.len() < max_batch {
                let room = max_batch - received.len();
                let more = tokio::select! {
                    n = done.recv_many(&mut received, room) => n,
                    () = tokio::time::sleep_until(until) => break,
                    () = abort.cancelled() => return,
                };
                if more == 0 {
                    break; // closed: settle what is here
                }
            }
        } else {
            received.append(&mut carried);
        }
        // A batch names each id once; a second outcome for the same id waits for the next.
        seen.clear();
        let (completions, later): (Vec<Completion>, Vec<Completion>) =
            received.drain(..).partition(|c| seen.insert(c.claim.id));
        carried = later;
        if !settle(&shared, &completions, &abort).await {
            return; // aborting: the leases are released by shutdown
        }
        let online: Vec<&StoredObject> = completions
            .iter()
            .filter_map(|c| match &c.outcome {
                Outcome::Online(object) => Some(object),
                _ => None,
            })
            .collect();
        if let Some(earliest) = online.iter().map(|o| o.expires_at).min() {
            add(&shared.counters.store_batches, 1);
            add(&shared.counters.stored, online.len());
            expiry.offer(earliest);
        }
        // Ids handed back for a retry still wait in the inbox: they stay pending.
        let retried = completions
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Retry(_)))
            .count();
        shared.release_pending((completions.len() - retried) as u64);
        shared
            .unsettled
            .fetch_sub(completions.len() as u64, Ordering::AcqRel);
    }
}

/// Commits one batch of outcomes, retrying while the database is away; false when aborted.
///
/// The batch's span joins the trace of its first traced claim: a span has one parent, and
/// a batch usually settles the ids of one callback or of callbacks accepted together.
async fn settle(shared: &Shared, completions: &[Completion], abort: &CancellationToken) -> bool {
    let online = completions
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Online(_)))
        .count();
    let span = tracing::info_span!("store.batch", size = completions.len(), online);
    if let Some(parent) = completions.iter().find_map(|c| c.claim.trace.as_ref()) {
        shared.propagation.set_parent(&span, parent);
    }
    settle_with_retries(shared, completions, abort)
        .instrument(span)
        .await
}

async fn settle_with_retries(
    shared: &Shared,
    completions: &[Completion],
    abort: &CancellationToken,
) -> bool {
    let mut pause = shared.config.retry_base;
    loop {
        let started = tokio::time::Instant::now();
        let now = shared.clock.now();
        let again_from = now.saturating_add(shared.config.refetch_delay);
        let outcome = shared
            .db
            .complete(&shared.config.owner, completions, again_from)
            .await;
        shared.writes.note(outcome.as_ref().err().cloned(), now);
        match outcome {
            Ok(()) => {
                // Ids requested again during their fetch are claimable from `again_from`,
                // ids handed back for a retry from their next attempt's time: wake then.
                let earliest_retry = completions
                    .iter()
                    .filter_map(|c| match &c.outcome {
                        Outcome::Retry(retry) => Some(retry.at),
                        _ => None,
                    })
                    .min();
                let due = earliest_retry.map_or(again_from, |at| at.min(again_from));
                shared
                    .next_claimable
                    .fetch_min(due.as_unix_micros(), Ordering::AcqRel);
                let m = &shared.metrics;
                m.batch_duration.record(metrics::seconds(started.elapsed()));
                m.batch_size.record(completions.len() as f64);
                return true;
            }
            Err(err) => {
                metrics::store_error("complete");
                tracing::warn!(ids = completions.len(), error = %err, retry_in = ?pause,
                    "cannot record fetch outcomes; retrying");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = abort.cancelled() => return false,
                }
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
        }
    }
}

/// How often dead letters past their retention are purged.
const RETENTION_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Purges the dead letters recorded more than `failure_retention` ago; counted and logged
/// once per sweep that removed any.
async fn purge_expired_failures(shared: &Shared) {
    let retention = shared.config.failure_retention;
    if retention.is_zero() {
        return;
    }
    let cutoff = shared.clock.now().saturating_sub(retention);
    let filter = FailureFilter {
        until: Some(cutoff),
        ..FailureFilter::default()
    };
    match shared.db.purge_failures(&filter).await {
        Ok(0) => {}
        Ok(purged) => {
            ::metrics::counter!(metrics::DEAD_LETTERS_PURGED, "reason" => "retention")
                .increment(purged);
            tracing::info!(
                purged,
                ?retention,
                "dead letters past their retention purged"
            );
        }
        Err(err) => {
            metrics::store_error("purge_failures");
            tracing::warn!(error = %err, "cannot purge dead letters past their retention; trying again later");
        }
    }
}

/// Renews the leases of this instance's claims every third of a lease while it holds any,
/// so a fetch (with its retries) or a commit may take longer than a lease, and yet a
/// dead instance's claims are free for others a lease after its last heartbeat. Runs
/// until the pipeline aborts, after the last fetch in flight was recorded.
async fn heartbeat(shared: Arc<Shared>, abort: CancellationToken) {
    let every = (shared.config.lease / 3).max(Duration::from_millis(1));
    let renewals = ::metrics::counter!(metrics::LEASE_RENEWALS);
    let log = LogBudget::per_window(1, Duration::from_secs(10));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = abort.cancelled() => return,
        }
        if shared.unsettled.load(Ordering::Acquire) == 0 {
            continue; // nothing claimed: no round trip
        }
        let now = shared.clock.now();
        let until = now.saturating_add(shared.config.lease);
        match shared.db.renew(&shared.config.owner, until).await {
            Ok(_) => renewals.increment(1),
            Err(err) => {
                metrics::store_error("renew");
                if let Some(suppressed) = log.admit(now) {
                    tracing::warn!(error = %err, suppressed_since_last = suppressed,
                        "cannot renew the leases of this instance's claims; another instance may fetch them too once they run out");
                }
            }
        }
    }
}

/// Keeps the backlog figures fresh, and purges dead letters past their retention.
async fn monitor(shared: Arc<Shared>, stop: CancellationToken) {
    let mut next_purge = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_purge {
            purge_expired_failures(&shared).await;
            next_purge = tokio::time::Instant::now() + RETENTION_SWEEP_EVERY;
        }
        match shared.db.backlog().await {
            Ok(backlog) => shared.note_backlog(backlog),
            Err(err) => {
                metrics::store_error("backlog");
                tracing::debug!(error = %err, "cannot read the inbox backlog");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(shared.config.poll_interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests;
