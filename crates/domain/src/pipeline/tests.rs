//! Pipeline behaviour under tokio's paused clock: time only moves when every task waits.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::*;
use crate::ports::{Inbox, ObjectStore};
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
        Self::on(Arc::new(MemoryStore::new()), config)
    }

    fn on(store: Arc<MemoryStore>, config: PipelineConfig) -> Self {
        Self::traced(store, Arc::new(crate::ports::NoTracePropagation), config)
    }

    fn traced(
        store: Arc<MemoryStore>,
        propagation: Arc<dyn TracePropagation>,
        config: PipelineConfig,
    ) -> Self {
        let source = Arc::new(FakeSource::new(LATENCY));
        let clock = Arc::new(PausedClock::new());
        let pipeline = Pipeline::start(
            source.clone(),
            store.clone(),
            clock.clone(),
            ExpiryWaker::new(),
            propagation,
            config,
        );
        Self {
            source,
            store,
            clock,
            pipeline,
        }
    }

    async fn submit(&self, raw: &[i64]) -> Result<(), SubmitError> {
        self.pipeline.handle().submit(ids(raw)).await
    }

    fn stats(&self) -> PipelineStats {
        self.pipeline.handle().stats()
    }

    async fn stored(&self, raw: i64) -> Option<StoredObject> {
        self.store.get(id(raw), self.clock.now()).await.unwrap()
    }

    async fn dead_letters(&self) -> Vec<FailureRecord> {
        dead_letters(&self.pipeline.handle()).await
    }
}

/// Every dead letter, newest first.
async fn dead_letters(handle: &PipelineHandle) -> Vec<FailureRecord> {
    let query = FailureQuery {
        limit: usize::MAX,
        ..FailureQuery::default()
    };
    let letters = handle.failures(&query).await.unwrap();
    letters.into_iter().map(|letter| letter.record).collect()
}

fn ids(raw: &[i64]) -> DistinctIds {
    raw.iter().map(|&v| id(v)).collect()
}

fn id(raw: i64) -> ObjectId {
    ObjectId::new(raw).unwrap()
}

fn untraced(raw: &[i64]) -> Vec<Requested> {
    raw.iter().map(|&v| Requested::untraced(id(v))).collect()
}

/// A propagation that hands out one context for every callback and records which
/// contexts spans were given as parents.
#[derive(Default)]
struct RecordingPropagation {
    current: std::sync::Mutex<Option<TraceParent>>,
    parents: std::sync::Mutex<Vec<String>>,
}

impl RecordingPropagation {
    fn set_current(&self, text: &str) {
        *self.current.lock().unwrap() = TraceParent::new(text);
    }

    fn parents(&self) -> Vec<String> {
        let mut parents = self.parents.lock().unwrap().clone();
        parents.sort();
        parents
    }
}

impl TracePropagation for RecordingPropagation {
    fn current(&self) -> Option<TraceParent> {
        self.current.lock().unwrap().clone()
    }

    fn set_parent(&self, _span: &tracing::Span, parent: &TraceParent) {
        self.parents
            .lock()
            .unwrap()
            .push(parent.as_str().to_owned());
    }
}

#[tokio::test(start_paused = true)]
async fn each_fetch_and_the_store_batch_join_the_trace_of_the_callback() {
    let propagation = Arc::new(RecordingPropagation::default());
    let rig = Rig::traced(
        Arc::new(MemoryStore::new()),
        propagation.clone(),
        PipelineConfig::default(),
    );
    propagation.set_current("trace-of-callback-1");
    rig.submit(&[2, 3]).await.unwrap();
    propagation.set_current("trace-of-callback-2");
    sleep(LATENCY * 2).await;

    assert!(rig.stored(2).await.is_some());
    assert_eq!(
        propagation.parents(),
        ["trace-of-callback-1"; 3],
        "two fetch spans and one store batch span, all in the callback's trace"
    );
}

#[tokio::test(start_paused = true)]
async fn work_left_by_an_earlier_run_joins_the_trace_of_the_callback_that_asked() {
    let store = Arc::new(MemoryStore::new());
    let clock = PausedClock::new();
    let asked = Requested {
        id: id(4),
        trace: TraceParent::new("trace-of-a-callback-before-the-crash"),
    };
    store.enqueue(&[asked], clock.now()).await.unwrap();
    let propagation = Arc::new(RecordingPropagation::default());
    let rig = Rig::traced(store, propagation.clone(), PipelineConfig::default());
    sleep(LATENCY * 2).await;

    assert!(rig.stored(4).await.is_some());
    assert_eq!(
        propagation.parents(),
        ["trace-of-a-callback-before-the-crash"; 2]
    );
}

#[tokio::test(start_paused = true)]
async fn even_ids_are_stored_odd_ids_are_not_and_duplicates_are_fetched_once() {
    let rig = Rig::new(PipelineConfig::default());
    rig.submit(&[0, 1, 2, 2, 3]).await.unwrap();
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
    assert_eq!((stats.accepted_ids, stats.stored), (4, 2));
    assert_eq!(
        rig.store.inbox_len(),
        0,
        "every id left the inbox with its outcome"
    );
}

#[tokio::test(start_paused = true)]
async fn an_accepted_callback_is_in_the_inbox_before_submit_returns() {
    let rig = Rig::new(PipelineConfig::default());
    rig.submit(&[5, 6, 7]).await.unwrap();
    // No time has passed: nothing was fetched, but all three ids are durable.
    assert_eq!(rig.store.inbox_len(), 3);
    assert_eq!(rig.store.enqueue_sizes(), vec![3]);
}

#[tokio::test(start_paused = true)]
async fn concurrent_callbacks_share_one_inbox_transaction() {
    let rig = Rig::new(PipelineConfig::default());
    let handle = rig.pipeline.handle();
    let submits: Vec<_> = (0..50)
        .map(|i| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.submit(ids(&[i, i + 1])).await })
        })
        .collect();
    for submit in submits {
        submit.await.unwrap().unwrap();
    }
    let groups = rig.store.enqueue_sizes();
    assert!(
        groups.len() <= 2,
        "50 callbacks at once took {} transactions",
        groups.len()
    );
    assert_eq!(
        groups.iter().sum::<usize>(),
        51,
        "distinct ids across the group: {groups:?}"
    );
    assert_eq!(rig.stats().accepted_callbacks, 50);
    assert_eq!(rig.stats().group_commits, groups.len() as u64);
}

#[tokio::test(start_paused = true)]
async fn last_seen_is_when_the_upstream_answered_and_expiry_follows_the_ttl() {
    let ttl = Duration::from_secs(30);
    let rig = Rig::new(PipelineConfig {
        ttl,
        ..PipelineConfig::default()
    });
    let accepted_at = rig.clock.now();
    rig.submit(&[4]).await.unwrap();
    sleep(LATENCY * 2).await;

    let row = rig.stored(4).await.expect("id 4 stored");
    assert_eq!(row.last_seen, accepted_at.saturating_add(LATENCY));
    assert_eq!(row.expires_at, row.last_seen.saturating_add(ttl));
}

#[tokio::test(start_paused = true)]
async fn a_callback_arriving_during_a_fetch_gets_a_fetch_that_starts_after_it() {
    let rig = Rig::new(PipelineConfig::default());
    rig.submit(&[2]).await.unwrap();
    sleep(LATENCY / 2).await;
    let second_accepted = Instant::now();
    rig.submit(&[2]).await.unwrap();
    sleep(LATENCY / 4).await;
    let third_accepted = Instant::now();
    rig.submit(&[2]).await.unwrap(); // shares the pending fetch with the second
    sleep(LATENCY * 3).await;

    let fetches = rig.source.fetches();
    assert_eq!(
        fetches.len(),
        2,
        "one in flight plus one pending: {fetches:?}"
    );
    assert!(fetches[1].started >= second_accepted);
    assert!(fetches[1].started >= third_accepted);
    assert_eq!(rig.store.inbox_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_id_is_shared_by_callbacks_accepted_before_its_fetch_starts() {
    let rig = Rig::new(PipelineConfig {
        max_in_flight: 1,
        ..PipelineConfig::default()
    });
    rig.submit(&[1]).await.unwrap();
    sleep(LATENCY / 2).await; // 1 is in flight, the only slot taken
    rig.submit(&[2]).await.unwrap();
    rig.submit(&[2]).await.unwrap();
    let last_accept = Instant::now();
    sleep(LATENCY * 3).await;

    let fetches = rig.source.fetches();
    let of_two: Vec<_> = fetches.iter().filter(|f| f.id == id(2)).collect();
    assert_eq!(of_two.len(), 1, "{fetches:?}");
    assert!(of_two[0].started >= last_accept);
}

#[tokio::test(start_paused = true)]
async fn fetches_in_flight_are_bounded() {
    let rig = Rig::new(PipelineConfig {
        max_in_flight: 4,
        ..PipelineConfig::default()
    });
    rig.submit(&(0..20).collect::<Vec<_>>()).await.unwrap();
    sleep(LATENCY * 10).await;

    assert_eq!(rig.source.max_in_flight(), 4);
    assert_eq!(rig.source.fetches().len(), 20);
    assert_eq!(rig.stats().stored, 10);
}

#[tokio::test(start_paused = true)]
async fn outcomes_are_written_in_batches() {
    let rig = Rig::new(PipelineConfig {
        max_batch: 30,
        ..PipelineConfig::default()
    });
    let even: Vec<i64> = (0..100).map(|i| i * 2).collect();
    rig.submit(&even).await.unwrap();
    sleep(LATENCY * 2).await;

    let batches = rig.store.batch_sizes();
    assert_eq!(batches.iter().sum::<usize>(), 100);
    assert!(batches.iter().all(|&n| n <= 30), "{batches:?}");
    assert!(
        batches.len() <= 5,
        "100 ids answered at once need few writes: {batches:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn outcomes_arriving_within_the_linger_share_one_transaction() {
    let linger = Duration::from_millis(50);
    let rig = Rig::new(PipelineConfig {
        store_linger: linger,
        ..PipelineConfig::default()
    });
    rig.submit(&[2]).await.unwrap();
    sleep(Duration::from_millis(20)).await;
    rig.submit(&[4]).await.unwrap();
    sleep(Duration::from_millis(100)).await;
    rig.submit(&[6]).await.unwrap();

    // 2 is answered at 1 s; at 1.025 s it still waits for company.
    sleep(LATENCY + linger / 2 - Duration::from_millis(120)).await;
    assert!(rig.stored(2).await.is_none(), "the first outcome lingers");
    sleep(LATENCY).await;
    assert_eq!(
        rig.store.batch_sizes(),
        vec![2, 1],
        "2 and 4 answered 20 ms apart share a write; 6, 100 ms later, has its own"
    );
    let stored = rig.stored(2).await.expect("stored after the linger");
    let later = stored.last_seen.saturating_add(Duration::from_millis(20));
    assert_eq!(
        rig.stored(4).await.unwrap().last_seen,
        later,
        "each keeps its own answer time"
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_linger_each_outcome_is_written_when_it_arrives() {
    let rig = Rig::new(PipelineConfig {
        store_linger: Duration::ZERO,
        ..PipelineConfig::default()
    });
    rig.submit(&[2]).await.unwrap();
    sleep(Duration::from_millis(20)).await;
    rig.submit(&[4]).await.unwrap();
    sleep(LATENCY).await;
    assert!(rig.stored(2).await.is_some(), "written at once");
    sleep(LATENCY).await;
    assert_eq!(rig.store.batch_sizes(), vec![1, 1]);
}

#[tokio::test(start_paused = true)]
async fn a_lingering_batch_never_holds_back_the_next_fetch() {
    let rig = Rig::new(PipelineConfig {
        max_in_flight: 1,
        store_linger: Duration::from_secs(10),
        ..PipelineConfig::default()
    });
    rig.submit(&[2, 4, 6]).await.unwrap();
    sleep(LATENCY * 3 + Duration::from_millis(10)).await;

    let fetches = rig.source.fetches();
    assert_eq!(fetches.len(), 3, "{fetches:?}");
    for pair in fetches.windows(2) {
        let gap = pair[1].started - pair[0].started;
        assert!(
            gap < LATENCY + Duration::from_millis(10),
            "a fetch frees its permit when it ends, not when its outcome is committed: {gap:?}"
        );
    }
    assert!(rig.store.batch_sizes().is_empty(), "still lingering");
    sleep(Duration::from_secs(10)).await;
    assert_eq!(
        rig.store.batch_sizes(),
        vec![3],
        "the three outcomes share one write"
    );
    assert_eq!(rig.store.inbox_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn settling_outcomes_costs_no_claim_unless_work_may_be_waiting() {
    let rig = Rig::new(PipelineConfig {
        max_in_flight: 8,
        store_linger: Duration::ZERO,
        poll_interval: Duration::from_secs(3600), // no claims but those asked for here
        ..PipelineConfig::default()
    });
    // Four ids answered at four different times: four settling transactions, one claim.
    for raw in [2, 4, 6, 8] {
        rig.submit(&[raw]).await.unwrap();
        sleep(Duration::from_millis(100)).await;
    }
    let claims_after_submits = rig.store.claim_calls();
    assert!(
        claims_after_submits <= 5,
        "one claim at start, one per commit: {claims_after_submits}"
    );
    sleep(LATENCY).await;
    assert_eq!(rig.store.batch_sizes().len(), 4);
    assert_eq!(
        rig.store.claim_calls(),
        claims_after_submits,
        "the settled batches did not wake the dispatcher"
    );

    // Twelve ids with eight permits: the freed permits claim the other four.
    let twelve: Vec<i64> = (10..22).map(|i| i * 2).collect();
    rig.submit(&twelve).await.unwrap();
    sleep(LATENCY * 3).await;
    assert_eq!(rig.source.fetches().len(), 16);
    assert_eq!(rig.store.inbox_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_permanent_failure_is_a_dead_letter_at_once_and_blocks_nothing() {
    let rig = Rig::new(PipelineConfig::default());
    rig.source.set_rule(|id| {
        if id.get() == 6 {
            Err(FetchError::Status(404))
        } else {
            Ok(id.get() % 2 == 0)
        }
    });
    let before = rig.clock.now();
    rig.submit(&[4, 6, 8]).await.unwrap();
    sleep(LATENCY * 2).await;

    assert!(rig.stored(4).await.is_some());
    assert!(rig.stored(8).await.is_some());
    assert!(rig.stored(6).await.is_none());
    let failures = rig.dead_letters().await;
    assert_eq!(failures.len(), 1);
    assert_eq!(
        (
            failures[0].id,
            failures[0].code.as_str(),
            failures[0].attempts
        ),
        (id(6), "status", 1)
    );
    assert!(failures[0].reason.contains("404"), "{}", failures[0].reason);
    assert!(failures[0].at > before);
    assert_eq!(rig.stats().failed, 1);
    assert_eq!(rig.stats().retries_scheduled, 0);
    assert_eq!(
        rig.source.fetches().len(),
        3,
        "no retry of a permanent error"
    );
    assert_eq!(rig.store.inbox_len(), 0, "a failure is an outcome too");
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
        Arc::new(crate::ports::NoTracePropagation),
        PipelineConfig::default(),
    );
    pipeline.handle().submit(ids(&[2])).await.unwrap();
    sleep(LATENCY).await;
    assert!(store.is_empty());
    let failures = dead_letters(&pipeline.handle()).await;
    assert_eq!(failures[0].code, "id_mismatch");
}

#[tokio::test(start_paused = true)]
async fn a_database_outage_while_completing_loses_nothing() {
    let rig = Rig::new(PipelineConfig::default());
    rig.submit(&[2, 4]).await.unwrap();
    sleep(LATENCY / 2).await;
    rig.store.set_unavailable(true);
    sleep(LATENCY * 3).await; // the outcomes wait and are retried
    assert_eq!(rig.store.inbox_len(), 2, "still waiting, not lost");
    rig.store.set_unavailable(false);
    sleep(Duration::from_secs(6)).await;

    assert!(rig.stored(2).await.is_some());
    assert!(rig.stored(4).await.is_some());
    assert_eq!(rig.store.inbox_len(), 0);
    assert_eq!(rig.source.fetches().len(), 2, "no refetch needed");
}

#[tokio::test(start_paused = true)]
async fn a_callback_the_inbox_cannot_record_is_refused() {
    let rig = Rig::new(PipelineConfig::default());
    rig.store.set_unavailable(true);
    let refused = rig.submit(&[2]).await;
    assert!(
        matches!(refused, Err(SubmitError::Unavailable(_))),
        "{refused:?}"
    );
    rig.store.set_unavailable(false);
    sleep(LATENCY * 2).await;
    assert!(
        rig.source.fetches().is_empty(),
        "nothing was accepted, nothing is fetched"
    );
    assert_eq!(rig.stats().accepted_callbacks, 0);
}

#[tokio::test(start_paused = true)]
async fn while_the_disk_is_full_callbacks_are_refused_and_health_names_the_writes() {
    let rig = Rig::new(PipelineConfig::default());
    let handle = rig.pipeline.handle();
    rig.submit(&[2]).await.unwrap();
    sleep(LATENCY / 2).await;
    rig.store.set_disk_full(true);
    assert!(handle.write_health().is_ok(), "no write has failed yet");

    let refused = rig.submit(&[4]).await;
    assert!(
        matches!(refused, Err(SubmitError::Unavailable(_))),
        "{refused:?}"
    );
    let failing = handle
        .write_health()
        .expect_err("the failed write is reported");
    assert!(failing.to_string().contains("disk is full"), "{failing}");
    sleep(LATENCY * 2).await; // 2's outcome cannot be recorded either: retried
    assert!(rig.stored(2).await.is_none());
    assert!(handle.write_health().is_err(), "still failing");

    rig.store.set_disk_full(false);
    sleep(Duration::from_secs(6)).await; // the completer's next retry succeeds
    assert!(
        rig.stored(2).await.is_some(),
        "recorded once the disk has room"
    );
    assert!(
        handle.write_health().is_ok(),
        "a successful write clears it"
    );
    rig.submit(&[4]).await.unwrap();
    sleep(LATENCY * 2).await;
    assert!(rig.stored(4).await.is_some());
    assert_eq!(rig.store.inbox_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_stops_being_reported_when_no_write_follows() {
    let rig = Rig::new(PipelineConfig::default());
    let handle = rig.pipeline.handle();
    rig.store.set_disk_full(true);
    assert!(rig.submit(&[2]).await.is_err());
    assert!(handle.write_health().is_err());
    sleep(WRITE_FAILURE_REPORTED_FOR - Duration::from_secs(1)).await;
    assert!(handle.write_health().is_err());
    sleep(Duration::from_secs(2)).await;
    assert!(
        handle.write_health().is_ok(),
        "nothing tried to write since: the service may be sent callbacks again"
    );
}

#[tokio::test(start_paused = true)]
async fn past_the_backlog_bound_callbacks_are_refused() {
    let rig = Rig::new(PipelineConfig {
        max_pending_ids: 5,
        ..PipelineConfig::default()
    });
    rig.submit(&[1, 2, 3]).await.unwrap();
    assert!(matches!(
        rig.submit(&[4, 5, 6]).await,
        Err(SubmitError::Overloaded {
            pending: 3,
            limit: 5
        })
    ));
    sleep(LATENCY * 2).await;
    rig.submit(&[4, 5, 6]).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn work_left_in_the_inbox_by_an_earlier_run_is_done_at_start() {
    let store = Arc::new(MemoryStore::new());
    let clock = PausedClock::new();
    store
        .enqueue(&untraced(&[10, 11, 12]), clock.now())
        .await
        .unwrap();
    let rig = Rig::on(store, PipelineConfig::default());
    sleep(LATENCY * 2).await;

    assert!(rig.stored(10).await.is_some());
    assert!(rig.stored(12).await.is_some());
    assert_eq!(rig.store.inbox_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_dead_instances_claims_are_taken_over_when_their_lease_runs_out() {
    let store = Arc::new(MemoryStore::new());
    let clock = PausedClock::new();
    let lease = Duration::from_secs(5);
    store
        .enqueue(&untraced(&[20, 22]), clock.now())
        .await
        .unwrap();
    // Another instance claimed both and died without finishing.
    let claimed = store
        .claim("dead", clock.now(), clock.now().saturating_add(lease), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let lease_runs_out = Instant::now() + lease;
    let rig = Rig::on(
        store,
        PipelineConfig {
            lease,
            owner: "alive".into(),
            ..PipelineConfig::default()
        },
    );
    sleep(lease + LATENCY * 3).await;

    let fetches = rig.source.fetches();
    assert_eq!(fetches.len(), 2);
    assert!(
        fetches.iter().all(|f| f.started >= lease_runs_out),
        "{fetches:?}"
    );
    assert!(rig.stored(20).await.is_some());
    assert_eq!(rig.store.inbox_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_the_fetches_in_flight_and_leaves_the_rest_in_the_inbox() {
    let rig = Rig::new(PipelineConfig {
        max_in_flight: 1,
        ..PipelineConfig::default()
    });
    rig.submit(&[2, 4, 6]).await.unwrap();
    let handle = rig.pipeline.handle();
    sleep(LATENCY / 2).await; // 2 is in flight
    let store = rig.store.clone();
    let left = rig.pipeline.shutdown(Duration::from_secs(10)).await;

    assert_eq!(left, 0, "the fetch in flight finished");
    assert_eq!(store.len(), 1, "only the fetch in flight was completed");
    assert_eq!(
        store.inbox_len(),
        2,
        "the rest waits, durable, for the next run"
    );
    assert!(
        store
            .claim(
                "next",
                Timestamp::from_unix_micros(i64::MAX - 1),
                Timestamp::from_unix_micros(i64::MAX),
                10
            )
            .await
            .unwrap()
            .len()
            == 2,
        "and nothing is left leased"
    );
    assert_eq!(
        handle.submit(ids(&[8])).await,
        Err(SubmitError::ShuttingDown)
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_bounded_and_hands_unfinished_claims_back() {
    let rig = Rig::new(PipelineConfig {
        max_in_flight: 2,
        ..PipelineConfig::default()
    });
    rig.submit(&[1, 2, 3, 4]).await.unwrap();
    sleep(LATENCY / 2).await;
    let store = rig.store.clone();
    let left = rig.pipeline.shutdown(LATENCY / 4).await;
    assert_eq!(left, 2, "two fetches were still in flight");
    assert_eq!(store.inbox_len(), 4);
    let now = Timestamp::from_unix_micros(0);
    let free = store.claim("next", now, now, 10).await.unwrap();
    assert_eq!(free.len(), 4, "their leases were released");
}

#[tokio::test(start_paused = true)]
async fn health_names_a_failing_upstream_until_it_answers_again() {
    let rig = Rig::new(PipelineConfig::default());
    rig.source
        .set_rule(|_| Err(FetchError::Unreachable("connection refused".into())));
    rig.submit(&[2]).await.unwrap();
    sleep(LATENCY * 2).await;
    let failing = rig.pipeline.handle().upstream_health();
    assert!(
        matches!(&failing, Err(cause) if cause.contains("connection refused")),
        "{failing:?}"
    );

    // The next answer clears it.
    rig.source.set_rule(|id| Ok(id.get() % 2 == 0));
    rig.submit(&[4]).await.unwrap();
    sleep(LATENCY * 2).await;
    assert_eq!(rig.pipeline.handle().upstream_health(), Ok(()));
    assert!(rig.stored(4).await.is_some());
}

#[tokio::test(start_paused = true)]
async fn concurrent_callbacks_cannot_overshoot_the_backlog_bound_together() {
    let rig = Rig::new(PipelineConfig {
        max_pending_ids: 5,
        ..PipelineConfig::default()
    });
    let handle = rig.pipeline.handle();
    // Ten callbacks of three fresh ids each, all admitted at the same instant.
    let outcomes = futures_util::future::join_all((0..10).map(|i| {
        let handle = handle.clone();
        async move { handle.submit(ids(&[i * 3, i * 3 + 1, i * 3 + 2])).await }
    }))
    .await;
    let accepted = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(accepted, 1, "3 + 3 > 5: one fits, {outcomes:?}");
    assert!(rig.stats().pending_ids <= 5);
    assert_eq!(rig.store.inbox_len(), 3);
}

#[tokio::test(start_paused = true)]
async fn requests_during_a_fetch_and_its_refetch_delay_share_one_more_fetch() {
    let rig = Rig::new(PipelineConfig {
        refetch_delay: Duration::from_millis(250),
        store_linger: Duration::ZERO, // the delay counts from the commit
        ..PipelineConfig::default()
    });
    let t0 = Instant::now();
    rig.submit(&[2]).await.unwrap();
    sleep(LATENCY / 2).await;
    rig.submit(&[2]).await.unwrap(); // during the first fetch
    sleep(LATENCY / 2 + Duration::from_millis(100)).await;
    rig.submit(&[2]).await.unwrap(); // after it, during the refetch delay
    sleep(LATENCY * 3).await;

    let fetches = rig.source.fetches();
    assert_eq!(fetches.len(), 2, "{fetches:?}");
    let gap = fetches[1].started - fetches[0].started;
    assert!(
        gap >= LATENCY + Duration::from_millis(250),
        "the second fetch waits out the delay after the first: {gap:?}"
    );
    assert!(
        gap < LATENCY + Duration::from_millis(300),
        "and no longer: {gap:?}"
    );
    assert!(fetches[0].started - t0 < Duration::from_millis(10));
    assert_eq!(rig.store.inbox_len(), 0);
    assert!(rig.stored(2).await.is_some());
}

/// A breaker that never opens, for the cases about the retry schedule itself.
const NO_BREAKER: BreakerConfig = BreakerConfig {
    failures: 0,
    cool_down: Duration::from_secs(5),
};

/// A source that is down (connection refused) while its switch is on.
fn outage(rig: &Rig) -> Arc<AtomicBool> {
    let down = Arc::new(AtomicBool::new(true));
    let switch = Arc::clone(&down);
    rig.source.set_rule(move |id| {
        if switch.load(Ordering::SeqCst) {
            Err(FetchError::Unreachable("connection refused".into()))
        } else {
            Ok(id.get() % 2 == 0)
        }
    });
    down
}

/// When each id's fetches started.
fn starts_by_id(source: &FakeSource) -> std::collections::BTreeMap<ObjectId, Vec<Instant>> {
    let mut starts = std::collections::BTreeMap::<ObjectId, Vec<Instant>>::new();
    for fetch in source.fetches() {
        starts.entry(fetch.id).or_default().push(fetch.started);
    }
    starts
}

#[tokio::test(start_paused = true)]
async fn an_upstream_down_for_three_hours_loses_nothing_and_is_retried_on_schedule() {
    let policy = RetryPolicy::default(); // first pause ≤ 1 s, doubling, capped at 5 min
    let config = PipelineConfig {
        retry: policy,
        ttl: Duration::from_secs(24 * 3600), // what is stored stays to be checked
        breaker: NO_BREAKER,                 // the schedule itself, every attempt made
        ..PipelineConfig::default()
    };
    // Everything but the pause itself that may pass between two attempts of an id: the
    // fetch, the completer's linger, and the dispatcher's poll.
    let slack = LATENCY + config.store_linger + config.poll_interval + Duration::from_millis(50);
    let rig = Rig::new(config);
    let down = outage(&rig);
    let all: Vec<i64> = (0..40).collect();
    rig.submit(&all).await.unwrap();
    sleep(Duration::from_secs(3 * 3600)).await;

    let stats = rig.stats();
    assert_eq!(stats.failed, 0, "no dead letter within the horizon");
    assert_eq!(rig.store.inbox_len(), 40, "every id still waits");
    assert!(stats.retries_scheduled > 40 * 30, "{stats:?}");
    let starts = starts_by_id(&rig.source);
    // The dispatcher finds due retries at the earliest one a batch scheduled, else at its
    // poll: pauses come in steps of the poll interval, spread over the ceiling.
    let mut pauses_after_eight = Vec::new();
    for (id, starts) in &starts {
        // Bounded: after a few doublings the pause averages half the cap.
        assert!(
            (40..=200).contains(&starts.len()),
            "id {id}: {} fetches",
            starts.len()
        );
        for (failed, pair) in (1u32..).zip(starts.windows(2)) {
            let gap = pair[1] - pair[0];
            assert!(
                gap <= policy.ceiling(failed) + slack,
                "id {id}: pause {gap:?} after {failed} failures exceeds {:?}",
                policy.ceiling(failed)
            );
        }
        pauses_after_eight.push(starts[8] - starts[7]);
        let (n, waited) = rig.store.attempts(*id).expect("still waiting");
        assert_eq!(
            n as usize,
            starts.len(),
            "each failed fetch counts one attempt"
        );
        assert!(waited.is_some_and(|cause| cause.contains("connection refused")));
    }
    pauses_after_eight.sort();
    let spread = pauses_after_eight[39] - pauses_after_eight[0];
    pauses_after_eight.dedup();
    assert!(
        pauses_after_eight.len() > 20,
        "jittered: {pauses_after_eight:?}"
    );
    assert!(
        spread > policy.ceiling(8) / 2,
        "spread over the ceiling: {spread:?}"
    );
    let longest = starts
        .values()
        .flat_map(|s| s.windows(2).map(|p| p[1] - p[0]))
        .max()
        .unwrap();
    assert!(
        longest > policy.max_delay / 2,
        "the pause grows to near the cap: {longest:?}"
    );
    assert_eq!(stats.retrying_ids, 40, "{stats:?}");
    assert!(
        stats.oldest_retrying_ms >= 3 * 3600 * 1000 - 2_000,
        "{stats:?}"
    );

    // Back up: every id settles within one capped pause.
    down.store(false, Ordering::SeqCst);
    sleep(policy.max_delay + slack).await;
    assert_eq!(rig.store.inbox_len(), 0);
    for raw in all {
        assert_eq!(rig.stored(raw).await.is_some(), raw % 2 == 0, "id {raw}");
    }
    assert_eq!(rig.dead_letters().await, []);
    assert_eq!(rig.stats().failed, 0);
}

#[tokio::test(start_paused = true)]
async fn past_the_horizon_an_id_is_a_dead_letter_with_its_last_cause_and_replay_stores_it() {
    let policy = RetryPolicy {
        first_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(60),
        horizon: Duration::from_secs(600),
    };
    let rig = Rig::new(PipelineConfig {
        retry: policy,
        breaker: NO_BREAKER, // each id's attempts on schedule up to the horizon
        ..PipelineConfig::default()
    });
    rig.source.set_rule(|_| Err(FetchError::Status(503)));
    let accepted = rig.clock.now();
    rig.submit(&[2, 3, 4]).await.unwrap();
    sleep(policy.horizon - Duration::from_secs(5)).await;
    assert_eq!(rig.dead_letters().await, [], "still within the horizon");
    sleep(Duration::from_secs(10)).await;

    let letters = rig.dead_letters().await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.code, "status");
        assert!(letter.reason.contains("503"), "{}", letter.reason);
        assert!(letter.at >= accepted.saturating_add(policy.horizon));
        let fetches = rig.source.fetch_counts()[&letter.id];
        assert_eq!(letter.attempts as usize, fetches, "every attempt counted");
        assert!(fetches > 5, "{fetches}");
    }
    assert_eq!(rig.store.inbox_len(), 0);
    assert_eq!(rig.stats().failed, 3);

    // The upstream is back; an operator replays the dead letters.
    rig.source.set_rule(|id| Ok(id.get() % 2 == 0));
    let handle = rig.pipeline.handle();
    assert_eq!(
        handle
            .replay_failures(&FailureFilter::default())
            .await
            .unwrap(),
        3
    );
    sleep(LATENCY * 3).await;
    assert!(rig.stored(2).await.is_some() && rig.stored(4).await.is_some());
    assert!(rig.stored(3).await.is_none(), "offline: nothing stored");
    assert_eq!(rig.store.inbox_len(), 0);
    assert_eq!(rig.dead_letters().await, []);
    assert_eq!(
        handle
            .replay_failures(&FailureFilter::default())
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn ids_waiting_for_a_retry_stay_pending_for_the_backlog_bound() {
    let rig = Rig::new(PipelineConfig {
        max_pending_ids: 5,
        ..PipelineConfig::default()
    });
    let _down = outage(&rig);
    rig.submit(&[1, 2, 3]).await.unwrap();
    sleep(LATENCY * 3).await;
    assert!(rig.stats().retries_scheduled >= 3);
    assert!(matches!(
        rig.submit(&[4, 5, 6]).await,
        Err(SubmitError::Overloaded { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn dead_letters_are_kept_until_their_retention_passes_then_purged() {
    let retention = Duration::from_secs(3600);
    let rig = Rig::new(PipelineConfig {
        failure_retention: retention,
        ..PipelineConfig::default()
    });
    rig.source.set_rule(|_| Err(FetchError::Status(404)));
    rig.submit(&[1]).await.unwrap(); // a dead letter at about 1 s
    sleep(Duration::from_secs(1000)).await;
    rig.submit(&[2]).await.unwrap(); // and one at about 1001 s
    sleep(retention - Duration::from_secs(1000)).await;
    assert_eq!(
        rig.dead_letters().await.len(),
        2,
        "none is past its retention yet"
    );
    // The sweep runs once a minute: within one more, the first is gone, the second stays.
    sleep(RETENTION_SWEEP_EVERY + LATENCY * 2).await;
    let kept = rig.dead_letters().await;
    assert_eq!(kept.iter().map(|l| l.id).collect::<Vec<_>>(), [id(2)]);
}

#[tokio::test(start_paused = true)]
async fn a_restarted_instance_takes_its_own_leases_back_at_once() {
    let store = Arc::new(MemoryStore::new());
    let clock = PausedClock::new();
    let lease = Duration::from_secs(30);
    store
        .enqueue(&untraced(&[20, 22]), clock.now())
        .await
        .unwrap();
    // This instance claimed both, then was killed.
    let claimed = store
        .claim("me", clock.now(), clock.now().saturating_add(lease), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let restarted = Instant::now();
    let rig = Rig::on(
        store,
        PipelineConfig {
            lease,
            owner: "me".into(),
            ..PipelineConfig::default()
        },
    );
    sleep(LATENCY * 3).await;
    let fetches = rig.source.fetches();
    assert_eq!(fetches.len(), 2);
    assert!(
        fetches.iter().all(|f| f.started < restarted + LATENCY),
        "{fetches:?}"
    );
    assert!(rig.stored(20).await.is_some());
    assert_eq!(rig.store.inbox_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failing_upstream_opens_the_breaker_which_probes_once_per_cool_down() {
    let breaker = BreakerConfig {
        failures: 5,
        cool_down: Duration::from_secs(5),
    };
    let rig = Rig::new(PipelineConfig {
        breaker,
        ttl: Duration::from_secs(3600),
        ..PipelineConfig::default()
    });
    let handle = rig.pipeline.handle();
    let down = outage(&rig);
    let all: Vec<i64> = (0..100).collect();
    rig.submit(&all).await.unwrap();
    sleep(LATENCY * 2).await;
    assert_eq!(
        rig.source.fetches().len(),
        100,
        "the first wave, all at once"
    );
    assert_eq!(handle.breaker().state, crate::BreakerState::Open);

    let outage_for = Duration::from_secs(600);
    sleep(outage_for).await;
    rig.submit(&[1_000, 1_002])
        .await
        .expect("callbacks are accepted while the breaker is open");
    // One probe per cool-down (plus the probe's own answer time), however many ids wait.
    let fetched = rig.source.fetches().len();
    let probes = fetched - 100;
    let most = (outage_for.as_secs() / breaker.cool_down.as_secs()) as usize + 1;
    let fewest = (outage_for.as_secs() / (breaker.cool_down + LATENCY).as_secs()) as usize - 1;
    assert!(
        (fewest..=most).contains(&probes),
        "{probes} probes in {outage_for:?}, expected {fewest}..={most}"
    );
    let status = handle.breaker();
    assert_ne!(status.state, crate::BreakerState::Closed, "{status:?}");
    assert!(
        status.consecutive_failures as usize >= fetched,
        "{status:?}"
    );
    assert_eq!(
        rig.stats().failed,
        0,
        "nothing is given up within the horizon"
    );
    assert_eq!(rig.store.inbox_len(), 102);

    // Back up: the next probe closes the breaker, and every id settles at its own next
    // attempt (the probes moved some ids along their schedule, at most to its cap).
    let most_attempts = all
        .iter()
        .filter_map(|&raw| rig.store.attempts(id(raw)).map(|(n, _)| n))
        .max()
        .unwrap();
    let longest_pause = RetryPolicy::default().ceiling(most_attempts);
    down.store(false, Ordering::SeqCst);
    sleep(breaker.cool_down + LATENCY * 2).await;
    assert_eq!(handle.breaker().state, crate::BreakerState::Closed);
    sleep(longest_pause + LATENCY * 3).await;
    assert_eq!(handle.breaker().consecutive_failures, 0);
    assert_eq!(rig.store.inbox_len(), 0);
    for raw in all.iter().chain(&[1_000, 1_002]) {
        assert_eq!(rig.stored(*raw).await.is_some(), raw % 2 == 0, "id {raw}");
    }
    assert_eq!(rig.dead_letters().await, []);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_keeps_the_breaker_open_and_a_permanent_error_counts_as_an_answer() {
    let breaker = BreakerConfig {
        failures: 3,
        cool_down: Duration::from_secs(10),
    };
    let rig = Rig::new(PipelineConfig {
        breaker,
        ..PipelineConfig::default()
    });
    let handle = rig.pipeline.handle();
    let _down = outage(&rig);
    rig.submit(&[1, 2, 3]).await.unwrap();
    sleep(LATENCY * 2).await;
    assert_eq!(handle.breaker().state, crate::BreakerState::Open);
    let probe_in = handle.breaker().probe_in.expect("open: a probe is due");
    assert!(probe_in <= breaker.cool_down, "{probe_in:?}");
    // The probe fails: open again for a whole cool-down, one fetch spent.
    sleep(probe_in + LATENCY + Duration::from_millis(10)).await;
    assert_eq!(rig.source.fetches().len(), 4);
    assert_eq!(handle.breaker().state, crate::BreakerState::Open);

    // An upstream that answers 404 is reachable: the probe closes the breaker.
    rig.source.set_rule(|_| Err(FetchError::Status(404)));
    sleep(breaker.cool_down + LATENCY * 4).await;
    assert_eq!(handle.breaker().state, crate::BreakerState::Closed);
    assert_eq!(rig.dead_letters().await.len(), 3, "permanent errors");
}

#[tokio::test(start_paused = true)]
async fn a_fetch_longer_than_the_lease_keeps_its_claim_through_the_heartbeat() {
    let lease = Duration::from_millis(300); // a third of one fetch
    let rig = Rig::new(PipelineConfig {
        lease,
        owner: "alive".into(),
        ..PipelineConfig::default()
    });
    rig.submit(&[8]).await.unwrap();
    sleep(lease * 2).await; // the fetch runs on, past its first lease
    let taken = rig
        .store
        .claim(
            "other",
            rig.clock.now(),
            rig.clock.now().saturating_add(lease),
            10,
        )
        .await
        .unwrap();
    assert_eq!(taken, [], "the heartbeat renewed the lease");
    sleep(LATENCY).await;
    assert_eq!(rig.source.fetches().len(), 1, "fetched once");
    assert!(rig.stored(8).await.is_some());
    assert_eq!(rig.store.inbox_len(), 0);
}
