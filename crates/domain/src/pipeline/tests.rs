//! Pipeline behaviour under tokio's paused clock: time only moves when every task waits.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::*;
use crate::testing::{FakeSource, MemoryStore, PausedClock};

const LATENCY: Duration = Duration::from_secs(1);

struct Rig {
    source: Arc<FakeSource>,
    store: Arc<MemoryStore>,
    clock: Arc<PausedClock>,
    pipeline: Pipeline,
}

impl Rig {
    fn new(config: PipelineConfig) -> Self {
        let source = Arc::new(FakeSource::new(LATENCY));
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(PausedClock::new());
        let pipeline = Pipeline::start(
            source.clone(),
            store.clone(),
            clock.clone(),
            ExpiryWaker::new(),
            config,
        );
        Self {
            source,
            store,
            clock,
            pipeline,
        }
    }

    fn submit(&self, raw: &[i64]) -> Result<(), SubmitError> {
        self.pipeline.handle().submit(&ids(raw))
    }

    fn stats(&self) -> PipelineStats {
        self.pipeline.handle().stats()
    }

    async fn stored(&self, raw: i64) -> Option<StoredObject> {
        self.store
            .get(ObjectId::new(raw).unwrap(), self.clock.now())
            .await
            .unwrap()
    }
}

fn ids(raw: &[i64]) -> DistinctIds {
    raw.iter().map(|&v| ObjectId::new(v).unwrap()).collect()
}

fn id(raw: i64) -> ObjectId {
    ObjectId::new(raw).unwrap()
}

#[tokio::test(start_paused = true)]
async fn even_ids_are_stored_odd_ids_are_not_and_duplicates_are_fetched_once() {
    let rig = Rig::new(PipelineConfig::default());
    rig.submit(&[0, 1, 2, 2, 3]).unwrap();
    sleep(LATENCY * 2).await;

    assert!(rig.stored(0).await.is_some(), "id 0 is even and valid");
    assert!(rig.stored(2).await.is_some());
    assert!(rig.stored(1).await.is_none());
    assert!(rig.stored(3).await.is_none());
    let counts = rig.source.fetch_counts();
    assert_eq!(counts.len(), 4);
    assert!(
        counts.values().all(|&n| n == 1),
        "each id fetched once: {counts:?}"
    );
    let stats = rig.stats();
    assert_eq!((stats.online, stats.offline, stats.failed), (2, 2, 0));
    assert_eq!(
        (stats.accepted_ids, stats.stored, stats.pending_ids),
        (4, 2, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn last_seen_is_when_the_upstream_answered_and_expiry_follows_the_ttl() {
    let ttl = Duration::from_secs(30);
    let rig = Rig::new(PipelineConfig {
        ttl,
        ..PipelineConfig::default()
    });
    let accepted_at = rig.clock.now();
    rig.submit(&[4]).unwrap();
    sleep(LATENCY * 2).await;

    let row = rig.stored(4).await.expect("id 4 stored");
    assert_eq!(row.last_seen, accepted_at.saturating_add(LATENCY));
    assert_eq!(row.expires_at, row.last_seen.saturating_add(ttl));
}

#[tokio::test(start_paused = true)]
async fn a_callback_arriving_during_a_fetch_gets_a_fetch_that_starts_after_it() {
    let rig = Rig::new(PipelineConfig::default());
    rig.submit(&[2]).unwrap();
    sleep(LATENCY / 2).await;
    let second_accepted = Instant::now();
    rig.submit(&[2]).unwrap();
    sleep(LATENCY / 4).await;
    let third_accepted = Instant::now();
    rig.submit(&[2]).unwrap(); // shares the pending fetch with the second
    sleep(LATENCY * 3).await;

    let fetches = rig.source.fetches();
    assert_eq!(
        fetches.len(),
        2,
        "one in flight plus one pending: {fetches:?}"
    );
    assert!(fetches[1].started >= second_accepted);
    assert!(fetches[1].started >= third_accepted);
    let row = rig.stored(2).await.unwrap();
    assert_eq!(
        row.last_seen.saturating_duration_since(rig.clock.now()),
        Duration::ZERO
    );
}

#[tokio::test(start_paused = true)]
async fn a_queued_fetch_is_shared_by_callbacks_accepted_before_it_starts() {
    let rig = Rig::new(PipelineConfig {
        max_in_flight: 1,
        ..PipelineConfig::default()
    });
    rig.submit(&[1]).unwrap();
    tokio::task::yield_now().await;
    rig.submit(&[2]).unwrap();
    rig.submit(&[2]).unwrap();
    let last_accept = Instant::now();
    sleep(LATENCY * 3).await;

    let fetches = rig.source.fetches();
    assert_eq!(fetches.iter().filter(|f| f.id == id(2)).count(), 1);
    assert!(
        fetches
            .iter()
            .all(|f| f.id != id(2) || f.started >= last_accept)
    );
}

#[tokio::test(start_paused = true)]
async fn fetches_in_flight_are_bounded() {
    let rig = Rig::new(PipelineConfig {
        max_in_flight: 4,
        ..PipelineConfig::default()
    });
    rig.submit(&(0..20).collect::<Vec<_>>()).unwrap();
    sleep(LATENCY * 10).await;

    assert_eq!(rig.source.max_in_flight(), 4);
    assert_eq!(rig.source.fetches().len(), 20);
    assert_eq!(rig.stats().stored, 10);
}

#[tokio::test(start_paused = true)]
async fn online_results_are_written_in_batches() {
    let rig = Rig::new(PipelineConfig {
        max_batch: 30,
        ..PipelineConfig::default()
    });
    let even: Vec<i64> = (0..100).map(|i| i * 2).collect();
    rig.submit(&even).unwrap();
    sleep(LATENCY * 2).await;

    let batches = rig.store.batch_sizes();
    assert_eq!(batches.iter().sum::<usize>(), 100);
    assert!(batches.iter().all(|&n| n <= 30), "{batches:?}");
    assert!(
        batches.len() <= 4,
        "100 ids answered at once need at most 4 writes: {batches:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_fetch_is_recorded_with_its_reason_and_blocks_nothing() {
    let rig = Rig::new(PipelineConfig::default());
    rig.source.set_rule(|id| {
        if id.get() == 6 {
            Err(FetchError::Status(503))
        } else {
            Ok(id.get() % 2 == 0)
        }
    });
    let before = rig.clock.now();
    rig.submit(&[4, 6, 8]).unwrap();
    sleep(LATENCY * 2).await;

    assert!(rig.stored(4).await.is_some());
    assert!(rig.stored(8).await.is_some());
    assert!(rig.stored(6).await.is_none());
    let failures = rig.pipeline.handle().recent_failures();
    assert_eq!(failures.len(), 1);
    assert_eq!((failures[0].id, failures[0].code), (id(6), "status"));
    assert!(failures[0].reason.contains("503"), "{}", failures[0].reason);
    assert!(failures[0].at > before);
    assert_eq!(rig.stats().failed, 1);
}

#[tokio::test(start_paused = true)]
async fn an_answer_about_another_id_is_a_failure() {
    struct Liar;
    impl ObjectSource for Liar {
        fn fetch(
            &self,
            _id: ObjectId,
        ) -> crate::ports::BoxFuture<'_, Result<crate::ports::ObjectStatus, FetchError>> {
            Box::pin(async {
                Ok(crate::ports::ObjectStatus {
                    id: ObjectId::new(99).unwrap(),
                    online: true,
                })
            })
        }
    }
    let store = Arc::new(MemoryStore::new());
    let pipeline = Pipeline::start(
        Arc::new(Liar),
        store.clone(),
        Arc::new(PausedClock::new()),
        ExpiryWaker::new(),
        PipelineConfig::default(),
    );
    pipeline.handle().submit(&ids(&[2])).unwrap();
    sleep(LATENCY).await;
    assert!(store.is_empty());
    let failures = pipeline.handle().recent_failures();
    assert_eq!(failures[0].code, "id_mismatch");
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_is_retried_until_the_write_goes_through() {
    let rig = Rig::new(PipelineConfig::default());
    rig.store.set_unavailable(true);
    rig.submit(&[2]).unwrap();
    sleep(LATENCY + Duration::from_millis(350)).await; // two attempts failed by now
    rig.store.set_unavailable(false);
    sleep(Duration::from_secs(2)).await;

    assert!(rig.stored(2).await.is_some());
    assert_eq!(rig.stats().failed, 0);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_never_comes_back_fails_the_ids_with_the_cause() {
    let rig = Rig::new(PipelineConfig {
        store_attempts: 3,
        ..PipelineConfig::default()
    });
    rig.store.set_unavailable(true);
    rig.submit(&[2, 4]).unwrap();
    sleep(Duration::from_secs(10)).await;

    let failures = rig.pipeline.handle().recent_failures();
    assert_eq!(failures.len(), 2);
    assert!(
        failures
            .iter()
            .all(|f| f.code == "store" && f.reason.contains("unavailable"))
    );
}

#[tokio::test(start_paused = true)]
async fn past_the_backlog_bound_callbacks_are_refused() {
    let rig = Rig::new(PipelineConfig {
        max_pending_ids: 5,
        ..PipelineConfig::default()
    });
    rig.submit(&[1, 2, 3]).unwrap();
    assert!(matches!(
        rig.submit(&[4, 5, 6]),
        Err(SubmitError::Overloaded {
            pending: 3,
            limit: 5
        })
    ));
    sleep(LATENCY * 2).await;
    rig.submit(&[4, 5, 6]).unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_accepted_work_then_refuses_more() {
    let rig = Rig::new(PipelineConfig::default());
    rig.submit(&[2, 4, 5]).unwrap();
    let handle = rig.pipeline.handle();
    let left = rig.pipeline.shutdown(Duration::from_secs(10)).await;

    assert_eq!(left, 0);
    assert_eq!(rig.store.len(), 2);
    assert_eq!(handle.submit(&ids(&[6])), Err(SubmitError::ShuttingDown));
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_bounded_and_says_what_was_left() {
    let rig = Rig::new(PipelineConfig {
        max_in_flight: 1,
        ..PipelineConfig::default()
    });
    rig.submit(&[1, 2, 3, 4]).unwrap();
    let left = rig.pipeline.shutdown(LATENCY + LATENCY / 2).await;
    assert_eq!(
        left, 3,
        "one fetch done, one aborted in flight, two never started"
    );
}
