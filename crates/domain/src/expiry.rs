//! Expiry: deletes each stored object when `last_seen + ttl` has passed.
//!
//! The sweeper is driven by the store, not by in-memory timers: it asks the store for the
//! earliest `expires_at`, sleeps until then, and deletes what is due in bounded batches.
//! Writers wake it early through [`ExpiryWaker`] when they store an earlier deadline, so
//! deletion follows the deadline within milliseconds, and rows left by a previous run are
//! deleted at start.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::ports::{Clock, ObjectStore};
use crate::time::Timestamp;

/// Wakes the sweeper when a write brings a deadline earlier than the one it waits for.
#[derive(Debug, Clone)]
pub struct ExpiryWaker {
    earliest: Arc<watch::Sender<Option<Timestamp>>>,
}

impl ExpiryWaker {
    /// A waker with no sweeper listening yet.
    pub fn new() -> Self {
        Self {
            earliest: Arc::new(watch::Sender::new(None)),
        }
    }

    /// Tells the sweeper that a row now expires at `at`.
    pub fn offer(&self, at: Timestamp) {
        self.earliest.send_if_modified(|earliest| match earliest {
            Some(current) if *current <= at => false,
            _ => {
                *earliest = Some(at);
                true
            }
        });
    }
}

impl Default for ExpiryWaker {
    fn default() -> Self {
        Self::new()
    }
}

/// How the sweeper behaves.
#[derive(Debug, Clone)]
pub struct ExpiryConfig {
    /// How many rows one delete statement may remove.
    pub batch_limit: usize,
    /// The first pause after a store error; it doubles up to `max_retry_pause`.
    pub retry_base: Duration,
    /// The longest pause after store errors.
    pub max_retry_pause: Duration,
}

impl Default for ExpiryConfig {
    fn default() -> Self {
        Self {
            batch_limit: 10_000,
            retry_base: Duration::from_millis(100),
            max_retry_pause: Duration::from_secs(5),
        }
    }
}

/// The expiry loop.
#[derive(Debug)]
pub struct Sweeper {
    store: Arc<dyn ObjectStore>,
    clock: Arc<dyn Clock>,
    waker: ExpiryWaker,
    config: ExpiryConfig,
}

impl Sweeper {
    /// A sweeper over `store`, woken early by `waker`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        clock: Arc<dyn Clock>,
        waker: ExpiryWaker,
        config: ExpiryConfig,
    ) -> Self {
        Self {
            store,
            clock,
            waker,
            config,
        }
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut wakes = self.waker.earliest.subscribe();
        let mut pause = self.config.retry_base;
        loop {
            // Forget the hint before reading the store: a write that lands from here on
            // offers its deadline again and wakes us.
            self.waker.earliest.send_if_modified(|earliest| {
                *earliest = None;
                false
            });
            let next = match self.store.next_expiry().await {
                Ok(next) => next,
                Err(err) => {
                    metrics::store_error("next_expiry");
                    tracing::warn!(error = %err, retry_in = ?pause, "expiry: cannot read the next deadline");
                    if sleep_or_cancel(pause, &shutdown).await {
                        return;
                    }
                    pause = (pause * 2).min(self.config.max_retry_pause);
                    continue;
                }
            };
            self.waker.earliest.send_if_modified(|earliest| {
                *earliest = match (*earliest, next) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                false
            });
            let deadline = *wakes.borrow_and_update();
            let now = self.clock.now();
            match deadline {
                Some(deadline) if deadline <= now => match self.delete_due(now).await {
                    Ok(deleted) => {
                        pause = self.config.retry_base;
                        if deleted > 0 {
                            let late = now.saturating_duration_since(deadline);
                            ::metrics::histogram!(metrics::EXPIRY_LATENESS)
                                .record(metrics::seconds(late));
                        }
                    }
                    Err(err) => {
                        metrics::store_error("delete_expired");
                        tracing::warn!(error = %err, retry_in = ?pause, "expiry: delete failed");
                        if sleep_or_cancel(pause, &shutdown).await {
                            return;
                        }
                        pause = (pause * 2).min(self.config.max_retry_pause);
                    }
                },
                Some(deadline) => {
                    pause = self.config.retry_base;
                    let wait = deadline.saturating_duration_since(now);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        changed = wakes.changed() => if changed.is_err() { return },
                        () = shutdown.cancelled() => return,
                    }
                }
                None => {
                    pause = self.config.retry_base;
                    tokio::select! {
                        changed = wakes.changed() => if changed.is_err() { return },
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Deletes every row due at `cutoff`, in batches; returns how many were deleted.
    async fn delete_due(&self, cutoff: Timestamp) -> Result<u64, crate::ports::StoreError> {
        let limit = self.config.batch_limit.max(1);
        let mut total = 0u64;
        loop {
            let deleted = self.store.delete_expired(cutoff, limit).await?;
            ::metrics::counter!(metrics::EXPIRED_ROWS_DELETED).increment(deleted);
            total += deleted;
            if deleted < limit as u64 {
                break;
            }
        }
        if total > 0 {
            tracing::debug!(deleted = total, "expired objects deleted");
        }
        Ok(total)
    }
}

/// Sleeps for `pause`; returns true when `shutdown` came first.
async fn sleep_or_cancel(pause: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(pause) => false,
        () = shutdown.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ObjectId;
    use crate::ports::StoredObject;
    use crate::testing::{MemoryStore, PausedClock};

    fn object(id: i64, last_seen: Timestamp, ttl: Duration) -> StoredObject {
        StoredObject {
            id: ObjectId::new(id).unwrap(),
            last_seen,
            expires_at: last_seen.saturating_add(ttl),
        }
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deletes_at_the_deadline_not_before() {
        let clock = Arc::new(PausedClock::new());
        let store = Arc::new(MemoryStore::new());
        let ttl = Duration::from_secs(30);
        store
            .upsert_seen(&[object(1, clock.now(), ttl)])
            .await
            .unwrap();
        let waker = ExpiryWaker::new();
        let shutdown = CancellationToken::new();
        let sweeper = Sweeper::new(store.clone(), clock.clone(), waker, ExpiryConfig::default());
        let task = tokio::spawn(sweeper.run(shutdown.clone()));
        settle().await;

        tokio::time::advance(ttl - Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(store.len(), 1, "row deleted before its deadline");

        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(store.len(), 0, "row not deleted at its deadline");

        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn rows_already_expired_at_start_are_deleted_at_once() {
        let clock = Arc::new(PausedClock::new());
        let store = Arc::new(MemoryStore::new());
        let long_ago = Timestamp::from_unix_micros(clock.now().as_unix_micros() - 60_000_000);
        let rows: Vec<_> = (0..25)
            .map(|i| object(i, long_ago, Duration::from_secs(30)))
            .collect();
        store.upsert_seen(&rows).await.unwrap();
        let shutdown = CancellationToken::new();
        let config = ExpiryConfig {
            batch_limit: 10,
            ..ExpiryConfig::default()
        };
        let task = tokio::spawn(
            Sweeper::new(store.clone(), clock.clone(), ExpiryWaker::new(), config)
                .run(shutdown.clone()),
        );
        settle().await;
        assert_eq!(store.len(), 0);
        assert_eq!(store.delete_calls(), 3, "25 rows in batches of 10");
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_written_later_wakes_the_sweeper() {
        let clock = Arc::new(PausedClock::new());
        let store = Arc::new(MemoryStore::new());
        store
            .upsert_seen(&[object(1, clock.now(), Duration::from_secs(60))])
            .await
            .unwrap();
        let waker = ExpiryWaker::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(
            Sweeper::new(
                store.clone(),
                clock.clone(),
                waker.clone(),
                ExpiryConfig::default(),
            )
            .run(shutdown.clone()),
        );
        settle().await;

        // The sweeper now sleeps for 60 s; a row due in 1 s must not wait for that.
        let early = object(2, clock.now(), Duration::from_secs(1));
        store.upsert_seen(&[early]).await.unwrap();
        waker.offer(early.expires_at);
        settle().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert!(store.get(early.id, clock.now()).await.unwrap().is_none());
        assert_eq!(store.len(), 1, "only the early row is gone");

        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_outage_is_retried_and_recovered_from() {
        let clock = Arc::new(PausedClock::new());
        let store = Arc::new(MemoryStore::new());
        store
            .upsert_seen(&[object(1, clock.now(), Duration::from_secs(1))])
            .await
            .unwrap();
        store.set_unavailable(true);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(
            Sweeper::new(
                store.clone(),
                clock.clone(),
                ExpiryWaker::new(),
                ExpiryConfig::default(),
            )
            .run(shutdown.clone()),
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        settle().await;
        store.set_unavailable(false);
        assert_eq!(store.len(), 1);
        tokio::time::advance(Duration::from_secs(6)).await;
        settle().await;
        assert_eq!(store.len(), 0, "the sweeper did not recover");
        shutdown.cancel();
        task.await.unwrap();
    }
}
