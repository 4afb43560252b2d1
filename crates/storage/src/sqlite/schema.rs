//! The SQLite schema as diesel sees it; `migrations/sqlite` creates it.

diesel::table! {
    /// The objects seen online; both times are microseconds since the Unix epoch (UTC).
    objects (id) {
        /// The object id (SQLite's rowid).
        id -> BigInt,
        /// When the upstream last reported the object online.
        last_seen -> BigInt,
        /// From this instant on the row is logically gone.
        expires_at -> BigInt,
    }
}
