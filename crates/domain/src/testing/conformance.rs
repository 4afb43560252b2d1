//! The conformance suites of the [`ObjectStore`] and [`Inbox`](crate::ports::Inbox) ports:
//! written once, run against the in-memory fake and every database adapter.
//!
//! Each case is a public async function that takes a fresh, empty store and panics when
//! the store breaks the port's contract. Times are fixed [`Timestamp`]s: no clock, no
//! sleeps. [`object_store_conformance!`](crate::object_store_conformance) and
//! [`inbox_conformance!`](crate::inbox_conformance) turn each list into one
//! `#[tokio::test]` per case, so an adapter's test file is a few lines:
//!
//! ```text
//! async fn fixture() -> (Arc<dyn Database>, tempfile::TempDir) { /* a fresh store */ }
//!
//! domain::object_store_conformance!(#[tokio::test(flavor = "multi_thread")] fixture());
//! domain::inbox_conformance!(#[tokio::test(flavor = "multi_thread")] fixture());
//! ```
//!
//! The inbox cases are named `inbox_…`, so both macros can share a module.
//!
//! A fixture that needs something the machine may lack (a database server) yields an
//! `Option` of a fixture instead: `None` skips the case, which then passes without running.
//! Saying loudly why is the fixture's job.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::id::ObjectId;
use crate::ports::{
    Backlog, Claim, Completion, Database, DeadLetter, FailureFilter, FailureQuery, FailureRecord,
    ObjectStore, Outcome, Requested, Retry, StoredObject, TraceParent,
};
use crate::time::Timestamp;

/// What a store fixture hands to a case: the store, plus anything that must outlive it.
///
/// Implemented for `Arc<S>`, `Arc<dyn ObjectStore>`, `Arc<dyn Database>`,
/// `(Arc<dyn ObjectStore>, G)` and `(Arc<dyn Database>, G)`, where `G` is a guard kept
/// alive until the case ends (a temporary directory, a database that is dropped
/// afterwards), and for `Option` of any of these, where `None` skips the case.
pub trait StoreFixture {
    /// The store under test; called only when [`skipped`](Self::skipped) is false.
    fn store(&self) -> Arc<dyn ObjectStore>;

    /// Whether the case is skipped because the fixture could not be made here.
    fn skipped(&self) -> bool {
        false
    }
}

impl StoreFixture for Arc<dyn ObjectStore> {
    fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(self)
    }
}

impl<S: ObjectStore> StoreFixture for Arc<S> {
    fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(self) as Arc<dyn ObjectStore>
    }
}

impl StoreFixture for Arc<dyn Database> {
    fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(self) as Arc<dyn ObjectStore>
    }
}

impl<G> StoreFixture for (Arc<dyn ObjectStore>, G) {
    fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.0)
    }
}

impl<G> StoreFixture for (Arc<dyn Database>, G) {
    fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.0) as Arc<dyn ObjectStore>
    }
}

impl<F: StoreFixture> StoreFixture for Option<F> {
    fn store(&self) -> Arc<dyn ObjectStore> {
        self.as_ref()
            .expect("a skipped fixture has no store")
            .store()
    }

    fn skipped(&self) -> bool {
        self.as_ref().is_none_or(StoreFixture::skipped)
    }
}

/// What a database fixture hands to an inbox case: the database (object store and inbox
/// in one), plus anything that must outlive it.
///
/// Implemented like [`StoreFixture`]: for `Arc<S>`, `Arc<dyn Database>`,
/// `(Arc<dyn Database>, G)` and `Option` of any of these, where `None` skips the case.
pub trait DatabaseFixture {
    /// The database under test; called only when [`skipped`](Self::skipped) is false.
    fn database(&self) -> Arc<dyn Database>;

    /// Whether the case is skipped because the fixture could not be made here.
    fn skipped(&self) -> bool {
        false
    }
}

impl DatabaseFixture for Arc<dyn Database> {
    fn database(&self) -> Arc<dyn Database> {
        Arc::clone(self)
    }
}

impl<S: Database> DatabaseFixture for Arc<S> {
    fn database(&self) -> Arc<dyn Database> {
        Arc::clone(self) as Arc<dyn Database>
    }
}

impl<G> DatabaseFixture for (Arc<dyn Database>, G) {
    fn database(&self) -> Arc<dyn Database> {
        Arc::clone(&self.0)
    }
}

impl<F: DatabaseFixture> DatabaseFixture for Option<F> {
    fn database(&self) -> Arc<dyn Database> {
        self.as_ref()
            .expect("a skipped fixture has no database")
            .database()
    }

    fn skipped(&self) -> bool {
        self.as_ref().is_none_or(DatabaseFixture::skipped)
    }
}

/// Runs every case of the suite as a `#[tokio::test]` of its own.
///
/// The argument is an expression giving a future of a [`StoreFixture`]; it is evaluated
/// afresh for every case, so each case starts from an empty store. A fixture of `None`
/// skips the case (see [`StoreFixture::skipped`]). An optional leading
/// attribute replaces `#[tokio::test]`, e.g. `#[tokio::test(flavor = "multi_thread")]`
/// for adapters that use `spawn_blocking`. The calling crate needs `tokio` with the
/// `macros` feature, and the tests' names are the cases' names, so invoke the macro once
/// per module.
#[macro_export]
macro_rules! object_store_conformance {
    (#[$test:meta] $fixture:expr $(,)?) => {
        $crate::__object_store_conformance_cases! {
            [$test] [$fixture]
            insert_then_get,
            refresh_moves_forward,
            out_of_order_refresh_never_moves_backwards,
            each_time_only_moves_forward,
            rows_are_hidden_from_their_expiry_on,
            delete_expired_deletes_up_to_the_cutoff_inclusive,
            delete_expired_respects_the_limit,
            next_expiry_is_the_earliest,
            list_paginates_by_ascending_id,
            ten_thousand_ids_in_one_batch,
            smallest_and_largest_ids,
            concurrent_writers_keep_the_latest_times,
            ping_answers,
            empty_batch_is_a_no_op,
        }
    };
    ($fixture:expr $(,)?) => {
        $crate::object_store_conformance!(
            #[::tokio::test]
            $fixture
        );
    };
}

/// Expands to one test per named case; an implementation detail of
/// [`object_store_conformance!`](crate::object_store_conformance).
#[doc(hidden)]
#[macro_export]
macro_rules! __object_store_conformance_cases {
    ([$test:meta] [$fixture:expr] $($case:ident),+ $(,)?) => {
        $(
            #[$test]
            async fn $case() {
                let fixture = $fixture.await;
                if $crate::testing::conformance::StoreFixture::skipped(&fixture) {
                    return;
                }
                let store = $crate::testing::conformance::StoreFixture::store(&fixture);
                $crate::testing::conformance::$case(store).await;
                drop(fixture);
            }
        )+
    };
}

/// Runs every case of the [`Inbox`](crate::ports::Inbox) suite as a `#[tokio::test]` of its
/// own.
///
/// Used like [`object_store_conformance!`](crate::object_store_conformance), with a
/// fixture that gives a [`DatabaseFixture`] (the database under test is both the object
/// store and the inbox). A fixture of `None` skips the case. Some cases run several tasks
/// at once: adapters that block a thread per call want
/// `#[tokio::test(flavor = "multi_thread")]`.
#[macro_export]
macro_rules! inbox_conformance {
    (#[$test:meta] $fixture:expr $(,)?) => {
        $crate::__inbox_conformance_cases! {
            [$test] [$fixture]
            inbox_enqueue_then_claim_gives_each_id_once,
            inbox_a_repeated_request_bumps_the_generation,
            inbox_a_lease_hides_an_id_until_it_runs_out,
            inbox_claim_takes_the_longest_waiting_first_up_to_the_limit,
            inbox_complete_settles_each_outcome,
            inbox_failures_are_listed_newest_first,
            inbox_complete_after_a_new_request_keeps_the_id_and_frees_it,
            inbox_completing_twice_is_harmless,
            inbox_a_late_completion_never_removes_a_newer_request,
            inbox_release_frees_one_owner_or_every_lease,
            inbox_renew_extends_only_the_owners_leases,
            inbox_backlog_counts_waiting_and_leased_ids,
            inbox_empty_input_is_a_no_op,
            inbox_smallest_and_largest_ids,
            inbox_ten_thousand_ids_in_one_enqueue,
            inbox_concurrent_enqueues_leave_one_row_per_id,
            inbox_concurrent_claimers_never_share_an_id,
            inbox_dead_letters_are_all_kept_and_paginated,
            inbox_a_retry_hands_the_id_back_until_its_next_attempt,
            inbox_a_request_during_a_retry_wait_keeps_the_schedule,
            inbox_a_late_retry_leaves_a_taken_over_id_alone,
            inbox_dead_letters_filter_by_id_code_and_time,
            inbox_replay_puts_dead_letters_back_once,
            inbox_purge_deletes_the_selected_dead_letters,
            inbox_every_request_is_served_by_a_later_fetch,
            inbox_keeps_the_trace_context_of_the_newest_traced_request,
            inbox_an_id_requested_again_is_claimable_from_the_given_instant,
        }
    };
    ($fixture:expr $(,)?) => {
        $crate::inbox_conformance!(
            #[::tokio::test]
            $fixture
        );
    };
}

/// Expands to one test per named case; an implementation detail of
/// [`inbox_conformance!`](crate::inbox_conformance).
#[doc(hidden)]
#[macro_export]
macro_rules! __inbox_conformance_cases {
    ([$test:meta] [$fixture:expr] $($case:ident),+ $(,)?) => {
        $(
            #[$test]
            async fn $case() {
                let fixture = $fixture.await;
                if $crate::testing::conformance::DatabaseFixture::skipped(&fixture) {
                    return;
                }
                let database = $crate::testing::conformance::DatabaseFixture::database(&fixture);
                $crate::testing::conformance::$case(database).await;
                drop(fixture);
            }
        )+
    };
}

/// An arbitrary instant with a sub-millisecond part, so lost precision shows.
const T0: i64 = 1_700_000_000_123_457;

/// The TTL the cases use.
const TTL: Duration = Duration::from_secs(30);

fn at(micros_after_t0: i64) -> Timestamp {
    Timestamp::from_unix_micros(T0 + micros_after_t0)
}

fn id(raw: i64) -> ObjectId {
    ObjectId::new(raw).expect("test ids are not negative")
}

/// An object seen at `last_seen`, expiring one TTL later.
fn seen(raw_id: i64, last_seen: Timestamp) -> StoredObject {
    StoredObject {
        id: id(raw_id),
        last_seen,
        expires_at: last_seen.saturating_add(TTL),
    }
}

/// An object with both times given.
fn row(raw_id: i64, last_seen: Timestamp, expires_at: Timestamp) -> StoredObject {
    StoredObject {
        id: id(raw_id),
        last_seen,
        expires_at,
    }
}

async fn upsert(store: &dyn ObjectStore, batch: &[StoredObject]) {
    store.upsert_seen(batch).await.expect("upsert_seen failed");
}

async fn get(store: &dyn ObjectStore, raw_id: i64, now: Timestamp) -> Option<StoredObject> {
    store.get(id(raw_id), now).await.expect("get failed")
}

async fn list(
    store: &dyn ObjectStore,
    now: Timestamp,
    after: Option<i64>,
    limit: usize,
) -> Vec<StoredObject> {
    store
        .list(now, after.map(id), limit)
        .await
        .expect("list failed")
}

fn ids(objects: &[StoredObject]) -> Vec<i64> {
    objects.iter().map(|o| o.id.get()).collect()
}

/// Every row still live at `now`, read through `list`.
async fn all_live(store: &dyn ObjectStore, now: Timestamp) -> Vec<StoredObject> {
    list(store, now, None, 1_000_000).await
}

/// A stored object reads back exactly (id, both times to the microsecond); an absent id
/// reads as `None`.
pub async fn insert_then_get(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    let object = row(42, at(1), at(30_000_001));
    upsert(store, &[object]).await;

    assert_eq!(get(store, 42, at(0)).await, Some(object));
    assert_eq!(get(store, 43, at(0)).await, None);
    assert_eq!(all_live(store, at(0)).await, vec![object]);
}

/// A later sighting moves both times forward.
pub async fn refresh_moves_forward(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    let first = seen(7, at(0));
    let later = seen(7, at(5_000_003));
    upsert(store, &[first]).await;
    upsert(store, &[later]).await;

    assert_eq!(get(store, 7, at(0)).await, Some(later));
    assert_eq!(all_live(store, at(0)).await, vec![later]);
}

/// An earlier sighting written after a later one changes nothing: writes may arrive in
/// any order and more than once.
pub async fn out_of_order_refresh_never_moves_backwards(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    let later = seen(7, at(5_000_003));
    let earlier = seen(7, at(0));
    upsert(store, &[later]).await;
    upsert(store, &[earlier]).await;
    assert_eq!(get(store, 7, at(0)).await, Some(later));

    // The same write again is harmless too.
    upsert(store, &[later]).await;
    assert_eq!(get(store, 7, at(0)).await, Some(later));
}

/// `last_seen` and `expires_at` each keep their own maximum, even when one write brings
/// a later `last_seen` with an earlier `expires_at` (a shorter TTL after a restart).
pub async fn each_time_only_moves_forward(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    upsert(store, &[row(3, at(10), at(100_000))]).await;
    upsert(store, &[row(3, at(20), at(50_000))]).await;
    assert_eq!(
        get(store, 3, at(0)).await,
        Some(row(3, at(20), at(100_000)))
    );

    upsert(store, &[row(3, at(15), at(200_000))]).await;
    assert_eq!(
        get(store, 3, at(0)).await,
        Some(row(3, at(20), at(200_000)))
    );
}

/// `get` and `list` hide a row from the instant it expires on, before any delete, and
/// still show it one microsecond earlier.
pub async fn rows_are_hidden_from_their_expiry_on(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    let object = row(9, at(0), at(1_000_000));
    let just_before = at(999_999);
    let expiry = at(1_000_000);
    upsert(store, &[object]).await;

    assert_eq!(get(store, 9, just_before).await, Some(object));
    assert_eq!(list(store, just_before, None, 10).await, vec![object]);

    assert_eq!(get(store, 9, expiry).await, None);
    assert_eq!(list(store, expiry, None, 10).await, vec![]);
    assert_eq!(get(store, 9, at(1_000_001)).await, None);

    // Hidden, not gone: it is still there to be deleted.
    assert_eq!(
        store.next_expiry().await.expect("next_expiry failed"),
        Some(expiry)
    );
}

/// `delete_expired` removes every row with `expires_at <= cutoff`, keeps later ones and
/// returns how many went.
pub async fn delete_expired_deletes_up_to_the_cutoff_inclusive(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    let cutoff = at(1_000_000);
    upsert(
        store,
        &[
            row(1, at(0), at(999_999)),
            row(2, at(0), cutoff),
            row(3, at(0), cutoff),
            row(4, at(0), at(1_000_001)),
            row(5, at(0), at(9_000_000)),
        ],
    )
    .await;

    let deleted = store
        .delete_expired(cutoff, 100)
        .await
        .expect("delete_expired failed");
    assert_eq!(deleted, 3);
    assert_eq!(ids(&all_live(store, at(0)).await), vec![4, 5]);
    assert_eq!(
        store.next_expiry().await.expect("next_expiry failed"),
        Some(at(1_000_001))
    );

    let again = store
        .delete_expired(cutoff, 100)
        .await
        .expect("delete_expired failed");
    assert_eq!(again, 0, "nothing left to delete at the same cutoff");
    assert_eq!(ids(&all_live(store, at(0)).await), vec![4, 5]);
}

/// `delete_expired` removes at most `limit` rows per call.
pub async fn delete_expired_respects_the_limit(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    let batch: Vec<StoredObject> = (0..5).map(|i| row(i, at(0), at(100 + i))).collect();
    let live_later = row(99, at(0), at(10_000));
    upsert(store, &batch).await;
    upsert(store, &[live_later]).await;
    let cutoff = at(1_000);

    let delete = |limit| async move {
        store
            .delete_expired(cutoff, limit)
            .await
            .expect("delete_expired failed")
    };
    assert_eq!(delete(0).await, 0);
    assert_eq!(all_live(store, at(0)).await.len(), 6);
    assert_eq!(delete(2).await, 2);
    assert_eq!(all_live(store, at(0)).await.len(), 4);
    assert_eq!(delete(2).await, 2);
    assert_eq!(delete(2).await, 1);
    assert_eq!(delete(2).await, 0);
    assert_eq!(all_live(store, at(0)).await, vec![live_later]);
}

/// `next_expiry` is `None` on an empty store, then the earliest `expires_at` of all rows.
pub async fn next_expiry_is_the_earliest(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    let next = || async { store.next_expiry().await.expect("next_expiry failed") };
    assert_eq!(next().await, None);

    upsert(
        store,
        &[
            row(1, at(0), at(5_000)),
            row(2, at(0), at(3_000)),
            row(3, at(0), at(4_000)),
        ],
    )
    .await;
    assert_eq!(next().await, Some(at(3_000)));

    // A refresh moves the earliest row later, so the next one takes its place.
    upsert(store, &[row(2, at(1), at(6_000))]).await;
    assert_eq!(next().await, Some(at(4_000)));

    let deleted = store
        .delete_expired(at(5_000), 10)
        .await
        .expect("delete_expired failed");
    assert_eq!(deleted, 2);
    assert_eq!(next().await, Some(at(6_000)));

    store
        .delete_expired(at(6_000), 10)
        .await
        .expect("delete_expired failed");
    assert_eq!(next().await, None);
}

/// `list` pages through live rows by ascending id: `after` is exclusive, `limit` is a
/// maximum, expired rows are skipped without shortening a page.
pub async fn list_paginates_by_ascending_id(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    let now = at(1_000_000);
    let live = |raw| row(raw, at(raw), at(2_000_000 + raw));
    let expired = row(3, at(0), now);
    // Written out of order, over two batches.
    upsert(store, &[live(9), live(5), expired, live(0)]).await;
    upsert(store, &[live(7), live(1)]).await;

    assert_eq!(list(store, now, None, 2).await, vec![live(0), live(1)]);
    assert_eq!(list(store, now, Some(1), 2).await, vec![live(5), live(7)]);
    assert_eq!(list(store, now, Some(7), 2).await, vec![live(9)]);
    assert_eq!(list(store, now, Some(9), 2).await, vec![]);
    assert_eq!(list(store, now, Some(2), 1).await, vec![live(5)]);
    assert_eq!(list(store, now, None, 0).await, vec![]);
    assert_eq!(ids(&list(store, now, None, 100).await), vec![0, 1, 5, 7, 9]);
    // Before its expiry the hidden row is listed in its place.
    assert_eq!(
        ids(&list(store, at(0), None, 100).await),
        vec![0, 1, 3, 5, 7, 9]
    );
}

/// One batch of 10 000 ids is stored whole, each row exactly as written.
pub async fn ten_thousand_ids_in_one_batch(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    // Scattered ids (a permutation of 0..10_000 scaled up) with times of their own.
    let batch: Vec<StoredObject> = (0..10_000_i64)
        .map(|i| {
            let raw = (i * 7_919) % 10_000 * 1_000_003;
            row(raw, at(i), at(40_000_000 + 2 * i))
        })
        .collect();
    upsert(store, &batch).await;

    let mut expected = batch.clone();
    expected.sort_by_key(|o| o.id);
    assert_eq!(all_live(store, at(0)).await, expected);

    // Refreshing the same 10 000 moves every one of them.
    let refreshed: Vec<StoredObject> = batch
        .iter()
        .map(|o| row(o.id.get(), at(50_000_000), at(90_000_000)))
        .collect();
    upsert(store, &refreshed).await;
    let stored = all_live(store, at(0)).await;
    assert_eq!(stored.len(), 10_000);
    assert!(
        stored
            .iter()
            .all(|o| o.last_seen == at(50_000_000) && o.expires_at == at(90_000_000)),
        "some rows were not refreshed"
    );
}

/// Id 0 and [`ObjectId::MAX`] are ordinary ids.
pub async fn smallest_and_largest_ids(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    let zero = row(0, at(1), at(1_000));
    let max = StoredObject {
        id: ObjectId::MAX,
        last_seen: at(2),
        expires_at: at(2_000),
    };
    upsert(store, &[max, zero]).await;

    assert_eq!(
        store.get(ObjectId::MAX, at(0)).await.expect("get failed"),
        Some(max)
    );
    assert_eq!(get(store, 0, at(0)).await, Some(zero));
    assert_eq!(list(store, at(0), None, 10).await, vec![zero, max]);
    assert_eq!(list(store, at(0), Some(0), 10).await, vec![max]);
    assert_eq!(
        store
            .list(at(0), Some(ObjectId::MAX), 10)
            .await
            .expect("list failed"),
        vec![]
    );
}

/// Eight writers upserting overlapping ids at once, with times in every order: each row
/// ends with the latest `last_seen` and the latest `expires_at` any writer brought.
pub async fn concurrent_writers_keep_the_latest_times(store: Arc<dyn ObjectStore>) {
    const WRITERS: i64 = 8;
    const IDS: i64 = 200;
    // Writer `w` sees id `i` at a time that is a different permutation of the writers per
    // id, and brings an expiry that is yet another permutation, so the maxima come from
    // every writer and rarely from the same one for both columns.
    let object = |w: i64, i: i64| {
        row(
            i,
            at(((w * 3 + i) % WRITERS) * 1_000 + i),
            at(60_000_000 + ((w * 5 + i * 3) % WRITERS) * 1_000 + i),
        )
    };
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                // Each writer covers the ids in several batches, in its own order.
                let mut mine: Vec<StoredObject> = (0..IDS).map(|i| object(w, i)).collect();
                mine.rotate_left(usize::try_from(w * 25).expect("small"));
                for chunk in mine.chunks(50) {
                    store
                        .upsert_seen(chunk)
                        .await
                        .expect("concurrent upsert_seen failed");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer task panicked");
    }

    let mut expected: BTreeMap<i64, StoredObject> = BTreeMap::new();
    for w in 0..WRITERS {
        for i in 0..IDS {
            let o = object(w, i);
            expected
                .entry(i)
                .and_modify(|e| {
                    e.last_seen = e.last_seen.max(o.last_seen);
                    e.expires_at = e.expires_at.max(o.expires_at);
                })
                .or_insert(o);
        }
    }
    let expected: Vec<StoredObject> = expected.into_values().collect();
    assert_eq!(all_live(&*store, at(0)).await, expected);
}

/// A healthy store answers `ping`.
pub async fn ping_answers(store: Arc<dyn ObjectStore>) {
    store.ping().await.expect("ping failed");
}

/// An empty batch succeeds and writes nothing.
pub async fn empty_batch_is_a_no_op(store: Arc<dyn ObjectStore>) {
    let store = &*store;
    upsert(store, &[]).await;
    assert_eq!(all_live(store, at(0)).await, vec![]);
    assert_eq!(store.next_expiry().await.expect("next_expiry failed"), None);

    let object = seen(5, at(0));
    upsert(store, &[object]).await;
    upsert(store, &[]).await;
    assert_eq!(all_live(store, at(0)).await, vec![object]);
}

// ---------------------------------------------------------------------------------------
// The Inbox suite.
// ---------------------------------------------------------------------------------------

/// Lease owners, as worker instances name themselves.
const OWNER_A: &str = "instance-a";
const OWNER_B: &str = "instance-b";
const OWNER_C: &str = "instance-c";

/// How long the cases' leases last unless a case says otherwise: far past every `now`.
const LEASE: Duration = Duration::from_secs(600);

async fn enqueue(db: &dyn Database, raw_ids: &[i64], at: Timestamp) {
    let requests: Vec<Requested> = raw_ids
        .iter()
        .map(|&raw| Requested::untraced(id(raw)))
        .collect();
    db.enqueue(&requests, at).await.expect("enqueue failed");
}

/// Claims up to `limit` ids for `owner` at `now`, leased for [`LEASE`].
async fn claim(db: &dyn Database, owner: &str, now: Timestamp, limit: usize) -> Vec<Claim> {
    claim_until(db, owner, now, now.saturating_add(LEASE), limit).await
}

async fn claim_until(
    db: &dyn Database,
    owner: &str,
    now: Timestamp,
    lease_until: Timestamp,
    limit: usize,
) -> Vec<Claim> {
    db.claim(owner, now, lease_until, limit)
        .await
        .expect("claim failed")
}

/// Completes `done`; ids requested again are claimable at once (from the cases' first
/// instant).
async fn complete(db: &dyn Database, owner: &str, done: &[Completion]) {
    db.complete(owner, done, at(0))
        .await
        .expect("complete failed");
}

async fn backlog(db: &dyn Database) -> Backlog {
    db.backlog().await.expect("backlog failed")
}

/// Up to `limit` dead letters, newest first, without their `seq`.
async fn failures(db: &dyn Database, limit: usize) -> Vec<FailureRecord> {
    let query = FailureQuery {
        limit,
        ..FailureQuery::default()
    };
    dead_letters(db, &query)
        .await
        .into_iter()
        .map(|letter| letter.record)
        .collect()
}

async fn dead_letters(db: &dyn Database, query: &FailureQuery) -> Vec<DeadLetter> {
    db.failures(query).await.expect("failures failed")
}

/// Every dead letter `filter` selects, read page by page (`page` at a time), newest first.
async fn every_dead_letter(
    db: &dyn Database,
    filter: &FailureFilter,
    page: usize,
) -> Vec<DeadLetter> {
    let mut all: Vec<DeadLetter> = Vec::new();
    loop {
        let query = FailureQuery {
            filter: filter.clone(),
            before: all.last().map(|letter| letter.seq),
            limit: page,
        };
        let next = dead_letters(db, &query).await;
        assert!(next.len() <= page, "a page holds at most its limit");
        let done = next.len() < page;
        all.extend(next);
        if done {
            return all;
        }
    }
}

/// Claims as `(id, generation)`, ascending by id: the port promises which ids a claim
/// takes, not the order it lists them in.
fn by_id(claims: &[Claim]) -> Vec<(i64, i64)> {
    let mut pairs: Vec<(i64, i64)> = claims.iter().map(|c| (c.id.get(), c.generation)).collect();
    pairs.sort_unstable();
    pairs
}

/// A claim of an id first requested at the cases' first instant and never retried.
fn claimed(raw_id: i64, generation: i64) -> Claim {
    Claim {
        id: id(raw_id),
        generation,
        trace: None,
        attempts: 0,
        requested_at: at(0),
    }
}

/// A transient failure of `raw_id`'s claim, to be tried again at `next`.
fn retried(raw_id: i64, generation: i64, next: Timestamp) -> Completion {
    Completion {
        claim: claimed(raw_id, generation),
        outcome: Outcome::Retry(Retry {
            at: next,
            code: "unreachable".to_owned(),
            reason: "upstream unreachable: connection refused".to_owned(),
        }),
    }
}

fn online(raw_id: i64, generation: i64, object: StoredObject) -> Completion {
    assert_eq!(
        object.id,
        id(raw_id),
        "a case completes an id with its own object"
    );
    Completion {
        claim: claimed(raw_id, generation),
        outcome: Outcome::Online(object),
    }
}

fn offline(raw_id: i64, generation: i64) -> Completion {
    Completion {
        claim: claimed(raw_id, generation),
        outcome: Outcome::Offline,
    }
}

fn failure(raw_id: i64, code: &str, reason: &str, at: Timestamp) -> FailureRecord {
    FailureRecord {
        id: id(raw_id),
        code: code.to_owned(),
        reason: reason.to_owned(),
        at,
        attempts: 1,
    }
}

fn failed(raw_id: i64, generation: i64, record: FailureRecord) -> Completion {
    Completion {
        claim: claimed(raw_id, generation),
        outcome: Outcome::Failed(record),
    }
}

/// Enqueued ids are claimed once each, at generation 1; a second claimer finds nothing
/// while the leases hold.
pub async fn inbox_enqueue_then_claim_gives_each_id_once(db: Arc<dyn Database>) {
    let db = &*db;
    enqueue(db, &[3, 1, 2], at(0)).await;

    let claims = claim(db, OWNER_A, at(1), 10).await;
    assert_eq!(by_id(&claims), [(1, 1), (2, 1), (3, 1)]);
    assert_eq!(claim(db, OWNER_B, at(2), 10).await, []);
    assert_eq!(
        claim(db, OWNER_A, at(3), 10).await,
        [],
        "not even to the same owner"
    );
}

/// Requesting a waiting id again bumps its generation and keeps its first request time.
pub async fn inbox_a_repeated_request_bumps_the_generation(db: Arc<dyn Database>) {
    let db = &*db;
    enqueue(db, &[1, 2], at(0)).await;
    enqueue(db, &[2, 3], at(10)).await;
    enqueue(db, &[2], at(20)).await;
    assert_eq!(
        backlog(db).await,
        Backlog {
            pending: 3,
            oldest: Some(at(0)),
            ..Backlog::default()
        }
    );

    let claims = claim(db, OWNER_A, at(30), 10).await;
    assert_eq!(by_id(&claims), [(1, 1), (2, 3), (3, 1)]);

    // Once 1 and 3 are done, 2 is the one left, waiting since its first request.
    complete(db, OWNER_A, &[offline(1, 1), offline(3, 1)]).await;
    assert_eq!(
        backlog(db).await,
        Backlog {
            pending: 1,
            oldest: Some(at(0)),
            ..Backlog::default()
        }
    );
}

/// A leased id cannot be claimed before `lease_until`; from `lease_until` on it can, by
/// anyone (a dead instance's work is taken over), with the generation it had.
pub async fn inbox_a_lease_hides_an_id_until_it_runs_out(db: Arc<dyn Database>) {
    let db = &*db;
    enqueue(db, &[7], at(0)).await;
    assert_eq!(
        claim_until(db, OWNER_A, at(0), at(100), 10).await,
        [claimed(7, 1)]
    );

    assert_eq!(claim_until(db, OWNER_B, at(99), at(200), 10).await, []);
    assert_eq!(
        claim_until(db, OWNER_B, at(100), at(200), 10).await,
        [claimed(7, 1)],
        "a lease is over at its lease_until"
    );
    // Now B holds it until 200.
    assert_eq!(claim_until(db, OWNER_A, at(150), at(300), 10).await, []);
    assert_eq!(
        claim_until(db, OWNER_C, at(250), at(400), 10).await,
        [claimed(7, 1)]
    );
}

/// `claim` takes at most `limit` ids, the longest-waiting first.
pub async fn inbox_claim_takes_the_longest_waiting_first_up_to_the_limit(db: Arc<dyn Database>) {
    let db = &*db;
    enqueue(db, &[5], at(30)).await;
    enqueue(db, &[7], at(10)).await;
    enqueue(db, &[6], at(20)).await;
    enqueue(db, &[8, 9], at(40)).await;

    assert_eq!(claim(db, OWNER_A, at(50), 0).await, []);
    assert_eq!(
        by_id(&claim(db, OWNER_A, at(50), 2).await),
        [(6, 1), (7, 1)]
    );
    assert_eq!(by_id(&claim(db, OWNER_A, at(50), 1).await), [(5, 1)]);
    assert_eq!(
        by_id(&claim(db, OWNER_B, at(50), 10).await),
        [(8, 1), (9, 1)]
    );
    assert_eq!(claim(db, OWNER_B, at(50), 10).await, []);
}

/// `complete` with unchanged generations removes the ids and records their outcomes: an
/// online object is stored, an offline one writes nothing (a stored row keeps its times),
/// a failure is recorded with its code, reason and time.
pub async fn inbox_complete_settles_each_outcome(db: Arc<dyn Database>) {
    let db = &*db;
    let store: &dyn ObjectStore = db;
    let stored_before = row(2, at(-5_000_000), at(25_000_000));
    upsert(store, &[stored_before]).await;
    enqueue(db, &[1, 2, 3, 4], at(0)).await;
    assert_eq!(claim(db, OWNER_A, at(1), 10).await.len(), 4);

    let object = seen(1, at(2));
    let record = failure(3, "timeout", "upstream did not answer within 5s", at(3));
    complete(
        db,
        OWNER_A,
        &[
            online(1, 1, object),
            offline(2, 1),
            failed(3, 1, record.clone()),
            offline(4, 1),
        ],
    )
    .await;

    assert_eq!(backlog(db).await, Backlog::default());
    assert_eq!(claim(db, OWNER_B, at(4), 10).await, []);
    assert_eq!(get(store, 1, at(4)).await, Some(object));
    assert_eq!(get(store, 2, at(4)).await, Some(stored_before));
    assert_eq!(get(store, 3, at(4)).await, None);
    assert_eq!(get(store, 4, at(4)).await, None);
    assert_eq!(all_live(store, at(4)).await, vec![object, stored_before]);
    assert_eq!(failures(db, 10).await, vec![record]);
}

/// `failures` lists the recorded failures newest first, at most `limit` of them,
/// each with its id, code, reason (any text) and time to the microsecond.
pub async fn inbox_failures_are_listed_newest_first(db: Arc<dyn Database>) {
    let db = &*db;
    assert_eq!(failures(db, 10).await, vec![]);
    let records = [
        failure(1, "timeout", "upstream did not answer within 5s", at(1)),
        failure(2, "status", "upstream answered status 503", at(2)),
        failure(
            3,
            "malformed",
            "expected `}` — got «\"online\": tru», 'x'\n",
            at(3),
        ),
    ];
    for (i, record) in (1..).zip(&records) {
        enqueue(db, &[i], at(0)).await;
        assert_eq!(claim(db, OWNER_A, at(0), 10).await, [claimed(i, 1)]);
        complete(db, OWNER_A, &[failed(i, 1, record.clone())]).await;
    }

    let newest_first: Vec<FailureRecord> = records.iter().rev().cloned().collect();
    assert_eq!(failures(db, 10).await, newest_first);
    assert_eq!(failures(db, 2).await, newest_first[..2]);
    assert_eq!(failures(db, 0).await, vec![]);
}

/// An id requested again after it was claimed stays when the claim completes (the fetch
/// may have started before the new request), its object is still stored, and its lease
/// is freed so it is claimed again at once, with the new generation.
pub async fn inbox_complete_after_a_new_request_keeps_the_id_and_frees_it(db: Arc<dyn Database>) {
    let db = &*db;
    let store: &dyn ObjectStore = db;
    enqueue(db, &[4, 5], at(0)).await;
    assert_eq!(
        by_id(&claim(db, OWNER_A, at(1), 10).await),
        [(4, 1), (5, 1)]
    );
    enqueue(db, &[4], at(2)).await;
    assert_eq!(
        claim(db, OWNER_B, at(3), 10).await,
        [],
        "a new request does not break the lease"
    );

    let object = seen(4, at(4));
    complete(db, OWNER_A, &[online(4, 1, object), offline(5, 1)]).await;
    assert_eq!(get(store, 4, at(5)).await, Some(object));
    assert_eq!(
        backlog(db).await,
        Backlog {
            pending: 1,
            oldest: Some(at(0)),
            ..Backlog::default()
        }
    );

    // Long before A's lease would have run out.
    assert_eq!(claim(db, OWNER_B, at(6), 10).await, [claimed(4, 2)]);
    complete(db, OWNER_B, &[offline(4, 2)]).await;
    assert_eq!(backlog(db).await, Backlog::default());
}

/// Two instances that both fetched an id (the first one's lease ran out) may both complete
/// it: the second completion changes nothing, and the later sighting wins.
pub async fn inbox_completing_twice_is_harmless(db: Arc<dyn Database>) {
    let db = &*db;
    let store: &dyn ObjectStore = db;
    enqueue(db, &[1, 2], at(0)).await;
    assert_eq!(claim_until(db, OWNER_A, at(0), at(10), 10).await.len(), 2);
    assert_eq!(
        claim_until(db, OWNER_B, at(10), at(1_000), 10).await.len(),
        2,
        "A's lease ran out"
    );

    let from_a = seen(1, at(20));
    let from_b = seen(1, at(15));
    let record = failure(2, "timeout", "slow", at(20));
    complete(
        db,
        OWNER_A,
        &[online(1, 1, from_a), failed(2, 1, record.clone())],
    )
    .await;
    assert_eq!(
        backlog(db).await.pending,
        2,
        "a late completion leaves the ids to their new holder"
    );
    complete(db, OWNER_B, &[offline(2, 1), online(1, 1, from_b)]).await;
    complete(
        db,
        OWNER_A,
        &[online(1, 1, from_a), failed(2, 1, record.clone())],
    )
    .await;

    assert_eq!(backlog(db).await, Backlog::default());
    assert_eq!(claim(db, OWNER_C, at(2_000), 10).await, []);
    assert_eq!(get(store, 1, at(30)).await, Some(from_a));
    assert_eq!(failures(db, 10).await.first(), Some(&record));
}

/// A completion from an instance whose lease ran out, arriving after the id was settled by
/// its new holder and requested again, must not remove that newer request.
pub async fn inbox_a_late_completion_never_removes_a_newer_request(db: Arc<dyn Database>) {
    let db = &*db;
    enqueue(db, &[7], at(0)).await;
    assert_eq!(
        claim_until(db, OWNER_A, at(0), at(10), 10).await,
        [claimed(7, 1)]
    );
    assert_eq!(
        claim_until(db, OWNER_B, at(10), at(1_000), 10).await,
        [claimed(7, 1)]
    );
    complete(db, OWNER_B, &[offline(7, 1)]).await;
    enqueue(db, &[7], at(20)).await; // a new request: generation 1 again

    complete(db, OWNER_A, &[offline(7, 1)]).await; // A wakes up late

    assert_eq!(backlog(db).await.pending, 1, "the new request still waits");
    assert_eq!(
        claim(db, OWNER_C, at(30), 10).await,
        [Claim {
            requested_at: at(20),
            ..claimed(7, 1)
        }]
    );
}

/// `release(Some(owner))` frees that owner's leases only, `release(None)` every lease;
/// both return how many they freed, and freed ids are claimable at once.
pub async fn inbox_release_frees_one_owner_or_every_lease(db: Arc<dyn Database>) {
    let db = &*db;
    let release = |owner: Option<&'static str>| async move {
        db.release(owner).await.expect("release failed")
    };
    assert_eq!(release(None).await, 0);
    enqueue(db, &[1, 2], at(0)).await;
    enqueue(db, &[3, 4], at(10)).await;
    enqueue(db, &[5], at(20)).await;
    assert_eq!(
        by_id(&claim(db, OWNER_A, at(30), 2).await),
        [(1, 1), (2, 1)]
    );
    assert_eq!(
        by_id(&claim(db, OWNER_B, at(30), 2).await),
        [(3, 1), (4, 1)]
    );

    assert_eq!(release(Some("nobody")).await, 0);
    assert_eq!(release(Some(OWNER_A)).await, 2);
    assert_eq!(release(Some(OWNER_A)).await, 0);
    assert_eq!(
        by_id(&claim(db, OWNER_C, at(31), 10).await),
        [(1, 1), (2, 1), (5, 1)],
        "only A's ids (and the one never leased) are free"
    );

    assert_eq!(release(None).await, 5);
    assert_eq!(
        by_id(&claim(db, OWNER_A, at(32), 10).await),
        [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]
    );
    assert_eq!(backlog(db).await.pending, 5, "releasing removes nothing");
}

/// `renew` extends every lease its owner holds and nothing else: not another owner's, not
/// an id waiting for its next attempt (nobody's lease), not one taken over.
pub async fn inbox_renew_extends_only_the_owners_leases(db: Arc<dyn Database>) {
    let db = &*db;
    let renew = |owner: &'static str, until: Timestamp| async move {
        db.renew(owner, until).await.expect("renew failed")
    };
    assert_eq!(renew(OWNER_A, at(1_000)).await, 0, "nothing is leased yet");
    enqueue(db, &[1, 2], at(0)).await;
    enqueue(db, &[3], at(10)).await;
    enqueue(db, &[4], at(20)).await;
    assert_eq!(
        by_id(&claim_until(db, OWNER_A, at(30), at(100), 2).await),
        [(1, 1), (2, 1)]
    );
    assert_eq!(
        by_id(&claim_until(db, OWNER_B, at(30), at(100), 1).await),
        [(3, 1)]
    );
    assert_eq!(
        by_id(&claim_until(db, OWNER_A, at(30), at(100), 1).await),
        [(4, 1)]
    );
    complete(db, OWNER_A, &[retried(4, 1, at(150))]).await;

    assert_eq!(renew("nobody", at(1_000)).await, 0);
    assert_eq!(
        renew(OWNER_A, at(1_000)).await,
        2,
        "ids 1 and 2, not the retry"
    );
    assert_eq!(
        by_id(&claim_until(db, OWNER_C, at(200), at(5_000), 10).await),
        [(3, 1), (4, 1)],
        "B's lease ran out and 4's attempt is due; A's renewed leases hold"
    );
    assert_eq!(
        renew(OWNER_B, at(2_000)).await,
        0,
        "B's lease was taken over: it is C's now"
    );
    assert_eq!(claim(db, OWNER_C, at(999), 10).await, []);
    assert_eq!(
        by_id(&claim(db, OWNER_C, at(1_000), 10).await),
        [(1, 1), (2, 1)],
        "the renewed leases run out at their new time"
    );
}

/// `backlog` counts the distinct ids waiting or leased, and the first request time of the
/// longest-waiting one, to the microsecond.
pub async fn inbox_backlog_counts_waiting_and_leased_ids(db: Arc<dyn Database>) {
    let db = &*db;
    assert_eq!(backlog(db).await, Backlog::default());

    enqueue(db, &[1, 2], at(5)).await;
    enqueue(db, &[3], at(10)).await;
    enqueue(db, &[2], at(20)).await;
    let expected = Backlog {
        pending: 3,
        oldest: Some(at(5)),
        ..Backlog::default()
    };
    assert_eq!(backlog(db).await, expected);

    assert_eq!(claim(db, OWNER_A, at(30), 10).await.len(), 3);
    assert_eq!(backlog(db).await, expected, "leased ids still count");

    complete(db, OWNER_A, &[offline(1, 1), offline(2, 2)]).await;
    assert_eq!(
        backlog(db).await,
        Backlog {
            pending: 1,
            oldest: Some(at(10)),
            ..Backlog::default()
        }
    );
    complete(db, OWNER_A, &[offline(3, 1)]).await;
    assert_eq!(backlog(db).await, Backlog::default());
}

/// Empty input changes nothing and succeeds: no ids to enqueue, no completions, a limit
/// of zero.
pub async fn inbox_empty_input_is_a_no_op(db: Arc<dyn Database>) {
    let db = &*db;
    enqueue(db, &[], at(0)).await;
    complete(db, OWNER_A, &[]).await;
    assert_eq!(backlog(db).await, Backlog::default());
    assert_eq!(claim(db, OWNER_A, at(0), 10).await, []);

    enqueue(db, &[1], at(0)).await;
    enqueue(db, &[], at(1)).await;
    assert_eq!(claim(db, OWNER_A, at(2), 0).await, []);
    complete(db, OWNER_A, &[]).await;
    assert_eq!(failures(db, 0).await, vec![]);
    assert_eq!(
        claim(db, OWNER_A, at(3), 10).await,
        [claimed(1, 1)],
        "nothing bumped or leased it"
    );
}

/// Id 0 and [`ObjectId::MAX`] go through the inbox like any other.
pub async fn inbox_smallest_and_largest_ids(db: Arc<dyn Database>) {
    let db = &*db;
    let store: &dyn ObjectStore = db;
    db.enqueue(
        &[
            Requested::untraced(ObjectId::MAX),
            Requested::untraced(id(0)),
        ],
        at(0),
    )
    .await
    .expect("enqueue failed");
    let claims = claim(db, OWNER_A, at(1), 10).await;
    assert_eq!(by_id(&claims), [(0, 1), (i64::MAX, 1)]);

    let max = StoredObject {
        id: ObjectId::MAX,
        last_seen: at(2),
        expires_at: at(2_000),
    };
    let zero = row(0, at(2), at(1_000));
    let done = [
        Completion {
            claim: Claim {
                id: ObjectId::MAX,
                ..claimed(0, 1)
            },
            outcome: Outcome::Online(max),
        },
        online(0, 1, zero),
    ];
    complete(db, OWNER_A, &done).await;
    assert_eq!(all_live(store, at(3)).await, vec![zero, max]);
    assert_eq!(backlog(db).await, Backlog::default());
}

/// One enqueue of 10 000 ids, a claim of all of them, a new request for all, and
/// completions of 10 000 at once: nothing is lost or duplicated on the way.
pub async fn inbox_ten_thousand_ids_in_one_enqueue(db: Arc<dyn Database>) {
    const IDS: i64 = 10_000;
    let db = &*db;
    let store: &dyn ObjectStore = db;
    // Scattered ids: a permutation of 0..10_000, scaled up.
    let raw: Vec<i64> = (0..IDS).map(|i| (i * 7_919) % IDS * 1_000_003).collect();
    enqueue(db, &raw, at(0)).await;
    assert_eq!(
        backlog(db).await,
        Backlog {
            pending: 10_000,
            oldest: Some(at(0)),
            ..Backlog::default()
        }
    );

    let claims = claim(db, OWNER_A, at(1), 20_000).await;
    let mut expected: Vec<(i64, i64)> = raw.iter().map(|&r| (r, 1)).collect();
    expected.sort_unstable();
    assert_eq!(by_id(&claims), expected);

    // Every id is requested again while leased, then the first round completes: a third
    // online, a third offline, a third failed.
    enqueue(db, &raw, at(2)).await;
    let done: Vec<Completion> = raw
        .iter()
        .enumerate()
        .map(|(i, &r)| match i % 3 {
            0 => online(r, 1, seen(r, at(3))),
            1 => offline(r, 1),
            _ => failed(
                r,
                1,
                failure(r, "status", "upstream answered status 500", at(3)),
            ),
        })
        .collect();
    complete(db, OWNER_A, &done).await;
    assert_eq!(all_live(store, at(4)).await.len(), 3_334);
    assert_eq!(failures(db, 20_000).await.len(), 3_333);
    assert_eq!(
        backlog(db).await,
        Backlog {
            pending: 10_000,
            oldest: Some(at(0)),
            ..Backlog::default()
        },
        "every id was requested again, so every id stays"
    );

    let again = claim(db, OWNER_B, at(5), 20_000).await;
    let expected: Vec<(i64, i64)> = expected.iter().map(|&(r, _)| (r, 2)).collect();
    assert_eq!(by_id(&again), expected);
    let done: Vec<Completion> = raw.iter().map(|&r| offline(r, 2)).collect();
    complete(db, OWNER_B, &done).await;
    assert_eq!(backlog(db).await, Backlog::default());
}

/// Eight writers enqueueing overlapping ids at once, each in an order of its own: one row
/// per id, whose generation counts every request.
pub async fn inbox_concurrent_enqueues_leave_one_row_per_id(db: Arc<dyn Database>) {
    const WRITERS: i64 = 8;
    const IDS: i64 = 1_000;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = Arc::clone(&db);
            tokio::spawn(async move {
                let mut mine: Vec<Requested> =
                    (0..IDS).map(|raw| Requested::untraced(id(raw))).collect();
                mine.rotate_left(usize::try_from(w * 137).expect("small"));
                if w % 2 == 1 {
                    mine.reverse();
                }
                for chunk in mine.chunks(200) {
                    db.enqueue(chunk, at(w))
                        .await
                        .expect("concurrent enqueue failed");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer task panicked");
    }

    let db = &*db;
    assert_eq!(backlog(db).await.pending, 1_000);
    let claims = claim(db, OWNER_A, at(100), 10_000).await;
    let expected: Vec<(i64, i64)> = (0..IDS).map(|i| (i, WRITERS)).collect();
    assert_eq!(by_id(&claims), expected);
}

/// Four claimers taking batches at once until nothing is left: together they claim every
/// id, and no id twice.
pub async fn inbox_concurrent_claimers_never_share_an_id(db: Arc<dyn Database>) {
    const CLAIMERS: usize = 4;
    const IDS: i64 = 1_000;
    let all: Vec<i64> = (0..IDS).collect();
    enqueue(&*db, &all, at(0)).await;

    let tasks: Vec<_> = (0..CLAIMERS)
        .map(|c| {
            let db = Arc::clone(&db);
            tokio::spawn(async move {
                let owner = format!("claimer-{c}");
                let mut mine = Vec::new();
                loop {
                    let batch = claim(&*db, &owner, at(1), 25).await;
                    assert!(batch.len() <= 25, "a claim took {} ids", batch.len());
                    if batch.is_empty() {
                        return mine;
                    }
                    mine.extend(batch.iter().map(|c| c.id.get()));
                }
            })
        })
        .collect();
    let mut union = Vec::new();
    for task in tasks {
        union.extend(task.await.expect("claimer task panicked"));
    }
    let distinct: BTreeSet<i64> = union.iter().copied().collect();
    assert_eq!(distinct.len(), union.len(), "some id was claimed twice");
    assert_eq!(distinct.into_iter().collect::<Vec<_>>(), all);
    assert_eq!(claim(&*db, OWNER_A, at(2), 10).await, []);
}

/// Dead letters are never trimmed by count: 50 000 of them are all listed, page by page,
/// newest first, each once.
pub async fn inbox_dead_letters_are_all_kept_and_paginated(db: Arc<dyn Database>) {
    const RECORDED: i64 = 50_000;
    let db = &*db;
    let all: Vec<i64> = (0..RECORDED).collect();
    enqueue(db, &all, at(0)).await;
    assert_eq!(claim(db, OWNER_A, at(1), 60_000).await.len(), 50_000);
    // Oldest ids first, in several completions.
    for chunk in all.chunks(10_000) {
        let done: Vec<Completion> = chunk
            .iter()
            .map(|&i| failed(i, 1, failure(i, "timeout", "slow", at(10 + i))))
            .collect();
        complete(db, OWNER_A, &done).await;
    }
    assert_eq!(backlog(db).await, Backlog::default());

    let listed = every_dead_letter(db, &FailureFilter::default(), 7_000).await;
    let listed_ids: Vec<i64> = listed.iter().map(|l| l.record.id.get()).collect();
    let newest_first: Vec<i64> = all.iter().rev().copied().collect();
    assert_eq!(
        listed_ids, newest_first,
        "every dead letter, newest first, once"
    );
    assert!(listed.windows(2).all(|pair| pair[0].seq > pair[1].seq));
    assert_eq!(
        listed[0].record,
        failure(RECORDED - 1, "timeout", "slow", at(10 + RECORDED - 1))
    );
}

/// A transient failure hands the id back unleased: it is claimable again from its next
/// attempt's time (not before, not even after `release`), with its attempts counted and
/// its first request time kept; the backlog counts it as retrying until it settles.
pub async fn inbox_a_retry_hands_the_id_back_until_its_next_attempt(db: Arc<dyn Database>) {
    let db = &*db;
    enqueue(db, &[7, 8], at(0)).await;
    assert_eq!(
        by_id(&claim(db, OWNER_A, at(1), 10).await),
        [(7, 1), (8, 1)]
    );
    complete(db, OWNER_A, &[retried(7, 1, at(100)), offline(8, 1)]).await;
    assert_eq!(
        backlog(db).await,
        Backlog {
            pending: 1,
            oldest: Some(at(0)),
            retrying: 1,
            oldest_retrying: Some(at(0)),
        }
    );
    assert_eq!(claim(db, OWNER_B, at(99), 10).await, []);
    assert_eq!(
        db.release(None).await.expect("release failed"),
        0,
        "nobody holds it"
    );
    assert_eq!(
        claim(db, OWNER_B, at(99), 10).await,
        [],
        "release does not bring it forward"
    );

    let again = claim(db, OWNER_B, at(100), 10).await;
    assert_eq!(
        again,
        [Claim {
            attempts: 1,
            ..claimed(7, 1)
        }]
    );
    complete(db, OWNER_B, &[retried(7, 1, at(300))]).await;
    assert_eq!(claim(db, OWNER_A, at(299), 10).await, []);
    assert_eq!(
        claim(db, OWNER_A, at(300), 10).await,
        [Claim {
            attempts: 2,
            ..claimed(7, 1)
        }]
    );
    let stored = seen(7, at(301));
    complete(db, OWNER_A, &[online(7, 1, stored)]).await;
    assert_eq!(backlog(db).await, Backlog::default());
    assert_eq!(all_live(db, at(302)).await, vec![stored]);
    assert_eq!(
        failures(db, 10).await,
        vec![],
        "a retry is not a dead letter"
    );
}

/// Requests for an id that waits for a retry keep it waiting, one row, until the attempt
/// it waits for; that attempt serves them all (the newest generation is claimed).
pub async fn inbox_a_request_during_a_retry_wait_keeps_the_schedule(db: Arc<dyn Database>) {
    let db = &*db;
    enqueue(db, &[7], at(0)).await;
    assert_eq!(claim(db, OWNER_A, at(1), 10).await, [claimed(7, 1)]);
    enqueue(db, &[7], at(2)).await; // during the fetch
    complete(db, OWNER_A, &[retried(7, 1, at(100))]).await;
    enqueue(db, &[7], at(50)).await; // while it waits
    assert_eq!(backlog(db).await.pending, 1);
    assert_eq!(claim(db, OWNER_A, at(99), 10).await, []);
    assert_eq!(
        claim(db, OWNER_A, at(100), 10).await,
        [Claim {
            attempts: 1,
            ..claimed(7, 3)
        }]
    );
    complete(db, OWNER_A, &[offline(7, 3)]).await;
    assert_eq!(backlog(db).await, Backlog::default());
}

/// A retry from an instance whose lease ran out and was taken over changes nothing: the
/// new holder keeps the id.
pub async fn inbox_a_late_retry_leaves_a_taken_over_id_alone(db: Arc<dyn Database>) {
    let db = &*db;
    enqueue(db, &[7], at(0)).await;
    assert_eq!(
        claim_until(db, OWNER_A, at(1), at(10), 10).await,
        [claimed(7, 1)]
    );
    assert_eq!(claim(db, OWNER_B, at(10), 10).await, [claimed(7, 1)]);
    complete(db, OWNER_A, &[retried(7, 1, at(11))]).await;
    assert_eq!(claim(db, OWNER_C, at(20), 10).await, [], "B still holds it");
    complete(db, OWNER_B, &[offline(7, 1)]).await;
    assert_eq!(backlog(db).await, Backlog::default());
}

/// Two dead letters of ids 1 to 4, with these codes and times.
async fn record_dead_letters(db: &dyn Database) -> Vec<FailureRecord> {
    let records = vec![
        failure(1, "timeout", "slow", at(10)),
        failure(2, "status", "upstream answered status 404", at(20)),
        failure(3, "timeout", "slow", at(30)),
        failure(1, "malformed", "not json", at(40)),
        FailureRecord {
            attempts: 17,
            ..failure(4, "unreachable", "refused", at(50))
        },
    ];
    for record in &records {
        let raw = record.id.get();
        enqueue(db, &[raw], at(0)).await;
        assert_eq!(claim(db, OWNER_A, at(0), 10).await.len(), 1);
        complete(db, OWNER_A, &[failed(raw, 1, record.clone())]).await;
    }
    records
}

fn records(letters: &[DeadLetter]) -> Vec<FailureRecord> {
    letters.iter().map(|letter| letter.record.clone()).collect()
}

/// Dead letters filter by ids, code and a half-open time range, every condition at once.
pub async fn inbox_dead_letters_filter_by_id_code_and_time(db: Arc<dyn Database>) {
    let db = &*db;
    let r = record_dead_letters(db).await;
    let select = async |filter: FailureFilter| records(&every_dead_letter(db, &filter, 2).await);
    assert_eq!(
        select(FailureFilter::default()).await,
        [
            r[4].clone(),
            r[3].clone(),
            r[2].clone(),
            r[1].clone(),
            r[0].clone()
        ]
    );
    let timeouts = FailureFilter {
        code: Some("timeout".into()),
        ..FailureFilter::default()
    };
    assert_eq!(select(timeouts).await, [r[2].clone(), r[0].clone()]);
    let one = FailureFilter {
        ids: Some(vec![id(1), id(4)]),
        ..FailureFilter::default()
    };
    assert_eq!(
        select(one).await,
        [r[4].clone(), r[3].clone(), r[0].clone()]
    );
    let window = FailureFilter {
        since: Some(at(20)),
        until: Some(at(40)),
        ..FailureFilter::default()
    };
    assert_eq!(
        select(window).await,
        [r[2].clone(), r[1].clone()],
        "since ≤ at < until"
    );
    let all_of = FailureFilter {
        ids: Some(vec![id(1), id(3)]),
        code: Some("timeout".into()),
        since: Some(at(11)),
        until: None,
    };
    assert_eq!(select(all_of).await, [r[2].clone()]);
    let none = FailureFilter {
        ids: Some(vec![]),
        ..FailureFilter::default()
    };
    assert_eq!(select(none).await, []);
}

/// Replay puts the selected dead letters' ids back in the inbox once each, as new
/// requests, and removes those dead letters; repeated, it finds nothing.
pub async fn inbox_replay_puts_dead_letters_back_once(db: Arc<dyn Database>) {
    let db = &*db;
    let r = record_dead_letters(db).await;
    enqueue(db, &[3], at(60)).await; // 3 waits already: replay bumps it
    let filter = FailureFilter {
        ids: Some(vec![id(1), id(3)]),
        ..FailureFilter::default()
    };
    assert_eq!(
        db.replay_failures(&filter, at(70))
            .await
            .expect("replay failed"),
        3
    );
    assert_eq!(
        db.replay_failures(&filter, at(80))
            .await
            .expect("replay failed"),
        0
    );
    assert_eq!(
        records(&every_dead_letter(db, &FailureFilter::default(), 10).await),
        [r[4].clone(), r[1].clone()]
    );
    let claims = claim(db, OWNER_A, at(90), 10).await;
    assert_eq!(by_id(&claims), [(1, 1), (3, 2)]);
    let replayed = claims.iter().find(|c| c.id == id(1)).expect("1 is claimed");
    assert_eq!((replayed.attempts, replayed.requested_at), (0, at(70)));
    complete(db, OWNER_A, &[offline(1, 1), offline(3, 2)]).await;
    assert_eq!(backlog(db).await, Backlog::default());
    // Everything else, by an empty filter.
    assert_eq!(
        db.replay_failures(&FailureFilter::default(), at(100))
            .await
            .expect("replay failed"),
        2
    );
    assert_eq!(backlog(db).await.pending, 2);
    assert_eq!(failures(db, 10).await, []);
}

/// Purge deletes the selected dead letters and nothing else, and returns how many.
pub async fn inbox_purge_deletes_the_selected_dead_letters(db: Arc<dyn Database>) {
    let db = &*db;
    let r = record_dead_letters(db).await;
    let old = FailureFilter {
        until: Some(at(30)),
        ..FailureFilter::default()
    };
    assert_eq!(db.purge_failures(&old).await.expect("purge failed"), 2);
    assert_eq!(db.purge_failures(&old).await.expect("purge failed"), 0);
    assert_eq!(
        failures(db, 10).await,
        [r[4].clone(), r[3].clone(), r[2].clone()]
    );
    assert_eq!(
        backlog(db).await,
        Backlog::default(),
        "purge enqueues nothing"
    );
    assert_eq!(
        db.purge_failures(&FailureFilter::default())
            .await
            .expect("purge failed"),
        3
    );
    assert_eq!(failures(db, 10).await, []);
}

/// Writers requesting every id while two workers claim, "fetch" and complete them, all at
/// once, on one logical clock: once everything is settled, every online id is stored with
/// a sighting later than its last request, so no request was settled by a fetch that
/// started before it. Many last requests arrive while their id is leased.
pub async fn inbox_every_request_is_served_by_a_later_fetch(db: Arc<dyn Database>) {
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

    const WRITERS: i64 = 4;
    const IDS: i64 = 400;
    const WORKERS: usize = 2;
    // Ticks of the shared clock, in microseconds after `T0`.
    let clock = Arc::new(AtomicI64::new(1));
    let tick = |clock: &AtomicI64| at(clock.fetch_add(1, Ordering::SeqCst));
    let writers_done = Arc::new(AtomicBool::new(false));
    // How many enqueues were committed so far.
    let enqueued = Arc::new(AtomicU64::new(0));
    // The time of the last request of each id, taken before the enqueue was sent.
    let last_request = Arc::new(std::sync::Mutex::new(BTreeMap::<i64, Timestamp>::new()));

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (db, clock, last_request, enqueued) = (
                Arc::clone(&db),
                Arc::clone(&clock),
                Arc::clone(&last_request),
                Arc::clone(&enqueued),
            );
            tokio::spawn(async move {
                // Every writer requests every id once, in an order of its own.
                let mut raw: Vec<i64> = (0..IDS).collect();
                raw.rotate_left(usize::try_from(w * 100).expect("small"));
                if w % 2 == 1 {
                    raw.reverse();
                }
                for chunk in raw.chunks(10) {
                    let requested = tick(&clock);
                    {
                        let mut last = last_request.lock().expect("not poisoned");
                        for &r in chunk {
                            let entry = last.entry(r).or_insert(requested);
                            *entry = (*entry).max(requested);
                        }
                    }
                    enqueue(&*db, chunk, requested).await;
                    enqueued.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let workers: Vec<_> = (0..WORKERS)
        .map(|k| {
            let (db, clock, writers_done, enqueued) = (
                Arc::clone(&db),
                Arc::clone(&clock),
                Arc::clone(&writers_done),
                Arc::clone(&enqueued),
            );
            tokio::spawn(async move {
                let owner = format!("worker-{k}");
                loop {
                    let finished = writers_done.load(Ordering::SeqCst);
                    let claims = claim(&*db, &owner, at(0), 10).await;
                    if claims.is_empty() {
                        if finished && backlog(&*db).await.pending == 0 {
                            return;
                        }
                        tokio::task::yield_now().await;
                        continue;
                    }
                    // The "fetch" starts after the claim: its sighting is a later tick. It
                    // lasts until two more requests were committed (or the writers are
                    // done), so that ids are requested again while they are leased.
                    let fetched = tick(&clock);
                    let enqueued_before = enqueued.load(Ordering::SeqCst);
                    while enqueued.load(Ordering::SeqCst) < enqueued_before + 2
                        && !writers_done.load(Ordering::SeqCst)
                    {
                        tokio::task::yield_now().await;
                    }
                    let done: Vec<Completion> = claims
                        .iter()
                        .map(|c| {
                            let raw = c.id.get();
                            if raw % 2 == 0 {
                                online(raw, c.generation, row(raw, fetched, at(1_000_000_000)))
                            } else {
                                offline(raw, c.generation)
                            }
                        })
                        .collect();
                    complete(&*db, &owner, &done).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer task panicked");
    }
    writers_done.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.expect("worker task panicked");
    }

    let db = &*db;
    assert_eq!(backlog(db).await, Backlog::default());
    let stored: BTreeMap<i64, Timestamp> = all_live(db, at(0))
        .await
        .into_iter()
        .map(|o| (o.id.get(), o.last_seen))
        .collect();
    let last_request = last_request.lock().expect("not poisoned").clone();
    assert_eq!(last_request.len(), 400);
    for (raw, requested) in last_request {
        if raw % 2 == 1 {
            assert!(!stored.contains_key(&raw), "offline id {raw} was stored");
            continue;
        }
        let seen = stored.get(&raw).copied();
        assert!(
            seen.is_some_and(|seen| seen > requested),
            "id {raw} last requested at {requested:?} but last seen at {seen:?}"
        );
    }
}

#[cfg(test)]
mod memory_store {
    use std::sync::Arc;

    use crate::testing::MemoryStore;

    crate::object_store_conformance!(async { Arc::new(MemoryStore::new()) });
    crate::inbox_conformance!(async { Arc::new(MemoryStore::new()) });
}

/// The macros with a fixture that is skipped: every case passes without touching a store.
#[cfg(test)]
mod skipped_fixture {
    use std::sync::Arc;

    use crate::testing::MemoryStore;

    crate::object_store_conformance!(async { None::<Arc<MemoryStore>> });
    crate::inbox_conformance!(async { None::<Arc<MemoryStore>> });
}

#[cfg(test)]
mod fixture_tests {
    use super::*;
    use crate::testing::MemoryStore;

    #[test]
    fn only_a_missing_fixture_is_skipped() {
        let store = Arc::new(MemoryStore::new());
        assert!(!StoreFixture::skipped(&store));
        assert!(!StoreFixture::skipped(&Some(Arc::clone(&store))));
        assert!(StoreFixture::skipped(&None::<Arc<MemoryStore>>));
        let nested: Option<(Arc<dyn ObjectStore>, ())> = Some((store, ()));
        assert!(!StoreFixture::skipped(&nested));
        nested.store();
    }

    #[test]
    fn one_database_fixture_serves_both_suites() {
        let database: Arc<dyn Database> = Arc::new(MemoryStore::new());
        let fixture = Some((Arc::clone(&database), ()));
        assert!(!StoreFixture::skipped(&fixture));
        assert!(!DatabaseFixture::skipped(&fixture));
        assert!(Arc::ptr_eq(&DatabaseFixture::database(&fixture), &database));
        StoreFixture::store(&fixture);
        assert!(DatabaseFixture::skipped(&None::<Arc<MemoryStore>>));
        assert!(DatabaseFixture::skipped(&None::<(Arc<dyn Database>, ())>));
        assert!(!DatabaseFixture::skipped(&Arc::new(MemoryStore::new())));
    }
}

/// A W3C `traceparent` whose span id ends in `n`.
fn traceparent(n: u8) -> TraceParent {
    TraceParent::new(&format!(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902{n:02x}-01"
    ))
    .expect("printable")
}

/// Claims as `(id, trace)`, ascending by id.
fn traces_by_id(claims: &[Claim]) -> Vec<(i64, Option<String>)> {
    let mut pairs: Vec<_> = claims
        .iter()
        .map(|c| (c.id.get(), c.trace.as_ref().map(|t| t.as_str().to_owned())))
        .collect();
    pairs.sort_unstable();
    pairs
}

/// The trace context of a request travels with its id to the claim, so the fetch joins the
/// request's trace; a later request that carries one replaces it, one that carries none
/// keeps it. The longest allowed context is kept whole.
pub async fn inbox_keeps_the_trace_context_of_the_newest_traced_request(db: Arc<dyn Database>) {
    let db = &*db;
    let (a, b) = (traceparent(1), traceparent(2));
    let long = TraceParent::new(&"x".repeat(TraceParent::MAX_LEN)).expect("printable");
    let traced = |raw: i64, trace: &TraceParent| Requested {
        id: id(raw),
        trace: Some(trace.clone()),
    };
    db.enqueue(
        &[traced(1, &a), Requested::untraced(id(2)), traced(3, &long)],
        at(0),
    )
    .await
    .expect("enqueue failed");
    let text = |t: &TraceParent| Some(t.as_str().to_owned());
    assert_eq!(
        traces_by_id(&claim(db, OWNER_A, at(1), 10).await),
        [(1, text(&a)), (2, None), (3, text(&long))]
    );

    // Requested again during the fetch: 1 without a context, 2 with one.
    db.enqueue(&[Requested::untraced(id(1)), traced(2, &b)], at(2))
        .await
        .expect("enqueue failed");
    complete(db, OWNER_A, &[offline(1, 1), offline(2, 1), offline(3, 1)]).await;
    assert_eq!(
        traces_by_id(&claim(db, OWNER_A, at(3), 10).await),
        [(1, text(&a)), (2, text(&b))],
        "the fetches of the new requests join the newest traced request"
    );
}

/// An id requested again during its fetch is handed back by `complete` claimable only from
/// the instant given, by any instance; it is nobody's lease meanwhile (releasing every
/// lease does not count it), and it still counts as waiting.
pub async fn inbox_an_id_requested_again_is_claimable_from_the_given_instant(
    db: Arc<dyn Database>,
) {
    let db = &*db;
    enqueue(db, &[4, 5], at(0)).await;
    assert_eq!(
        by_id(&claim(db, OWNER_A, at(1), 10).await),
        [(4, 1), (5, 1)]
    );
    enqueue(db, &[4], at(2)).await; // requested again during the fetch
    db.complete(OWNER_A, &[offline(4, 1), offline(5, 1)], at(100))
        .await
        .expect("complete failed");

    assert_eq!(backlog(db).await.pending, 1);
    assert_eq!(
        claim(db, OWNER_B, at(99), 10).await,
        [],
        "not before at(100)"
    );
    assert_eq!(db.release(None).await.expect("release failed"), 0);
    assert_eq!(claim(db, OWNER_B, at(100), 10).await, [claimed(4, 2)]);
}
