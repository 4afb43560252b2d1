//! The pipeline's and the sweeper's Prometheus series, recorded through the `metrics`
//! facade (no exporter here: the binary installs one).
//!
//! The names live here, next to [`describe`]; the hot path records through handles
//! registered once at start ([`PipelineMetrics`]), so a fetch costs a few atomic
//! operations and no allocation.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge};
use metrics::{describe_histogram, gauge, histogram};

/// Callbacks committed to the inbox.
pub const CALLBACKS_ACCEPTED: &str = "callbacks_accepted_total";
/// Distinct ids committed to the inbox, summed over callbacks.
pub const IDS_ACCEPTED: &str = "ids_accepted_total";
/// Callbacks refused, by `reason`.
pub const CALLBACKS_REJECTED: &str = "callbacks_rejected_total";
/// Inbox transactions that committed callbacks (group commits).
pub const INBOX_GROUP_COMMITS: &str = "inbox_group_commits_total";
/// Distinct ids waiting in the inbox or being fetched.
pub const INBOX_BACKLOG: &str = "inbox_backlog_ids";
/// How long the longest-waiting id has waited.
pub const INBOX_OLDEST_PENDING: &str = "inbox_oldest_pending_seconds";
/// Finished upstream fetches, by `outcome`.
pub const FETCHES: &str = "fetches_total";
/// Ids recorded as dead letters (failed for good), by error `code`.
pub const FETCH_FAILURES: &str = "fetch_failures_total";
/// Transient fetch failures handed back to the inbox for a later attempt, by error `code`.
pub const RETRIES_SCHEDULED: &str = "fetch_retries_scheduled_total";
/// How many fetches an id took until it settled (stored, offline or dead letter).
pub const FETCH_ATTEMPTS: &str = "fetch_attempts";
/// Ids waiting in the inbox for a retry after a transient failure.
pub const INBOX_RETRYING: &str = "inbox_retrying_ids";
/// How long the longest-waiting retrying id has waited since its first request.
pub const INBOX_OLDEST_RETRYING: &str = "inbox_oldest_retrying_seconds";
/// Dead letters put back in the inbox by an operator.
pub const DEAD_LETTERS_REPLAYED: &str = "dead_letters_replayed_total";
/// Dead letters deleted, by `reason` (`operator`, `retention`).
pub const DEAD_LETTERS_PURGED: &str = "dead_letters_purged_total";
/// The upstream circuit breaker's state: 0 closed, 1 open, 2 half-open.
pub const UPSTREAM_BREAKER_STATE: &str = "upstream_breaker_state";
/// Changes of the upstream circuit breaker's state, by the state entered (`to`).
pub const UPSTREAM_BREAKER_TRANSITIONS: &str = "upstream_breaker_transitions_total";
/// Lease renewals (heartbeats) of the ids this instance is fetching.
pub const LEASE_RENEWALS: &str = "inbox_lease_renewals_total";
/// How long one `ObjectSource::fetch` took, retries included.
pub const UPSTREAM_FETCH_DURATION: &str = "upstream_fetch_duration_seconds";
/// Upstream fetches running now.
pub const FETCHES_IN_FLIGHT: &str = "fetches_in_flight";
/// Outcomes settled by one completing transaction.
pub const STORE_BATCH_SIZE: &str = "store_batch_size";
/// How long one successful completing transaction took.
pub const STORE_BATCH_DURATION: &str = "store_batch_duration_seconds";
/// Failed inbox and store operations, by `operation`.
pub const STORE_ERRORS: &str = "store_errors_total";
/// Rows deleted by the expiry sweeper.
pub const EXPIRED_ROWS_DELETED: &str = "expired_rows_deleted_total";
/// How long after the earliest due deadline the sweeper deleted it.
pub const EXPIRY_LATENESS: &str = "expiry_lateness_seconds";
/// 1 while the instance can take callbacks (`GET /readyz` answers 200), 0 otherwise.
pub const SERVICE_READY: &str = "service_ready";

/// Describes every series of this crate to the installed recorder (units and help text).
pub fn describe() {
    describe_counter!(
        CALLBACKS_ACCEPTED,
        Unit::Count,
        "callbacks committed to the inbox"
    );
    describe_counter!(
        IDS_ACCEPTED,
        Unit::Count,
        "distinct ids committed to the inbox, summed over callbacks"
    );
    describe_counter!(
        CALLBACKS_REJECTED,
        Unit::Count,
        "callbacks refused, by reason (overloaded, unavailable, shutting_down)"
    );
    describe_counter!(
        INBOX_GROUP_COMMITS,
        Unit::Count,
        "inbox transactions that committed callbacks together"
    );
    describe_gauge!(
        INBOX_BACKLOG,
        Unit::Count,
        "distinct ids waiting in the inbox or being fetched, as last read"
    );
    describe_gauge!(
        INBOX_OLDEST_PENDING,
        Unit::Seconds,
        "how long the longest-waiting id has waited, as last read"
    );
    describe_counter!(
        FETCHES,
        Unit::Count,
        "finished upstream fetches, by outcome (online, offline, retry, failed)"
    );
    describe_counter!(
        FETCH_FAILURES,
        Unit::Count,
        "ids recorded as dead letters (failed for good), by error code"
    );
    describe_counter!(
        RETRIES_SCHEDULED,
        Unit::Count,
        "transient fetch failures handed back to the inbox for a later attempt, by error code"
    );
    describe_histogram!(
        FETCH_ATTEMPTS,
        Unit::Count,
        "fetches an id took until it settled (stored, offline or dead letter)"
    );
    describe_gauge!(
        INBOX_RETRYING,
        Unit::Count,
        "ids waiting in the inbox for a retry after a transient failure, as last read"
    );
    describe_gauge!(
        INBOX_OLDEST_RETRYING,
        Unit::Seconds,
        "how long the longest-waiting retrying id has waited since its first request"
    );
    describe_counter!(
        DEAD_LETTERS_REPLAYED,
        Unit::Count,
        "dead letters put back in the inbox by an operator"
    );
    describe_counter!(
        DEAD_LETTERS_PURGED,
        Unit::Count,
        "dead letters deleted, by reason (operator, retention)"
    );
    describe_gauge!(
        UPSTREAM_BREAKER_STATE,
        Unit::Count,
        "the upstream circuit breaker: 0 closed, 1 open (claiming nothing), 2 half-open (one probe)"
    );
    describe_counter!(
        UPSTREAM_BREAKER_TRANSITIONS,
        Unit::Count,
        "changes of the upstream circuit breaker's state, by the state entered (open, half_open, closed)"
    );
    describe_counter!(
        LEASE_RENEWALS,
        Unit::Count,
        "heartbeats that renewed the leases of the ids this instance is fetching"
    );
    describe_histogram!(
        UPSTREAM_FETCH_DURATION,
        Unit::Seconds,
        "time of one upstream fetch of an id, retries included"
    );
    describe_gauge!(
        FETCHES_IN_FLIGHT,
        Unit::Count,
        "upstream fetches running now"
    );
    describe_histogram!(
        STORE_BATCH_SIZE,
        Unit::Count,
        "outcomes settled by one completing transaction"
    );
    describe_histogram!(
        STORE_BATCH_DURATION,
        Unit::Seconds,
        "time of one successful completing transaction"
    );
    describe_counter!(
        STORE_ERRORS,
        Unit::Count,
        "failed inbox and store operations, by operation; each is retried or answered 503"
    );
    describe_counter!(
        EXPIRED_ROWS_DELETED,
        Unit::Count,
        "stored objects deleted by the expiry sweeper"
    );
    describe_histogram!(
        EXPIRY_LATENESS,
        Unit::Seconds,
        "time from the earliest due deadline to the delete of its batch"
    );
    describe_gauge!(
        SERVICE_READY,
        Unit::Count,
        "1 while the instance can take callbacks (GET /readyz answers 200), 0 otherwise"
    );
}

/// Records whether the instance is ready (cold path: on changes only).
pub(crate) fn readiness(ready: bool) {
    gauge!(SERVICE_READY).set(if ready { 1.0 } else { 0.0 });
}

/// Counts one failed call of a store or inbox `operation` (cold path).
pub(crate) fn store_error(operation: &'static str) {
    counter!(STORE_ERRORS, "operation" => operation).increment(1);
}

/// Converts a duration to the seconds a histogram records.
pub(crate) fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// The pipeline's handles, registered once when it starts.
#[derive(Debug, Clone)]
pub(crate) struct PipelineMetrics {
    pub(crate) callbacks_accepted: Counter,
    pub(crate) ids_accepted: Counter,
    pub(crate) group_commits: Counter,
    pub(crate) rejected_overloaded: Counter,
    pub(crate) rejected_unavailable: Counter,
    pub(crate) rejected_shutting_down: Counter,
    pub(crate) backlog: Gauge,
    pub(crate) oldest_pending: Gauge,
    pub(crate) online: Counter,
    pub(crate) offline: Counter,
    pub(crate) failed: Counter,
    pub(crate) retried: Counter,
    pub(crate) attempts: Histogram,
    pub(crate) retrying: Gauge,
    pub(crate) oldest_retrying: Gauge,
    pub(crate) dead_letters_replayed: Counter,
    pub(crate) fetch_duration: Histogram,
    pub(crate) in_flight: Gauge,
    pub(crate) batch_size: Histogram,
    pub(crate) batch_duration: Histogram,
}

impl PipelineMetrics {
    /// Registers every handle with the recorder installed now (none: they record nothing).
    pub(crate) fn register() -> Self {
        Self {
            callbacks_accepted: counter!(CALLBACKS_ACCEPTED),
            ids_accepted: counter!(IDS_ACCEPTED),
            group_commits: counter!(INBOX_GROUP_COMMITS),
            rejected_overloaded: counter!(CALLBACKS_REJECTED, "reason" => "overloaded"),
            rejected_unavailable: counter!(CALLBACKS_REJECTED, "reason" => "unavailable"),
            rejected_shutting_down: counter!(CALLBACKS_REJECTED, "reason" => "shutting_down"),
            backlog: gauge!(INBOX_BACKLOG),
            oldest_pending: gauge!(INBOX_OLDEST_PENDING),
            online: counter!(FETCHES, "outcome" => "online"),
            offline: counter!(FETCHES, "outcome" => "offline"),
            failed: counter!(FETCHES, "outcome" => "failed"),
            retried: counter!(FETCHES, "outcome" => "retry"),
            attempts: histogram!(FETCH_ATTEMPTS),
            retrying: gauge!(INBOX_RETRYING),
            oldest_retrying: gauge!(INBOX_OLDEST_RETRYING),
            dead_letters_replayed: counter!(DEAD_LETTERS_REPLAYED),
            fetch_duration: histogram!(UPSTREAM_FETCH_DURATION),
            in_flight: gauge!(FETCHES_IN_FLIGHT),
            batch_size: histogram!(STORE_BATCH_SIZE),
            batch_duration: histogram!(STORE_BATCH_DURATION),
        }
    }
}
