//! Trace context over HTTP: the W3C `traceparent` (and B3) headers written into outgoing
//! requests and read from incoming ones, so a trace continues across services.
//!
//! The propagators themselves are installed by `telemetry::init` when span export is on;
//! until it calls [`enable`], [`inject`] and [`set_parent`] do nothing (there is no trace
//! to continue) and the hot path pays one atomic load. This crate holds no exporter and no
//! HTTP client, so the adapters can depend on it.

use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Whether span export, and so propagation, is on.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns propagation on; `telemetry::init` calls it once it has installed the global
/// propagators and the OpenTelemetry layer.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Writes the trace context of `span` into `headers` (`traceparent`, and B3's
/// `x-b3-*`), for the request made on its behalf.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers));
    });
}

/// Makes the trace context found in `headers`, if any, the parent of `span`, which must
/// not have been entered yet; without one, `span` starts a new trace.
pub fn set_parent(span: &tracing::Span, headers: &HeaderMap) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    if let Err(err) = span.set_parent(parent) {
        tracing::debug!(error = %err, "cannot continue the caller's trace");
    }
}

/// Writes propagation fields as HTTP headers; a field that is not a valid header is skipped.
struct HeaderInjector<'h>(&'h mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Reads propagation fields from HTTP headers; a value that is not text is absent.
struct HeaderExtractor<'h>(&'h HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::propagation::TextMapPropagator as _;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::*;

    #[test]
    fn the_header_map_carries_traceparent_both_ways() {
        let sent = SpanContext::new(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128),
            SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let propagator = TraceContextPropagator::new();
        let mut headers = HeaderMap::new();
        propagator.inject_context(
            &opentelemetry::Context::new().with_remote_span_context(sent.clone()),
            &mut HeaderInjector(&mut headers),
        );
        assert_eq!(
            headers["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let received = propagator.extract(&HeaderExtractor(&headers));
        assert_eq!(received.span().span_context(), &sent);
    }

    #[test]
    fn nothing_is_injected_while_export_is_off() {
        // `init` is not called in this test binary, so propagation stays off.
        let mut headers = HeaderMap::new();
        inject(&tracing::Span::none(), &mut headers);
        assert!(headers.is_empty());
    }
}
