//! The circuit breaker that protects the upstream while it is down.
//!
//! Every finished fetch reports whether the upstream answered ([`Breaker::record`]). After
//! `failures` transient failures in a row (unreachable, timed out, 5xx, 429, each after the
//! upstream client's own short retries) the breaker **opens**: the dispatcher claims
//! nothing for `cool_down`, and the ids stay in the inbox, accepted callbacks keep
//! arriving. Then it goes **half-open**: the dispatcher claims one id and fetches it as a
//! probe. The probe's answer closes the breaker; another transient failure opens it for
//! the next cool-down. Any answer of the upstream (online, offline, even a 404) counts as
//! one: only an upstream that does not answer properly is kept away from.
//!
//! While it is open the upstream sees the fetches already in flight when it opened and
//! one probe per cool-down, each with the client's retries, however long the outage.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics;

/// When the breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Transient fetch failures in a row that open the breaker; `0` never opens it.
    pub failures: u32,
    /// How long an open breaker claims nothing before it probes with one fetch.
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 10,
            cool_down: Duration::from_secs(5),
        }
    }
}

/// The breaker's state, as reported in health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Fetching as usual.
    Closed,
    /// Claiming nothing until the cool-down ends.
    Open,
    /// One probe fetch is running (or about to); nothing else is claimed until it ends.
    HalfOpen,
}

impl BreakerState {
    /// The name used in health answers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The value of the state gauge: 0 closed, 1 open, 2 half-open.
    fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
        }
    }
}

/// The breaker as a health check reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerStatus {
    /// Where it stands.
    pub state: BreakerState,
    /// Transient failures in a row so far.
    pub consecutive_failures: u32,
    /// While open: how long until the probe.
    pub probe_in: Option<Duration>,
}

/// How many ids the dispatcher may claim now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// As many as there are permits.
    All,
    /// One, as the probe; report [`Breaker::probe_unused`] if none is claimed.
    Probe,
    /// None; look again at `until` (`None`: when the probe ends).
    Nothing { until: Option<Instant> },
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive: u32,
}

/// The breaker; shared by the dispatcher (which asks) and the fetches (which report).
#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    /// Closed with no failure counted: an answer then changes nothing, and is noted
    /// without taking the lock (the hot path of a healthy upstream).
    quiet: AtomicBool,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        ::metrics::gauge!(metrics::UPSTREAM_BREAKER_STATE).set(BreakerState::Closed.gauge());
        Self {
            config,
            quiet: AtomicBool::new(true),
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many ids may be claimed at `now`; an open breaker whose cool-down has ended
    /// turns half-open and admits its probe.
    pub(crate) fn admit(&self, now: Instant) -> Admit {
        let mut inner = self.lock();
        match inner.state {
            State::Closed => Admit::All,
            State::Open { until } if now >= until => {
                transition(
                    &mut inner,
                    State::HalfOpen,
                    "probing the upstream with one fetch",
                );
                Admit::Probe
            }
            State::Open { until } => Admit::Nothing { until: Some(until) },
            State::HalfOpen => Admit::Nothing { until: None },
        }
    }

    /// The probe admitted was not started (nothing was waiting, or the claim failed): the
    /// next claim probes instead.
    pub(crate) fn probe_unused(&self, now: Instant) {
        let mut inner = self.lock();
        if matches!(inner.state, State::HalfOpen) {
            inner.state = State::Open { until: now };
        }
    }

    /// Notes how one fetch ended at `now`: `true` if the upstream answered, `false` on a
    /// transient failure. Returns whether the breaker closed, so the dispatcher can be
    /// woken to claim again.
    pub(crate) fn record(&self, answered: bool, now: Instant) -> bool {
        if answered && self.quiet.load(Ordering::Acquire) {
            return false;
        }
        let mut inner = self.lock();
        if answered {
            inner.consecutive = 0;
            self.quiet.store(true, Ordering::Release);
            if matches!(inner.state, State::Closed) {
                return false;
            }
            transition(
                &mut inner,
                State::Closed,
                "the upstream answers again; fetching resumes",
            );
            return true;
        }
        self.quiet.store(false, Ordering::Release);
        inner.consecutive = inner.consecutive.saturating_add(1);
        let opens = match inner.state {
            State::Closed => self.config.failures > 0 && inner.consecutive >= self.config.failures,
            State::HalfOpen => true,
            State::Open { .. } => false,
        };
        if opens {
            let until = now + self.config.cool_down;
            let why = if matches!(inner.state, State::HalfOpen) {
                "the probe failed; the upstream is left alone for another cool-down"
            } else {
                "the upstream keeps failing; fetching pauses for a cool-down"
            };
            transition(&mut inner, State::Open { until }, why);
        }
        false
    }

    /// Where the breaker stands at `now`.
    pub(crate) fn status(&self, now: Instant) -> BreakerStatus {
        let inner = self.lock();
        let (state, probe_in) = match inner.state {
            State::Closed => (BreakerState::Closed, None),
            State::Open { until } => (
                BreakerState::Open,
                Some(until.saturating_duration_since(now)),
            ),
            State::HalfOpen => (BreakerState::HalfOpen, None),
        };
        BreakerStatus {
            state,
            consecutive_failures: inner.consecutive,
            probe_in,
        }
    }

    #[cfg(test)]
    pub(crate) fn config(&self) -> BreakerConfig {
        self.config
    }
}

fn public(state: State) -> BreakerState {
    match state {
        State::Closed => BreakerState::Closed,
        State::Open { .. } => BreakerState::Open,
        State::HalfOpen => BreakerState::HalfOpen,
    }
}

/// Moves to `to`, counting and logging the change once (a cold path: at most a few times
/// per cool-down).
fn transition(inner: &mut Inner, to: State, why: &'static str) {
    let from = public(inner.state);
    inner.state = to;
    let to = public(to);
    ::metrics::gauge!(metrics::UPSTREAM_BREAKER_STATE).set(to.gauge());
    ::metrics::counter!(metrics::UPSTREAM_BREAKER_TRANSITIONS, "to" => to.as_str()).increment(1);
    match to {
        BreakerState::Open => tracing::warn!(
            from = from.as_str(),
            to = to.as_str(),
            consecutive_failures = inner.consecutive,
            "upstream circuit breaker: {why}"
        ),
        _ => tracing::info!(
            from = from.as_str(),
            to = to.as_str(),
            "upstream circuit breaker: {why}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            failures,
            cool_down: Duration::from_secs(5),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_configured_failures_in_a_row_and_not_before() {
        let b = breaker(3);
        let t0 = Instant::now();
        assert!(!b.record(false, t0));
        assert!(!b.record(false, t0));
        assert_eq!(b.admit(t0), Admit::All, "two failures do not open it");
        assert!(
            !b.record(true, t0),
            "an answer while closed changes nothing"
        );
        assert!(!b.record(false, t0));
        assert!(!b.record(false, t0));
        assert_eq!(b.admit(t0), Admit::All, "the answer reset the count");
        b.record(false, t0);
        let until = t0 + b.config().cool_down;
        assert_eq!(b.admit(t0), Admit::Nothing { until: Some(until) });
        let status = b.status(t0 + Duration::from_secs(2));
        assert_eq!(status.state, BreakerState::Open);
        assert_eq!(status.consecutive_failures, 3);
        assert_eq!(status.probe_in, Some(Duration::from_secs(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn probes_once_after_the_cool_down_and_closes_on_an_answer() {
        let b = breaker(1);
        let t0 = Instant::now();
        b.record(false, t0);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(b.admit(later), Admit::Probe);
        assert_eq!(
            b.admit(later),
            Admit::Nothing { until: None },
            "one probe at a time"
        );
        assert_eq!(b.status(later).state, BreakerState::HalfOpen);
        assert!(b.record(true, later), "the probe's answer closes it");
        assert_eq!(b.admit(later), Admit::All);
        assert_eq!(b.status(later).consecutive_failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_for_another_cool_down() {
        let b = breaker(4);
        let t0 = Instant::now();
        for _ in 0..4 {
            b.record(false, t0);
        }
        let probe_at = t0 + Duration::from_secs(5);
        assert_eq!(b.admit(probe_at), Admit::Probe);
        b.record(false, probe_at);
        assert_eq!(
            b.admit(probe_at),
            Admit::Nothing {
                until: Some(probe_at + Duration::from_secs(5))
            }
        );
        assert_eq!(b.status(probe_at).consecutive_failures, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_probe_is_offered_again_at_once() {
        let b = breaker(1);
        let t0 = Instant::now();
        b.record(false, t0);
        let later = t0 + Duration::from_secs(6);
        assert_eq!(b.admit(later), Admit::Probe);
        b.probe_unused(later);
        assert_eq!(b.status(later).state, BreakerState::Open);
        assert_eq!(b.admit(later), Admit::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_while_open_closes_it_and_failures_while_open_do_not_extend_it() {
        let b = breaker(2);
        let t0 = Instant::now();
        b.record(false, t0);
        b.record(false, t0);
        b.record(false, t0 + Duration::from_secs(4));
        assert_eq!(
            b.admit(t0 + Duration::from_secs(4)),
            Admit::Nothing {
                until: Some(t0 + Duration::from_secs(5))
            },
            "a straggler's failure does not push the probe back"
        );
        assert!(b.record(true, t0 + Duration::from_secs(4)));
        assert_eq!(b.admit(t0 + Duration::from_secs(4)), Admit::All);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_failures_never_opens() {
        let b = breaker(0);
        let t0 = Instant::now();
        for _ in 0..1_000 {
            b.record(false, t0);
        }
        assert_eq!(b.admit(t0), Admit::All);
        assert_eq!(b.status(t0).state, BreakerState::Closed);
    }
}
