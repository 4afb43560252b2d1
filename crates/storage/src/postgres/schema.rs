//! The PostgreSQL schema as diesel sees it; `migrations/postgres` creates it.

diesel::table! {
    /// The objects seen online.
    objects (id) {
        /// The object id.
        id -> BigInt,
        /// When the upstream last reported the object online.
        last_seen -> Timestamptz,
        /// From this instant on the row is logically gone.
        expires_at -> Timestamptz,
    }
}
