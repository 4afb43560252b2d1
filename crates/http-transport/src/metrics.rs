//! The HTTP series, recorded by the router for every request on the public listener.

use std::time::Duration;

use http::{Method, StatusCode};
use metrics::{SharedString, Unit, counter, describe_counter, describe_histogram, histogram};

/// Requests answered, by `route`, `method` and `status`.
pub const HTTP_REQUESTS: &str = "http_requests_total";
/// Time from a request's arrival to its response, by `route` and `method`.
pub const HTTP_REQUEST_DURATION: &str = "http_request_duration_seconds";

/// Requests answered `401` for want of valid credentials, by `reason`.
pub const AUTH_REJECTIONS: &str = "auth_rejections_total";

/// Certificate reloads of a TLS listener, by `listener` and `outcome` (`replaced`, `failed`).
pub const TLS_RELOADS: &str = "tls_reloads_total";
/// TLS handshakes that did not complete, by `listener` and `reason` (`refused`, `timeout`).
pub const TLS_HANDSHAKE_FAILURES: &str = "tls_handshake_failures_total";

/// Callbacks refused, by `reason` (the domain counts the others under the same name).
const CALLBACKS_REJECTED: &str = "callbacks_rejected_total";

/// The `route` of a request no route matched (`404`): never the raw path.
pub(crate) const UNMATCHED: &str = "unmatched";

/// Describes the HTTP series to the installed recorder (units and help text).
pub fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        Unit::Count,
        "requests answered on the public listener, by route pattern, method and status"
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "time from a request's arrival to its response, by route pattern and method"
    );
    describe_counter!(
        AUTH_REJECTIONS,
        Unit::Count,
        "requests answered 401 for want of valid credentials, by reason (missing, invalid, expired, replayed)"
    );
    describe_counter!(
        TLS_RELOADS,
        Unit::Count,
        "certificate reloads of a TLS listener, by listener and outcome (replaced; failed: the previous certificate stays)"
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        Unit::Count,
        "TLS handshakes that did not complete, by listener and reason (refused, timeout)"
    );
}

/// Registers a TLS listener's `tls_reloads_total` and `tls_handshake_failures_total`
/// series at zero.
pub(crate) fn register_tls_reloads(listener: &'static str) {
    for outcome in ["replaced", "failed"] {
        counter!(TLS_RELOADS, "listener" => listener, "outcome" => outcome).increment(0);
    }
    for reason in ["refused", "timeout"] {
        counter!(TLS_HANDSHAKE_FAILURES, "listener" => listener, "reason" => reason).increment(0);
    }
}

/// Counts one certificate reload that replaced the certificate or failed.
pub(crate) fn tls_reload(listener: &'static str, outcome: &'static str) {
    counter!(TLS_RELOADS, "listener" => listener, "outcome" => outcome).increment(1);
}

/// Counts one TLS handshake that did not complete.
pub(crate) fn tls_handshake_failed(listener: &'static str, reason: &'static str) {
    counter!(TLS_HANDSHAKE_FAILURES, "listener" => listener, "reason" => reason).increment(1);
}

/// Registers every `auth_rejections_total` series at zero, so they show before the first
/// rejection.
pub(crate) fn register_auth_rejections() {
    for reason in crate::auth::Reason::ALL {
        counter!(AUTH_REJECTIONS, "reason" => reason.label()).increment(0);
    }
}

/// Counts a request refused for want of valid credentials.
pub(crate) fn auth_rejected(reason: &'static str) {
    counter!(AUTH_REJECTIONS, "reason" => reason).increment(1);
}

/// Counts a callback refused because the bodies in progress hold the whole memory budget.
pub(crate) fn body_memory_exhausted() {
    counter!(CALLBACKS_REJECTED, "reason" => "body_memory").increment(1);
}

/// Counts one answered request and records how long it took.
pub(crate) fn request(
    route: &'static str,
    method: &'static str,
    status: StatusCode,
    took: Duration,
) {
    counter!(HTTP_REQUESTS, "route" => route, "method" => method, "status" => status_label(status))
        .increment(1);
    histogram!(HTTP_REQUEST_DURATION, "route" => route, "method" => method)
        .record(took.as_secs_f64());
}

/// The method as a static label; methods outside the standard ones are `other`, so a
/// client cannot create series at will.
pub(crate) fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// The status code as a label, without allocating for the codes this server answers.
fn status_label(status: StatusCode) -> SharedString {
    let known = match status.as_u16() {
        200 => "200",
        202 => "202",
        400 => "400",
        401 => "401",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        415 => "415",
        422 => "422",
        500 => "500",
        503 => "503",
        other => return SharedString::from(other.to_string()),
    };
    SharedString::const_str(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_numeric_status_and_a_bounded_method() {
        for code in [200, 202, 204, 404, 418, 503] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(&*status_label(status), code.to_string());
        }
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
