//! The storage adapters' Prometheus series: the connection pool (either backend).

use metrics::{Gauge, Unit, describe_gauge, gauge};

/// Pooled database connections, by `state` (`in_use`, `idle`).
pub const DB_POOL_CONNECTIONS: &str = "db_pool_connections";
/// Callers waiting for a pooled database connection.
pub const DB_POOL_WAITING: &str = "db_pool_waiting";

/// Describes the storage series to the installed recorder (units and help text).
pub fn describe() {
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        Unit::Count,
        "pooled database connections by state (in_use, idle), as of the last checkout or return"
    );
    describe_gauge!(
        DB_POOL_WAITING,
        Unit::Count,
        "callers waiting for a pooled database connection, as of the last checkout or return"
    );
}

/// The pool's gauges, registered once per store.
#[derive(Debug)]
pub(crate) struct PoolGauges {
    in_use: Gauge,
    idle: Gauge,
    waiting: Gauge,
}

impl PoolGauges {
    /// Registers the gauges with the recorder installed now.
    pub(crate) fn register() -> Self {
        Self {
            in_use: gauge!(DB_POOL_CONNECTIONS, "state" => "in_use"),
            idle: gauge!(DB_POOL_CONNECTIONS, "state" => "idle"),
            waiting: gauge!(DB_POOL_WAITING),
        }
    }

    /// Sets the gauges from the pool's status.
    pub(crate) fn observe(&self, status: &deadpool::Status) {
        self.in_use
            .set(status.size.saturating_sub(status.available) as f64);
        self.idle.set(status.available as f64);
        self.waiting.set(status.waiting as f64);
    }
}
