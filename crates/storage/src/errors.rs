//! Error mapping shared by both adapters: what counts as "the database is unavailable"
//! (503, try again later) and what is a query error (a bug, 500).

use diesel_async::pooled_connection::deadpool::PoolError;
use domain::StoreError;

/// Maps a failure to get a pooled connection: the database is unavailable.
pub(crate) fn pool_error(err: PoolError) -> StoreError {
    use deadpool::managed::{PoolError as E, TimeoutType};
    use diesel_async::pooled_connection::PoolError as Backend;

    match err {
        E::Timeout(TimeoutType::Wait) => {
            StoreError::Unavailable("timed out waiting for a free database connection".into())
        }
        E::Timeout(TimeoutType::Create | TimeoutType::Recycle) => {
            StoreError::Unavailable("timed out connecting to the database".into())
        }
        E::Backend(Backend::ConnectionError(err)) => {
            StoreError::Unavailable(format!("cannot connect: {err}"))
        }
        E::Backend(Backend::QueryError(err)) => {
            StoreError::Unavailable(format!("connection check failed: {err}"))
        }
        E::Closed => StoreError::Unavailable("the connection pool is closed".into()),
        E::PostCreateHook(err) => {
            StoreError::Unavailable(format!("connection setup failed: {err}"))
        }
        E::NoRuntimeSpecified => {
            StoreError::Query("the connection pool has no runtime for its timeouts".into())
        }
    }
}

/// Maps a diesel error with the backend's own notion of "unavailable".
pub(crate) fn classify(
    err: diesel::result::Error,
    is_unavailable: fn(&diesel::result::Error) -> bool,
) -> StoreError {
    if is_unavailable(&err) {
        StoreError::Unavailable(err.to_string())
    } else {
        StoreError::Query(err.to_string())
    }
}
