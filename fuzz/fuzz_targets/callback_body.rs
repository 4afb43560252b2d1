//! Any bytes as a `POST /callback` body: the parser never panics, and answers `202` with
//! the distinct count exactly when the body is a valid callback, otherwise the `4xx`
//! envelope the contract names (`http_transport::fuzzing::check_callback`).
//!
//! A first byte below 16 is the id limit (so `413` is reachable) and not part of the body;
//! any other input is all body, with the default limit of 10 000 ids.

#![no_main]

use http_transport::fuzzing::{check_callback, parse_callback_body};
use libfuzzer_sys::fuzz_target;

/// The default `http.max_ids`.
const MAX_IDS: usize = 10_000;

fuzz_target!(|data: &[u8]| {
    let (max_ids, body) = match data.split_first() {
        Some((&limit, rest)) if limit < 16 => (usize::from(limit), rest),
        _ => (MAX_IDS, data),
    };
    let outcome = parse_callback_body(body, max_ids);
    if let Err(wrong) = check_callback(body, max_ids, &outcome) {
        panic!("{wrong}");
    }
});
