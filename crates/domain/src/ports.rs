//! The ports: what the domain needs from the outside world, as traits adapters implement.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::id::ObjectId;
use crate::time::Timestamp;

/// A boxed, sendable future: what a port method returns so ports can be `Arc<dyn Port>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the upstream said about one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectStatus {
    /// The object asked for.
    pub id: ObjectId,
    /// Whether the upstream reports it online.
    pub online: bool,
}

/// An object kept in the store: seen online at `last_seen`, gone at `expires_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredObject {
    /// The object.
    pub id: ObjectId,
    /// When the upstream last reported it online.
    pub last_seen: Timestamp,
    /// `last_seen + ttl`: from this instant on the row is logically gone.
    pub expires_at: Timestamp,
}

/// Why asking the upstream about one object failed, after any retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// No connection could be made, or it broke before an answer.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// No answer within the request timeout.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The TLS handshake failed: the upstream's certificate was refused (another CA,
    /// another host name, expired) or the two sides share no protocol. Retried as an
    /// outage is, so no id is lost while the setting is fixed; its own code tells the
    /// operator it is a setting, not the network.
    #[error("upstream TLS handshake failed: {0}")]
    Tls(String),
    /// The upstream answered with a status other than 200.
    #[error("upstream answered status {0}")]
    Status(u16),
    /// The answer was not the JSON the contract promises.
    #[error("malformed upstream answer: {0}")]
    Malformed(String),
    /// The answer was about another object.
    #[error("upstream answered for id {got} when asked for {asked}")]
    IdMismatch {
        /// The id asked for.
        asked: ObjectId,
        /// The id in the answer.
        got: i64,
    },
}

impl FetchError {
    /// A short, stable code for metrics and operators: `unreachable`, `timeout`, …
    pub fn code(&self) -> &'static str {
        match self {
            FetchError::Unreachable(_) => "unreachable",
            FetchError::Timeout(_) => "timeout",
            FetchError::Tls(_) => "tls",
            FetchError::Status(_) => "status",
            FetchError::Malformed(_) => "malformed",
            FetchError::IdMismatch { .. } => "id_mismatch",
        }
    }

    /// Whether trying again may succeed (connect errors, timeouts, TLS failures, 5xx and
    /// 429).
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Unreachable(_) | FetchError::Timeout(_) | FetchError::Tls(_) => true,
            FetchError::Status(status) => *status == 429 || (500..=599).contains(status),
            FetchError::Malformed(_) | FetchError::IdMismatch { .. } => false,
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (connection refused or lost, pool timed out).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answered with an error.
    #[error("database error: {0}")]
    Query(String),
}

/// Asks the upstream about one object.
pub trait ObjectSource: Send + Sync + 'static {
    /// Fetches the status of `id`; retries of transient failures happen inside.
    fn fetch(&self, id: ObjectId) -> BoxFuture<'_, Result<ObjectStatus, FetchError>>;
}

/// Keeps the objects seen online, and forgets them when they expire.
pub trait ObjectStore: Send + Sync + 'static {
    /// Inserts or refreshes every object of `batch` in one operation.
    ///
    /// `batch` names each id at most once. A refresh never moves `last_seen` or
    /// `expires_at` backwards, so writes may arrive in any order and more than once.
    fn upsert_seen<'a>(
        &'a self,
        batch: &'a [StoredObject],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes at most `limit` rows whose `expires_at <= cutoff`; returns how many went.
    fn delete_expired(
        &self,
        cutoff: Timestamp,
        limit: usize,
    ) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// The earliest `expires_at` of all rows, if there is any row.
    fn next_expiry(&self) -> BoxFuture<'_, Result<Option<Timestamp>, StoreError>>;

    /// The object `id`, unless it is absent or expired at `now`.
    fn get(
        &self,
        id: ObjectId,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Option<StoredObject>, StoreError>>;

    /// Up to `limit` objects not expired at `now`, by ascending id, after `after` if given.
    fn list(
        &self,
        now: Timestamp,
        after: Option<ObjectId>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredObject>, StoreError>>;

    /// Checks that the database answers.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// The trace context of a request, as W3C `traceparent` text, kept with the work the request
/// asked for so that the work joins the request's trace even when it is done later, by
/// another instance or after a restart.
///
/// Opaque to the domain: a [`TracePropagation`] adapter writes and reads it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceParent(Arc<str>);

impl TraceParent {
    /// The longest text kept; a W3C `traceparent` of version 00 has 55 characters.
    pub const MAX_LEN: usize = 256;

    /// `text` as a trace context, if it is printable ASCII of at most [`Self::MAX_LEN`]
    /// characters (what a header value or a database column can carry unchanged).
    pub fn new(text: &str) -> Option<Self> {
        let printable = text.bytes().all(|b| b.is_ascii_graphic());
        (printable && !text.is_empty() && text.len() <= Self::MAX_LEN)
            .then(|| Self(Arc::from(text)))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Carries trace context from a request to the work it causes: the tracing backend's
/// adapter implements it; [`NoTracePropagation`] does nothing.
pub trait TracePropagation: Send + Sync + 'static {
    /// The context of the current span, to keep with the work it asks for; `None` when
    /// traces are off or there is no span.
    fn current(&self) -> Option<TraceParent>;

    /// Makes `parent` the parent of `span`, which has not been entered yet.
    fn set_parent(&self, span: &tracing::Span, parent: &TraceParent);
}

/// Propagates nothing: for tests and for running without trace export.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTracePropagation;

impl TracePropagation for NoTracePropagation {
    fn current(&self) -> Option<TraceParent> {
        None
    }

    fn set_parent(&self, _span: &tracing::Span, _parent: &TraceParent) {}
}

/// One id a callback asked for, as the [`Inbox`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    /// The object to fetch.
    pub id: ObjectId,
    /// The trace context of the request, if traces are on.
    pub trace: Option<TraceParent>,
}

impl Requested {
    /// `id`, asked for outside any trace.
    pub fn untraced(id: ObjectId) -> Self {
        Self { id, trace: None }
    }
}

/// One waiting id as a worker claimed it from the [`Inbox`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The object to fetch.
    pub id: ObjectId,
    /// How many times the id was requested while waiting, when it was claimed; a fetch
    /// serves exactly the requests counted here.
    pub generation: i64,
    /// The trace context of the newest request that carried one, for the fetch's span.
    pub trace: Option<TraceParent>,
    /// How many fetches of the id failed transiently and were scheduled again since it was
    /// first requested (0 for an id never tried, or only tried with success).
    pub attempts: u32,
    /// When the first still-waiting request for the id was accepted: the retry horizon
    /// counts from here.
    pub requested_at: Timestamp,
}

/// What became of one claimed id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream reported it online: store or refresh it.
    Online(StoredObject),
    /// The upstream reported it offline: nothing is written.
    Offline,
    /// The fetch failed transiently (the upstream was unreachable, slow, or answered
    /// 5xx/429): the id stays in the inbox, unleased, and is claimable again at
    /// [`Retry::at`]; its attempts count one more and the cause is kept with it.
    Retry(Retry),
    /// Processing failed for good (a permanent error, or the retry horizon passed): the
    /// failure is recorded as a dead letter and the id leaves the inbox.
    Failed(FailureRecord),
}

/// A transient failure of one fetch, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// When the id becomes claimable again.
    pub at: Timestamp,
    /// The failure's short stable code: `unreachable`, `timeout`, `status`.
    pub code: String,
    /// The cause, as text.
    pub reason: String,
}

/// A claim and its outcome, handed back to the [`Inbox`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The claim this settles.
    pub claim: Claim,
    /// What became of it.
    pub outcome: Outcome,
}

/// An id whose processing failed, as operators read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRecord {
    /// The object.
    pub id: ObjectId,
    /// A short stable code: `timeout`, `status`, `malformed`, …
    pub code: String,
    /// The cause, as text.
    pub reason: String,
    /// When the failure was recorded.
    pub at: Timestamp,
    /// How many fetches were tried in all, the last one included.
    pub attempts: u32,
}

/// A recorded failure as the failures table keeps it: a dead letter, kept until an operator
/// replays or purges it, or until the retention passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Orders the dead letters: a larger `seq` was recorded later. The cursor of
    /// [`FailureQuery::before`].
    pub seq: i64,
    /// The failure.
    pub record: FailureRecord,
}

/// Which dead letters an operator means: every condition given must hold; none given
/// selects all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureFilter {
    /// Only these objects, when given.
    pub ids: Option<Vec<ObjectId>>,
    /// Only failures with this code.
    pub code: Option<String>,
    /// Only failures recorded at or after this instant.
    pub since: Option<Timestamp>,
    /// Only failures recorded before this instant.
    pub until: Option<Timestamp>,
}

/// One page of dead letters, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureQuery {
    /// Which dead letters.
    pub filter: FailureFilter,
    /// Only those older than this `seq` (the last `seq` of the previous page).
    pub before: Option<i64>,
    /// The most returned.
    pub limit: usize,
}

/// How much work waits in the inbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Distinct ids waiting or being fetched.
    pub pending: u64,
    /// When the longest-waiting of them was first requested.
    pub oldest: Option<Timestamp>,
    /// Of `pending`, the ids whose fetch failed transiently and that wait for a retry.
    pub retrying: u64,
    /// When the longest-waiting of the retrying ids was first requested.
    pub oldest_retrying: Option<Timestamp>,
}

/// The durable inbox of accepted work: a callback is accepted once its ids are in it, and
/// an id leaves it only together with the recorded outcome of a fetch that started after
/// every request it serves.
///
/// An id waits at most once: requesting a waiting id again bumps its generation. Workers
/// lease ids for a while; a lease that runs out (its holder died) makes the id claimable
/// again, so several instances can share one database.
pub trait Inbox: Send + Sync + 'static {
    /// Records in one transaction that each of `requests` (each id named once) was
    /// requested at `at`; returns once that is durable. A waiting id keeps the trace
    /// context it has unless the new request carries one, which replaces it.
    fn enqueue<'a>(
        &'a self,
        requests: &'a [Requested],
        at: Timestamp,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Leases to `owner`, until `lease_until`, up to `limit` ids whose lease is free or ran
    /// out at `now`, longest-waiting first.
    fn claim<'a>(
        &'a self,
        owner: &'a str,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Claim>, StoreError>>;

    /// Settles claims of `owner` in one transaction: upserts the online objects (as
    /// [`ObjectStore::upsert_seen`] does), records the failures as dead letters, removes
    /// each id still leased to `owner` whose generation is the claimed one, and hands back
    /// those requested again since they were claimed so they are fetched once more,
    /// claimable from `again_from` on (a short pause lets more requests share that next
    /// fetch). An [`Outcome::Retry`] id still leased to `owner` is handed back whatever its
    /// generation, claimable from [`Retry::at`], with one more attempt counted and the
    /// cause kept. An id no longer leased to `owner` (its lease ran out and another
    /// instance took it over) is left to its new holder, so a late completion never
    /// removes a newer request. `done` names each id once.
    fn complete<'a>(
        &'a self,
        owner: &'a str,
        done: &'a [Completion],
        again_from: Timestamp,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Frees the leases held by `owner`, or every lease when `owner` is `None` (at the
    /// start of the only instance using the database); returns how many were freed.
    fn release<'a>(&'a self, owner: Option<&'a str>) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Extends to `lease_until` every lease `owner` holds (the heartbeat while its fetches
    /// run, so leases can be short and a dead instance's work moves on soon); returns how
    /// many were renewed. A lease that ran out and was taken over is not `owner`'s any more
    /// and stays with its new holder.
    fn renew<'a>(
        &'a self,
        owner: &'a str,
        lease_until: Timestamp,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// How many ids wait, and since when.
    fn backlog(&self) -> BoxFuture<'_, Result<Backlog, StoreError>>;

    /// The dead letters `query` selects, newest first (by descending `seq`).
    fn failures<'a>(
        &'a self,
        query: &'a FailureQuery,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, StoreError>>;

    /// In one transaction, puts the objects of the dead letters `filter` selects back in the
    /// inbox as requested at `at` (as [`Inbox::enqueue`] does, once per distinct id) and
    /// deletes those dead letters; returns how many dead letters were replayed. Repeated, it
    /// finds nothing left to replay.
    fn replay_failures<'a>(
        &'a self,
        filter: &'a FailureFilter,
        at: Timestamp,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Deletes the dead letters `filter` selects; returns how many went.
    fn purge_failures<'a>(
        &'a self,
        filter: &'a FailureFilter,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;
}

/// A database that is both the object store and the inbox, as every adapter is.
pub trait Database: ObjectStore + Inbox {}

impl<T: ObjectStore + Inbox> Database for T {}

/// Tells the time; lets tests drive it.
pub trait Clock: Send + Sync + 'static {
    /// The current wall-clock instant.
    fn now(&self) -> Timestamp;
}

impl std::fmt::Debug for dyn ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn ObjectStore")
    }
}

impl std::fmt::Debug for dyn Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn Clock")
    }
}

impl std::fmt::Debug for dyn Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn Inbox")
    }
}

impl std::fmt::Debug for dyn Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn Database")
    }
}
