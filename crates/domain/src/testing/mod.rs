//! In-memory fakes of every port, for tests of the domain, the adapters and the bins.
//!
//! They follow tokio's clock, so tests run with `#[tokio::test(start_paused = true)]` and
//! drive time with `tokio::time::advance` instead of sleeping.

pub mod conformance;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::id::ObjectId;
use crate::ports::{
    Backlog, BoxFuture, Claim, Clock, Completion, DeadLetter, FailureFilter, FailureQuery,
    FetchError, Inbox, ObjectSource, ObjectStatus, ObjectStore, Outcome, Requested, StoreError,
    StoredObject, TraceParent,
};
use crate::time::Timestamp;

/// A wall clock that moves with tokio's (possibly paused) clock.
#[derive(Debug, Clone)]
pub struct PausedClock {
    wall_start: Timestamp,
    tokio_start: Instant,
}

impl PausedClock {
    /// A clock that reads the real wall time now and then follows tokio's clock.
    pub fn new() -> Self {
        Self {
            wall_start: Timestamp::from_system_time(SystemTime::now()),
            tokio_start: Instant::now(),
        }
    }
}

impl Default for PausedClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for PausedClock {
    fn now(&self) -> Timestamp {
        self.wall_start.saturating_add(self.tokio_start.elapsed())
    }
}

/// One id waiting in the fake inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InboxRow {
    generation: i64,
    requested_at: Timestamp,
    /// `(holder, until)`; an empty holder is a row handed back for a refetch, claimable
    /// at `until` and held by nobody (the adapters' NULL owner with a `lease_until`).
    lease: Option<(String, Timestamp)>,
    trace: Option<TraceParent>,
    /// Failed attempts scheduled again, and the latest one's cause.
    attempts: u32,
    last_error: Option<String>,
}

/// An [`ObjectStore`] and [`Inbox`] in memory, with switches to simulate outages and panics.
#[derive(Debug, Default)]
pub struct MemoryStore {
    rows: Mutex<BTreeMap<ObjectId, StoredObject>>,
    inbox: Mutex<BTreeMap<ObjectId, InboxRow>>,
    /// The dead letters by `seq`, and the last `seq` given out.
    failures: Mutex<(BTreeMap<i64, DeadLetter>, i64)>,
    enqueues: Mutex<Vec<usize>>,
    batches: Mutex<Vec<usize>>,
    delete_calls: AtomicUsize,
    claim_calls: AtomicUsize,
    unavailable: AtomicBool,
    disk_full: AtomicBool,
    panic_on_read: AtomicBool,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many rows are kept, expired or not.
    pub fn len(&self) -> usize {
        self.rows.lock().unwrap().len()
    }

    /// Whether no row is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many online objects each successful write carried (`upsert_seen`, or
    /// `complete` with at least one online object), in order.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }

    /// How many ids each successful `enqueue` carried, in order: one entry per transaction.
    pub fn enqueue_sizes(&self) -> Vec<usize> {
        self.enqueues.lock().unwrap().clone()
    }

    /// How many ids wait in the inbox.
    pub fn inbox_len(&self) -> usize {
        self.inbox.lock().unwrap().len()
    }

    /// The failed attempts counted for `id` and the latest one's cause, while it waits.
    pub fn attempts(&self, id: ObjectId) -> Option<(u32, Option<String>)> {
        let inbox = self.inbox.lock().unwrap();
        inbox
            .get(&id)
            .map(|row| (row.attempts, row.last_error.clone()))
    }

    /// How many dead letters are kept.
    pub fn dead_letter_count(&self) -> usize {
        self.failures.lock().unwrap().0.len()
    }

    fn enqueue_rows(&self, requests: &[Requested], at: Timestamp) {
        let mut inbox = self.inbox.lock().unwrap();
        for request in requests {
            inbox
                .entry(request.id)
                .and_modify(|row| {
                    row.generation += 1;
                    if request.trace.is_some() {
                        row.trace.clone_from(&request.trace);
                    }
                })
                .or_insert(InboxRow {
                    generation: 1,
                    requested_at: at,
                    lease: None,
                    trace: request.trace.clone(),
                    attempts: 0,
                    last_error: None,
                });
        }
    }

    /// Removes the dead letters `filter` selects and returns them, oldest first.
    fn take_failures(&self, filter: &FailureFilter) -> Vec<DeadLetter> {
        let mut failures = self.failures.lock().unwrap();
        let seqs: Vec<i64> = failures
            .0
            .values()
            .filter(|letter| selects(filter, letter))
            .map(|letter| letter.seq)
            .collect();
        seqs.iter()
            .filter_map(|seq| failures.0.remove(seq))
            .collect()
    }

    fn upsert(&self, batch: &[StoredObject]) {
        let mut rows = self.rows.lock().unwrap();
        for object in batch {
            rows.entry(object.id)
                .and_modify(|row| {
                    row.last_seen = row.last_seen.max(object.last_seen);
                    row.expires_at = row.expires_at.max(object.expires_at);
                })
                .or_insert(*object);
        }
        self.batches.lock().unwrap().push(batch.len());
    }

    /// How many times `claim` was called, whether it found work or not.
    pub fn claim_calls(&self) -> usize {
        self.claim_calls.load(Ordering::SeqCst)
    }

    /// How many times `delete_expired` was called.
    pub fn delete_calls(&self) -> usize {
        self.delete_calls.load(Ordering::SeqCst)
    }

    /// Makes every call fail as if the database were gone (or brings it back).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Makes every write fail as on a full disk while reads and pings still work (or
    /// frees the disk again).
    pub fn set_disk_full(&self, full: bool) {
        self.disk_full.store(full, Ordering::SeqCst);
    }

    /// Makes `get` and `list` panic, to test that callers survive a panic.
    pub fn set_panic_on_read(&self, panic: bool) {
        self.panic_on_read.store(panic, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "connection refused (simulated)".into(),
            ))
        } else {
            Ok(())
        }
    }

    fn check_write(&self) -> Result<(), StoreError> {
        self.check()?;
        if self.disk_full.load(Ordering::SeqCst) {
            Err(StoreError::Query(
                "database or disk is full (simulated)".into(),
            ))
        } else {
            Ok(())
        }
    }

    fn check_read(&self) -> Result<(), StoreError> {
        assert!(
            !self.panic_on_read.load(Ordering::SeqCst),
            "simulated panic in the store"
        );
        self.check()
    }
}

impl ObjectStore for MemoryStore {
    fn upsert_seen<'a>(
        &'a self,
        batch: &'a [StoredObject],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.upsert(batch);
            Ok(())
        })
    }

    fn delete_expired(
        &self,
        cutoff: Timestamp,
        limit: usize,
    ) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.delete_calls.fetch_add(1, Ordering::SeqCst);
            let mut rows = self.rows.lock().unwrap();
            let due: Vec<ObjectId> = rows
                .values()
                .filter(|row| row.expires_at <= cutoff)
                .map(|row| row.id)
                .take(limit)
                .collect();
            for id in &due {
                rows.remove(id);
            }
            Ok(due.len() as u64)
        })
    }

    fn next_expiry(&self) -> BoxFuture<'_, Result<Option<Timestamp>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            Ok(self
                .rows
                .lock()
                .unwrap()
                .values()
                .map(|row| row.expires_at)
                .min())
        })
    }

    fn get(
        &self,
        id: ObjectId,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<StoredObject>, StoreError>> {
        Box::pin(async move {
            self.check_read()?;
            Ok(self
                .rows
                .lock()
                .unwrap()
                .get(&id)
                .filter(|row| row.expires_at > now)
                .copied())
        })
    }

    fn list(
        &self,
        now: Timestamp,
        after: Option<ObjectId>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredObject>, StoreError>> {
        Box::pin(async move {
            self.check_read()?;
            let rows = self.rows.lock().unwrap();
            Ok(rows
                .values()
                .filter(|row| after.is_none_or(|after| row.id > after))
                .filter(|row| row.expires_at > now)
                .take(limit)
                .copied()
                .collect())
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.check() })
    }
}

impl Inbox for MemoryStore {
    fn enqueue<'a>(
        &'a self,
        requests: &'a [Requested],
        at: Timestamp,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.check_write()?;
            self.enqueue_rows(requests, at);
            self.enqueues.lock().unwrap().push(requests.len());
            Ok(())
        })
    }

    fn claim<'a>(
        &'a self,
        owner: &'a str,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Claim>, StoreError>> {
        Box::pin(async move {
            self.claim_calls.fetch_add(1, Ordering::SeqCst);
            self.check()?;
            let mut inbox = self.inbox.lock().unwrap();
            let mut free: Vec<(Timestamp, ObjectId)> = inbox
                .iter()
                .filter(|(_, row)| row.lease.as_ref().is_none_or(|(_, until)| *until <= now))
                .map(|(id, row)| (row.requested_at, *id))
                .collect();
            free.sort();
            let mut claims = Vec::new();
            for (_, id) in free.into_iter().take(limit) {
                let row = inbox.get_mut(&id).expect("listed above");
                row.lease = Some((owner.to_owned(), lease_until));
                claims.push(Claim {
                    id,
                    generation: row.generation,
                    trace: row.trace.clone(),
                    attempts: row.attempts,
                    requested_at: row.requested_at,
                });
            }
            Ok(claims)
        })
    }

    fn complete<'a>(
        &'a self,
        owner: &'a str,
        done: &'a [Completion],
        again_from: Timestamp,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.check_write()?;
            let online: Vec<StoredObject> = done
                .iter()
                .filter_map(|c| match &c.outcome {
                    Outcome::Online(object) => Some(*object),
                    _ => None,
                })
                .collect();
            if !online.is_empty() {
                self.upsert(&online);
            }
            {
                let mut failures = self.failures.lock().unwrap();
                let (letters, last_seq) = &mut *failures;
                for completion in done {
                    if let Outcome::Failed(record) = &completion.outcome {
                        *last_seq += 1;
                        let letter = DeadLetter {
                            seq: *last_seq,
                            record: record.clone(),
                        };
                        letters.insert(*last_seq, letter);
                    }
                }
            }
            let mut inbox = self.inbox.lock().unwrap();
            for completion in done {
                let id = completion.claim.id;
                let held = |row: &InboxRow| {
                    row.lease
                        .as_ref()
                        .is_some_and(|(holder, _)| holder == owner)
                };
                if let Some(row) = inbox.get_mut(&id).filter(|row| held(row)) {
                    if let Outcome::Retry(retry) = &completion.outcome {
                        // Nobody's lease, running out at the next attempt's time.
                        row.lease = Some((String::new(), retry.at));
                        row.attempts += 1;
                        row.last_error = Some(format!("{}: {}", retry.code, retry.reason));
                    } else if row.generation == completion.claim.generation {
                        inbox.remove(&id);
                    } else {
                        // Nobody's lease, running out at `again_from`: claimable then.
                        row.lease = Some((String::new(), again_from));
                    }
                }
            }
            Ok(())
        })
    }

    fn release<'a>(&'a self, owner: Option<&'a str>) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            self.check()?;
            let mut freed = 0;
            for row in self.inbox.lock().unwrap().values_mut() {
                let held = match (&row.lease, owner) {
                    (Some((holder, _)), None) => !holder.is_empty(),
                    (Some((holder, _)), Some(owner)) => holder == owner,
                    (None, _) => false,
                };
                if held {
                    row.lease = None;
                    freed += 1;
                }
            }
            Ok(freed)
        })
    }

    fn renew<'a>(
        &'a self,
        owner: &'a str,
        lease_until: Timestamp,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            self.check()?;
            let mut renewed = 0;
            for row in self.inbox.lock().unwrap().values_mut() {
                if let Some((holder, until)) = &mut row.lease
                    && holder == owner
                {
                    *until = lease_until;
                    renewed += 1;
                }
            }
            Ok(renewed)
        })
    }

    fn backlog(&self) -> BoxFuture<'_, Result<Backlog, StoreError>> {
        Box::pin(async move {
            self.check()?;
            let inbox = self.inbox.lock().unwrap();
            let retrying = || inbox.values().filter(|row| row.attempts > 0);
            Ok(Backlog {
                pending: inbox.len() as u64,
                oldest: inbox.values().map(|row| row.requested_at).min(),
                retrying: retrying().count() as u64,
                oldest_retrying: retrying().map(|row| row.requested_at).min(),
            })
        })
    }

    fn failures<'a>(
        &'a self,
        query: &'a FailureQuery,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            let failures = self.failures.lock().unwrap();
            let below = query.before.unwrap_or(i64::MAX);
            Ok(failures
                .0
                .range(..below)
                .rev()
                .map(|(_, letter)| letter)
                .filter(|letter| selects(&query.filter, letter))
                .take(query.limit)
                .cloned()
                .collect())
        })
    }

    fn replay_failures<'a>(
        &'a self,
        filter: &'a FailureFilter,
        at: Timestamp,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            self.check_write()?;
            let taken = self.take_failures(filter);
            let mut ids: Vec<ObjectId> = taken.iter().map(|letter| letter.record.id).collect();
            ids.sort_unstable();
            ids.dedup();
            let requests: Vec<Requested> = ids.into_iter().map(Requested::untraced).collect();
            self.enqueue_rows(&requests, at);
            Ok(taken.len() as u64)
        })
    }

    fn purge_failures<'a>(
        &'a self,
        filter: &'a FailureFilter,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            self.check_write()?;
            Ok(self.take_failures(filter).len() as u64)
        })
    }
}

/// Whether `filter` selects `letter`: every condition given holds.
pub fn selects(filter: &FailureFilter, letter: &DeadLetter) -> bool {
    let record = &letter.record;
    filter
        .ids
        .as_ref()
        .is_none_or(|ids| ids.contains(&record.id))
        && filter.code.as_ref().is_none_or(|code| *code == record.code)
        && filter.since.is_none_or(|since| record.at >= since)
        && filter.until.is_none_or(|until| record.at < until)
}

/// What a [`FakeSource`] answers for one id.
pub type Rule = Arc<dyn Fn(ObjectId) -> Result<bool, FetchError> + Send + Sync>;

/// One fetch a [`FakeSource`] served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchRecord {
    /// The id asked for.
    pub id: ObjectId,
    /// When the fetch started, on tokio's clock.
    pub started: Instant,
}

/// An [`ObjectSource`] that answers after a fixed latency on tokio's clock: online when
/// the id is even unless told otherwise, and records every fetch.
pub struct FakeSource {
    latency: Duration,
    rule: Mutex<Rule>,
    fetches: Mutex<Vec<FetchRecord>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl std::fmt::Debug for FakeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeSource")
            .field("latency", &self.latency)
            .finish_non_exhaustive()
    }
}

impl FakeSource {
    /// A source that answers after `latency`, online when the id is even.
    pub fn new(latency: Duration) -> Self {
        Self {
            latency,
            rule: Mutex::new(Arc::new(|id: ObjectId| Ok(id.get() % 2 == 0))),
            fetches: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    /// Replaces what the source answers.
    pub fn set_rule(
        &self,
        rule: impl Fn(ObjectId) -> Result<bool, FetchError> + Send + Sync + 'static,
    ) {
        *self.rule.lock().unwrap() = Arc::new(rule);
    }

    /// Every fetch started so far, in order.
    pub fn fetches(&self) -> Vec<FetchRecord> {
        self.fetches.lock().unwrap().clone()
    }

    /// How many fetches of each id were started.
    pub fn fetch_counts(&self) -> HashMap<ObjectId, usize> {
        let mut counts = HashMap::new();
        for record in self.fetches.lock().unwrap().iter() {
            *counts.entry(record.id).or_default() += 1;
        }
        counts
    }

    /// The most fetches that were ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

impl ObjectSource for FakeSource {
    fn fetch(&self, id: ObjectId) -> BoxFuture<'_, Result<ObjectStatus, FetchError>> {
        Box::pin(async move {
            self.fetches.lock().unwrap().push(FetchRecord {
                id,
                started: Instant::now(),
            });
            let now_in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight
                .fetch_max(now_in_flight, Ordering::SeqCst);
            tokio::time::sleep(self.latency).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let rule = Arc::clone(&self.rule.lock().unwrap());
            rule(id).map(|online| ObjectStatus { id, online })
        })
    }
}
