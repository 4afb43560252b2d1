//! Traces exported by the real binaries, to Zipkin and over OTLP: fake collectors on
//! 127.0.0.1 receive the spans of one callback, and the upstream request carries the fetch
//! span's context (W3C `traceparent`, B3), which the real `client-service` continues. Both
//! exporters are held to the same expectations (`tests::traces`).
//!
//! SQLite only: span export does not depend on the backend.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use serde_json::json;
use tests::traces::{
    Collector, Span, callback_span, check_the_callback_trace, fetch_spans, has_the_callback_trace,
    named, one_callback, online_answer, parse_traceparent, pipeline_fetch_span, serve,
    zipkin_spans,
};
use tests::{Backend, Service, Upstream, http};

/// The spans of an OTLP `ExportTraceServiceRequest` (protobuf), each with its resource's
/// `service.name`.
fn otlp_spans(body: &[u8]) -> anyhow::Result<Vec<Span>> {
    fn text(value: Option<&AnyValue>) -> String {
        match value.and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            Some(any_value::Value::BoolValue(b)) => b.to_string(),
            Some(any_value::Value::IntValue(i)) => i.to_string(),
            Some(any_value::Value::DoubleValue(d)) => d.to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        }
    }
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let request = ExportTraceServiceRequest::decode(body).context("not an OTLP trace export")?;
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref()))
            .unwrap_or_default();
        for span in resource_spans
            .scope_spans
            .into_iter()
            .flat_map(|scope| scope.spans)
        {
            let kind = SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified);
            spans.push(Span {
                service: service.clone(),
                name: span.name,
                kind: kind
                    .as_str_name()
                    .trim_start_matches("SPAN_KIND_")
                    .to_owned(),
                trace_id: hex(&span.trace_id),
                id: hex(&span.span_id),
                parent_id: hex(&span.parent_span_id),
                tags: span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                    .collect::<BTreeMap<_, _>>(),
            });
        }
    }
    Ok(spans)
}

/// A fake OTLP/HTTP collector: `POST /v1/traces`, protobuf, answered `200` (an empty body
/// is an `ExportTraceServiceResponse` without a partial failure).
async fn otlp_collector() -> anyhow::Result<Collector> {
    Collector::start("/v1/traces", 200, otlp_spans).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callback_exports_its_request_and_fetch_spans_and_the_upstream_gets_traceparent()
-> anyhow::Result<()> {
    let mut collector = Collector::zipkin().await?;
    let propagated =
        one_callback(&[("CALLBACK_TELEMETRY__ZIPKIN_ENDPOINT", &collector.endpoint)]).await?;
    let spans = collector.until(has_the_callback_trace).await?;
    check_the_callback_trace(spans, &propagated)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_otlp_one_callback_exports_the_same_trace() -> anyhow::Result<()> {
    let mut collector = otlp_collector().await?;
    let propagated =
        one_callback(&[("CALLBACK_TELEMETRY__OTLP_ENDPOINT", &collector.endpoint)]).await?;
    let spans = collector.until(has_the_callback_trace).await?;
    check_the_callback_trace(spans, &propagated)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_both_exporters_on_each_collector_gets_every_span_of_the_trace() -> anyhow::Result<()>
{
    let mut zipkin = Collector::zipkin().await?;
    let mut otlp = otlp_collector().await?;
    let propagated = one_callback(&[
        ("CALLBACK_TELEMETRY__ZIPKIN_ENDPOINT", &zipkin.endpoint),
        ("CALLBACK_TELEMETRY__OTLP_ENDPOINT", &otlp.endpoint),
    ])
    .await?;
    let zipkin_trace =
        check_the_callback_trace(zipkin.until(has_the_callback_trace).await?, &propagated)?;
    let otlp_trace =
        check_the_callback_trace(otlp.until(has_the_callback_trace).await?, &propagated)?;
    assert_eq!(zipkin_trace, otlp_trace, "one trace, sent twice");
    // The service stopped before this: each collector has all it will ever get.
    let ids = |spans: &[Span]| -> BTreeSet<(String, String)> {
        spans
            .iter()
            .map(|s| (s.id.clone(), s.name.to_ascii_lowercase()))
            .collect()
    };
    assert_eq!(ids(&zipkin.spans), ids(&otlp.spans), "the same spans");
    Ok(())
}

/// The real client-service's simulator, exporting through `client_env`, continues the
/// trace of callback-service's fetch (exported through `service_env`); both collectors may
/// be one.
async fn the_simulator_continues_the_fetch_trace(
    simulator_collector: &mut Collector,
    client_env: &str,
    service_collector: Option<&mut Collector>,
) -> anyhow::Result<()> {
    let upstream =
        Upstream::start_with_env(1, 1, &[(client_env, &simulator_collector.endpoint)]).await?;
    let service_endpoint = service_collector
        .as_ref()
        .map_or(simulator_collector.endpoint.clone(), |c| c.endpoint.clone());
    let service = Service::start(
        Backend::Sqlite,
        &upstream.base_url(),
        Duration::from_secs(600),
        &[("CALLBACK_TELEMETRY__ZIPKIN_ENDPOINT", &service_endpoint)],
    )
    .await?
    .context("sqlite is always available")?;

    let response = http()
        .post(service.url("/callback"))
        .json(&json!({ "object_ids": [8] }))
        .send()
        .await?;
    assert_eq!(response.status(), 202);

    let simulator = |spans: &[Span]| -> Option<Span> {
        spans
            .iter()
            .find(|s| s.service == "client-service")
            .cloned()
    };
    let served = simulator(
        simulator_collector
            .until(|spans| simulator(spans).is_some())
            .await?,
    )
    .expect("waited for");
    let fetch = match service_collector {
        Some(collector) => {
            collector
                .until(|spans| !fetch_spans(spans).is_empty())
                .await?
        }
        None => {
            simulator_collector
                .until(|spans| !fetch_spans(spans).is_empty())
                .await?
        }
    };
    let fetch = fetch_spans(fetch)[0].clone();
    assert_eq!(fetch.service, "callback-service");
    assert_eq!(served.kind, "SERVER", "{served:#?}");
    assert_eq!(served.tag("path"), "/objects/8", "{served:#?}");
    assert_eq!(served.trace_id, fetch.trace_id, "one trace");
    assert_eq!(
        served.parent_id, fetch.id,
        "the simulator's span is a child of the fetch"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_service_simulator_continues_the_fetch_trace() -> anyhow::Result<()> {
    let mut collector = Collector::zipkin().await?;
    the_simulator_continues_the_fetch_trace(
        &mut collector,
        "CLIENT_TELEMETRY__ZIPKIN_ENDPOINT",
        None,
    )
    .await
}

/// client-service over OTLP, callback-service to Zipkin: the trace crosses the exporters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_service_simulator_exports_over_otlp_too() -> anyhow::Result<()> {
    let mut otlp = otlp_collector().await?;
    let mut zipkin = Collector::zipkin().await?;
    the_simulator_continues_the_fetch_trace(
        &mut otlp,
        "CLIENT_TELEMETRY__OTLP_ENDPOINT",
        Some(&mut zipkin),
    )
    .await
}

#[test]
fn traceparent_parsing_rejects_malformed_values() {
    assert!(parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
    for bad in [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
    ] {
        assert!(parse_traceparent(bad).is_none(), "{bad}");
    }
}

#[test]
fn both_wire_formats_become_the_same_spans() {
    let zipkin = br#"[{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","id":"00f067aa0ba902b7",
        "parentId":"00000000000000aa","name":"upstream.fetch","kind":"CLIENT",
        "localEndpoint":{"serviceName":"callback-service"},"tags":{"object_id":"3"}}]"#;
    let from_zipkin = zipkin_spans(zipkin).unwrap();

    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as OtlpSpan};
    let kv = |key: &str, value: any_value::Value| KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    };
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv(
                    "service.name",
                    any_value::Value::StringValue("callback-service".to_owned()),
                )],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![OtlpSpan {
                    trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128
                        .to_be_bytes()
                        .to_vec(),
                    span_id: 0x00f0_67aa_0ba9_02b7_u64.to_be_bytes().to_vec(),
                    parent_span_id: 0xaa_u64.to_be_bytes().to_vec(),
                    name: "upstream.fetch".to_owned(),
                    kind: SpanKind::Client as i32,
                    attributes: vec![kv("object_id", any_value::Value::IntValue(3))],
                    ..OtlpSpan::default()
                }],
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    };
    assert_eq!(otlp_spans(&request.encode_to_vec()).unwrap(), from_zipkin);
    assert!(otlp_spans(b"\xff\xff").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_left_by_a_killed_instance_joins_the_callbacks_trace_after_the_restart()
-> anyhow::Result<()> {
    let mut collector = Collector::zipkin().await?;
    // Down (503) until told otherwise: the first instance keeps retrying the fetch.
    let answering = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up = Arc::clone(&answering);
    let upstream = serve(move |req| {
        if !up.load(std::sync::atomic::Ordering::SeqCst) {
            return (503, String::new());
        }
        online_answer(&req.path)
    })
    .await?;
    let mut first = Service::start(
        Backend::Sqlite,
        &format!("http://{upstream}"),
        Duration::from_secs(600),
        &[
            ("CALLBACK_TELEMETRY__ZIPKIN_ENDPOINT", &collector.endpoint),
            ("CALLBACK_UPSTREAM__RETRY_DEADLINE_MS", "120000"),
            ("CALLBACK_PIPELINE__LEASE_MS", "180000"),
        ],
    )
    .await?
    .context("sqlite is always available")?;
    let response = http()
        .post(first.url("/callback"))
        .json(&json!({ "object_ids": [6] }))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    // The request's spans leave with the next export; then the instance dies mid-fetch.
    let callback_trace = callback_span(
        collector
            .until(|spans| callback_span(spans).is_some())
            .await?,
    )
    .expect("waited for")
    .trace_id
    .clone();
    first.kill().await?;
    let before_restart: Vec<String> = collector
        .spans
        .iter()
        .filter(|s| s.trace_id == callback_trace)
        .map(|s| s.id.clone())
        .collect();

    answering.store(true, std::sync::atomic::Ordering::SeqCst);
    let restarted = first.another().await?;
    let spans = collector
        .until(|spans| {
            pipeline_fetch_span(spans, "6").is_some_and(|s| s.tag("outcome") == "online")
        })
        .await?;
    let fetch = named(spans, "fetch")
        .into_iter()
        .find(|s| s.tag("object_id") == "6" && s.tag("outcome") == "online")
        .expect("waited for");
    assert_eq!(
        fetch.trace_id, callback_trace,
        "the restarted instance's fetch joins the callback's trace: {fetch:#?}"
    );
    assert!(
        before_restart.contains(&fetch.parent_id),
        "its parent is a span of the request, exported before the kill: {fetch:#?} not under {before_restart:?}"
    );
    drop(restarted);
    Ok(())
}

/// With callers authenticated, a caller's `traceparent` does not continue its trace (it
/// could otherwise force every request to be sampled): the request starts a trace of its
/// own, unless `telemetry.trust_incoming_trace` says the callers are trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_a_callers_trace_is_continued_only_when_trusted() -> anyhow::Result<()> {
    const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let upstream = serve(|req| online_answer(&req.path)).await?;
    for (trust, continued) in [(None, false), (Some("true"), true)] {
        let mut collector = Collector::zipkin().await?;
        let mut env = vec![
            (
                "CALLBACK_TELEMETRY__ZIPKIN_ENDPOINT",
                collector.endpoint.as_str(),
            ),
            ("CALLBACK_AUTH__MODE", "bearer"),
            ("CALLBACK_AUTH__API_KEYS", "trace-test-key"),
        ];
        if let Some(trust) = trust {
            env.push(("CALLBACK_TELEMETRY__TRUST_INCOMING_TRACE", trust));
        }
        let service = Service::start(
            Backend::Sqlite,
            &format!("http://{upstream}"),
            Duration::from_secs(600),
            &env,
        )
        .await?
        .context("sqlite is always available")?;
        let response = http()
            .post(service.url("/callback"))
            .bearer_auth("trace-test-key")
            .header(
                "traceparent",
                format!("00-{CALLER_TRACE}-00f067aa0ba902b7-01"),
            )
            .json(&json!({ "object_ids": [8] }))
            .send()
            .await?;
        assert_eq!(response.status(), 202);
        let spans = collector
            .until(|spans| callback_span(spans).is_some())
            .await?;
        let span = callback_span(spans).expect("waited for");
        assert_eq!(
            span.trace_id == CALLER_TRACE,
            continued,
            "trust_incoming_trace = {trust:?}: {span:#?}"
        );
    }
    Ok(())
}
