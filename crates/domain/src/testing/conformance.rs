//! The conformance suite of the [`ObjectStore`] port: written once, run against the
//! in-memory fake and every database adapter.
//!
//! Each case is a public async function that takes a fresh, empty store and panics when
//! the store breaks the port's contract. Times are fixed [`Timestamp`]s: no clock, no
//! sleeps. [`object_store_conformance!`](crate::object_store_conformance) turns the whole
//! list into one `#[tokio::test]` per case, so an adapter's test file is a few lines:
//!
//! ```text
//! async fn fixture() -> (Arc<dyn ObjectStore>, tempfile::TempDir) { /* a fresh store */ }
//!
//! domain::object_store_conformance!(#[tokio::test(flavor = "multi_thread")] fixture());
//! ```
//!
//! A fixture that needs something the machine may lack (a database server) yields an
//! `Option` of a fixture instead: `None` skips the case, which then passes without running.
//! Saying loudly why is the fixture's job.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::id::ObjectId;
use crate::ports::{ObjectStore, StoredObject};
use crate::time::Timestamp;

/// What a store fixture hands to a case: the store, plus anything that must outlive it.
///
/// Implemented for `Arc<S>`, `Arc<dyn ObjectStore>` and `(Arc<dyn ObjectStore>, G)`, where
/// `G` is a guard kept alive until the case ends (a temporary directory, a database that
/// is dropped afterwards), and for `Option` of any of these, where `None` skips the case.
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

impl<G> StoreFixture for (Arc<dyn ObjectStore>, G) {
    fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.0)
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

#[cfg(test)]
mod memory_store {
    use std::sync::Arc;

    use crate::testing::MemoryStore;

    crate::object_store_conformance!(async { Arc::new(MemoryStore::new()) });
}

/// The macro with a fixture that is skipped: every case passes without touching a store.
#[cfg(test)]
mod skipped_fixture {
    use std::sync::Arc;

    use crate::testing::MemoryStore;

    crate::object_store_conformance!(async { None::<Arc<MemoryStore>> });
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
}
