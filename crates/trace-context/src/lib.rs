//! Trace context over HTTP: the W3C `traceparent` (and B3) headers written into outgoing
//! requests and read from incoming ones, so a trace continues across services.
//!
//! It also carries a callback's trace context through the durable inbox: [`Propagation`]
//! implements the domain's [`TracePropagation`] port with W3C `traceparent` text, so the
//! fetches of a callback join its trace even when they run later, on another instance or
//! after a restart.
//!
//! The propagators themselves are installed by `telemetry::init` when span export is on;
//! until it calls [`enable`], [`inject`], [`set_parent`] and [`Propagation`] do nothing
//! (there is no trace to continue) and the hot path pays one atomic load. This crate holds
//! no exporter and no HTTP client, so the adapters can depend on it.

use std::sync::atomic::{AtomicBool, Ordering};

use domain::{TraceParent, TracePropagation};
use http::HeaderMap;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
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
    // Most requests carry no trace context: skip the propagators' work for them.
    let carries_context = headers.contains_key("traceparent")
        || headers.contains_key("x-b3-traceid")
        || headers.contains_key("b3");
    if !carries_context {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    if let Err(err) = span.set_parent(parent) {
        tracing::debug!(error = %err, "cannot continue the caller's trace");
    }
}

/// The domain's [`TracePropagation`] port over OpenTelemetry: a span's context as W3C
/// `traceparent` text (version 00), and back. Inert until [`enable`] is called.
///
/// Only a *sampled* context is carried: an unsampled callback's ids cost the inbox nothing
/// (no text stored per id), and their fetches are sampled on their own at the configured
/// ratio, like any work without a parent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Propagation;

impl TracePropagation for Propagation {
    fn current(&self) -> Option<TraceParent> {
        if !ENABLED.load(Ordering::Relaxed) {
            return None;
        }
        let context = tracing::Span::current().context();
        let span = context.span();
        let span_context = span.span_context();
        (span_context.is_valid() && span_context.is_sampled())
            .then(|| TraceParent::new(&format_traceparent(span_context)))
            .flatten()
    }

    fn set_parent(&self, span: &tracing::Span, parent: &TraceParent) {
        if !ENABLED.load(Ordering::Relaxed) {
            return;
        }
        let Some(remote) = parse_traceparent(parent.as_str()) else {
            tracing::debug!(%parent, "stored trace context is not a traceparent; starting a new trace");
            return;
        };
        let context = opentelemetry::Context::new().with_remote_span_context(remote);
        if let Err(err) = span.set_parent(context) {
            tracing::debug!(error = %err, "cannot continue the callback's trace");
        }
    }
}

/// `context` as a W3C `traceparent` of version 00.
fn format_traceparent(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

/// A W3C `traceparent` of version 00 as a remote span context; `None` unless well-formed
/// with non-zero ids.
fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if version != "00"
        || parts.next().is_some()
        || !hex(trace, 32)
        || !hex(span, 16)
        || !hex(flags, 2)
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    let context = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    context.is_valid().then_some(context)
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
    fn a_traceparent_survives_the_round_trip_through_text() {
        let sent = SpanContext::new(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128),
            SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let text = format_traceparent(&sent);
        assert_eq!(
            text,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(parse_traceparent(&text), Some(sent.clone()));
        let unsampled = SpanContext::new(
            sent.trace_id(),
            sent.span_id(),
            TraceFlags::default(),
            true,
            TraceState::default(),
        );
        assert_eq!(
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            Some(unsampled),
            "an unsampled parent stays unsampled"
        );
    }

    #[test]
    fn malformed_or_zero_traceparents_are_refused() {
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_port_is_inert_while_export_is_off() {
        // `enable` is not called in this test binary.
        assert_eq!(Propagation.current(), None);
    }

    #[test]
    fn nothing_is_injected_while_export_is_off() {
        // `init` is not called in this test binary, so propagation stays off.
        let mut headers = HeaderMap::new();
        inject(&tracing::Span::none(), &mut headers);
        assert!(headers.is_empty());
    }
}
