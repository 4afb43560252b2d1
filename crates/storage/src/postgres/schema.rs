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

diesel::table! {
    /// The durable inbox: one row per distinct id waiting for, or being given, a fetch.
    inbox (object_id) {
        /// The object to fetch.
        object_id -> BigInt,
        /// How many times the id was requested while it waited.
        generation -> BigInt,
        /// When the first still-waiting request arrived.
        requested_at -> Timestamptz,
        /// The worker that leased the id, if one did.
        lease_owner -> Nullable<Text>,
        /// Until when the lease holds.
        lease_until -> Nullable<Timestamptz>,
        /// The trace context of the newest request that carried one (W3C `traceparent`).
        trace -> Nullable<Text>,
        /// Failed attempts so far; while `lease_owner` is NULL, `lease_until` is the next.
        attempts -> Integer,
        /// The latest failed attempt's cause, `code: reason`.
        last_error -> Nullable<Text>,
    }
}

diesel::table! {
    /// Fetches that failed for good, newest by `seq`.
    fetch_failures (seq) {
        /// Orders the failures: a larger `seq` was recorded later.
        seq -> BigInt,
        /// The object.
        object_id -> BigInt,
        /// A short stable code: `timeout`, `status`, …
        code -> Text,
        /// The cause, as text.
        reason -> Text,
        /// When the failure was recorded.
        failed_at -> Timestamptz,
        /// How many fetches were tried in all.
        attempts -> Integer,
    }
}
