//! Whether this instance can take callbacks now (`GET /readyz`), as opposed to whether the
//! process lives (`GET /livez`, which needs nothing from here).
//!
//! A probe must answer at once, even while the database hangs, so the database's part is
//! not asked per probe: [`ReadinessMonitor::run`] pings it every poll interval (bounded by
//! a timeout) and keeps the last answer; a probe combines that with what is known without
//! I/O (shutting down, the backlog against its bound, failing inbox writes). Every change
//! is logged once and kept in the gauge `service_ready`.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pipeline::PipelineHandle;
use crate::ports::{ObjectStore, StoreError};

/// Why the instance is not ready, in the order the checks run; the first that fails is
/// the one reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// A shutdown has begun: load balancers should stop sending before the listener closes.
    #[error("shutting down")]
    ShuttingDown,
    /// The database did not answer its latest ping, or inbox writes are failing.
    #[error("{0}")]
    Database(StoreError),
    /// No ping has finished yet since the start.
    #[error("database: not checked yet")]
    NotCheckedYet,
    /// The backlog has reached `pipeline.max_pending_ids`: callbacks are refused with 503.
    #[error("backlog full: {pending} ids pending, bound {limit}")]
    BacklogFull {
        /// Distinct ids waiting or being fetched.
        pending: u64,
        /// `pipeline.max_pending_ids`.
        limit: u64,
    },
}

impl NotReady {
    /// The component at fault, as `GET /readyz` names it.
    pub fn component(&self) -> &'static str {
        match self {
            NotReady::ShuttingDown => "shutdown",
            NotReady::Database(_) | NotReady::NotCheckedYet => "database",
            NotReady::BacklogFull { .. } => "backlog",
        }
    }
}

/// The state every probe reads; shared by the [`Application`](crate::Application)'s
/// clones and the monitor.
#[derive(Debug, Default)]
pub(crate) struct ReadinessState {
    shutting_down: AtomicBool,
    /// The latest ping's outcome; `None` before the first.
    database: Mutex<Option<Result<(), StoreError>>>,
    /// What the gauge and the log last said: `Some(true)` ready.
    reported: Mutex<Option<bool>>,
}

impl ReadinessState {
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Combines the kept ping with what needs no I/O; records a change.
    pub(crate) fn check(&self, pipeline: &PipelineHandle) -> Result<(), NotReady> {
        let verdict = self.evaluate(pipeline);
        self.report(&verdict);
        verdict
    }

    fn evaluate(&self, pipeline: &PipelineHandle) -> Result<(), NotReady> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(NotReady::ShuttingDown);
        }
        match &*lock(&self.database) {
            None => return Err(NotReady::NotCheckedYet),
            Some(Err(err)) => return Err(NotReady::Database(err.clone())),
            Some(Ok(())) => {}
        }
        pipeline.write_health().map_err(NotReady::Database)?;
        let pending = pipeline.stats().pending_ids;
        let limit = pipeline.max_pending_ids() as u64;
        if pending >= limit {
            return Err(NotReady::BacklogFull { pending, limit });
        }
        Ok(())
    }

    fn report(&self, verdict: &Result<(), NotReady>) {
        let ready = verdict.is_ok();
        let mut reported = lock(&self.reported);
        if *reported == Some(ready) {
            return;
        }
        match verdict {
            Ok(()) => tracing::info!("ready: callbacks are accepted"),
            // Shutting down is said by the shutdown itself.
            Err(NotReady::ShuttingDown) => {}
            // The start, before the first ping: not a fault.
            Err(NotReady::NotCheckedYet) => {}
            Err(cause) => tracing::warn!(
                component = cause.component(),
                cause = %cause,
                "not ready: GET /readyz answers 503 until this clears"
            ),
        }
        crate::metrics::readiness(ready);
        *reported = Some(ready);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data is a plain value, whole after any panic.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Pings the database on a schedule for the probes; made by
/// [`Application::readiness_monitor`](crate::Application::readiness_monitor).
#[derive(Debug)]
pub struct ReadinessMonitor {
    pub(crate) state: Arc<ReadinessState>,
    pub(crate) pipeline: PipelineHandle,
    pub(crate) store: Arc<dyn ObjectStore>,
}

impl ReadinessMonitor {
    /// Pings every `every` (the first at once), each ping bounded by `timeout`, until
    /// `shutdown`.
    pub async fn run(self, every: Duration, timeout: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let answer = match tokio::time::timeout(timeout, self.store.ping()).await {
                Ok(answer) => answer,
                Err(_elapsed) => Err(StoreError::Unavailable(format!(
                    "no answer to a ping within {timeout:?}"
                ))),
            };
            *lock(&self.state.database) = Some(answer);
            // The verdict is recorded (gauge, log) by the check itself.
            self.state.check(&self.pipeline).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::sleep;

    use super::*;
    use crate::testing::{FakeSource, MemoryStore, PausedClock};
    use crate::{Application, ExpiryWaker, ObjectId, Pipeline, PipelineConfig};

    const EVERY: Duration = Duration::from_secs(1);
    const LATENCY: Duration = Duration::from_secs(3);

    struct Rig {
        store: Arc<MemoryStore>,
        app: Application,
        _pipeline: Pipeline,
        stop: CancellationToken,
    }

    impl Rig {
        fn start(max_pending_ids: usize) -> Self {
            let store = Arc::new(MemoryStore::new());
            let clock = Arc::new(PausedClock::new());
            let pipeline = Pipeline::start(
                Arc::new(FakeSource::new(LATENCY)),
                store.clone(),
                clock.clone(),
                ExpiryWaker::new(),
                Arc::new(crate::ports::NoTracePropagation),
                PipelineConfig {
                    max_pending_ids,
                    ..PipelineConfig::default()
                },
            );
            let app = Application::new(pipeline.handle(), store.clone(), clock);
            let stop = CancellationToken::new();
            tokio::spawn(
                app.readiness_monitor()
                    .run(EVERY, EVERY / 2, stop.child_token()),
            );
            Self {
                store,
                app,
                _pipeline: pipeline,
                stop,
            }
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    fn ids(raw: &[i64]) -> crate::DistinctIds {
        raw.iter().map(|&v| ObjectId::new(v).unwrap()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn ready_once_the_first_ping_answers_and_not_while_the_database_is_away() {
        let rig = Rig::start(100);
        // Before the monitor's first ping nothing is known: not ready.
        assert_eq!(rig.app.readiness(), Err(NotReady::NotCheckedYet));
        sleep(EVERY / 10).await;
        assert_eq!(rig.app.readiness(), Ok(()));

        rig.store.set_unavailable(true);
        // Until the next ping the last answer stands: a probe never waits for one.
        assert_eq!(rig.app.readiness(), Ok(()));
        sleep(EVERY).await;
        let cause = rig.app.readiness().unwrap_err();
        assert!(matches!(cause, NotReady::Database(_)), "{cause:?}");
        assert_eq!(cause.component(), "database");

        rig.store.set_unavailable(false);
        sleep(EVERY).await;
        assert_eq!(rig.app.readiness(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn failing_inbox_writes_make_it_unready_though_pings_answer() {
        let rig = Rig::start(100);
        sleep(EVERY / 10).await;
        rig.store.set_disk_full(true);
        assert!(rig.app.accept_callback(ids(&[1])).await.is_err());
        let cause = rig.app.readiness().unwrap_err();
        assert_eq!(cause.component(), "database", "{cause}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_backlog_makes_it_unready_until_the_fetches_drain_it() {
        let rig = Rig::start(3);
        sleep(EVERY / 10).await;
        rig.app.accept_callback(ids(&[1, 2])).await.unwrap();
        assert_eq!(rig.app.readiness(), Ok(()), "2 of 3 pending: still room");
        rig.app.accept_callback(ids(&[3])).await.unwrap();
        assert_eq!(
            rig.app.readiness(),
            Err(NotReady::BacklogFull {
                pending: 3,
                limit: 3
            })
        );
        assert_eq!(rig.app.readiness().unwrap_err().component(), "backlog");
        sleep(LATENCY * 2).await;
        assert_eq!(rig.app.readiness(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_makes_it_unready_for_good_while_everything_else_is_fine() {
        let rig = Rig::start(100);
        sleep(EVERY / 10).await;
        assert_eq!(rig.app.readiness(), Ok(()));
        rig.app.begin_shutdown();
        assert_eq!(rig.app.readiness(), Err(NotReady::ShuttingDown));
        sleep(EVERY * 3).await;
        assert_eq!(rig.app.readiness(), Err(NotReady::ShuttingDown));
        // Callbacks are still taken meanwhile: the listener has not closed yet.
        rig.app.accept_callback(ids(&[7])).await.unwrap();
    }
}
