//! The profiles on the admin listener of the real `callback-service`: a CPU profile taken
//! under load is a pprof profile naming the service's functions, the flamegraph is an SVG,
//! one CPU profile runs at a time, and the heap profile is a pprof profile of the service
//! when `telemetry.heap_profiling` is on and says how to turn it on when it is off.
//!
//! Linux only (jemalloc heap profiles); SQLite only: profiles do not depend on the backend.

#![cfg(target_os = "linux")]

use std::io::Read as _;
use std::time::Duration;

use pprof::protos::{Message as _, Profile};
use serde_json::{Value, json};
use tests::{Backend, Service, Upstream, http};

const TTL: Duration = Duration::from_secs(60);

async fn service(env: &[(&str, &str)]) -> anyhow::Result<(Upstream, Service)> {
    let upstream = Upstream::start(0, 5).await?;
    let service = Service::start(Backend::Sqlite, &upstream.base_url(), TTL, env)
        .await?
        .expect("sqlite is always available");
    Ok((upstream, service))
}

/// Posts callbacks of 200 ids, one after the other, for as long as it is polled.
async fn load(service: &Service) -> anyhow::Result<()> {
    let client = http();
    let body = json!({ "object_ids": (0..200).collect::<Vec<i64>>() }).to_string();
    loop {
        let status = client
            .post(service.url("/callback"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?
            .status();
        anyhow::ensure!(status == 202, "POST /callback answered {status}");
    }
}

/// `GET admin path` while [`load`] runs: status, content type and body.
async fn get_under_load(service: &Service, path: &str) -> anyhow::Result<(u16, String, Vec<u8>)> {
    let get = async {
        let response = http().get(service.admin_url(path)).send().await?;
        let status = response.status().as_u16();
        let content_type = tests::content_type(&response);
        let body = response.bytes().await?.to_vec();
        anyhow::Ok((status, content_type, body))
    };
    tokio::select! {
        answer = get => answer,
        failed = load(service) => Err(failed.expect_err("the load runs until the answer")),
    }
}

/// A gzipped pprof profile, decoded.
fn decode(body: &[u8]) -> anyhow::Result<Profile> {
    anyhow::ensure!(
        body.starts_with(&[0x1f, 0x8b]),
        "not gzip: {:?}",
        &body[..body.len().min(16)]
    );
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(body).read_to_end(&mut raw)?;
    Ok(Profile::decode(raw.as_slice())?)
}

/// The string at `index` of the profile's string table.
fn string(profile: &Profile, index: i64) -> &str {
    usize::try_from(index)
        .ok()
        .and_then(|i| profile.string_table.get(i))
        .map_or("<out of range>", String::as_str)
}

/// The names of the functions the profile's samples went through.
fn function_names(profile: &Profile) -> Vec<&str> {
    profile
        .function
        .iter()
        .map(|f| string(profile, f.name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_profile_under_load_is_pprof_naming_the_service_functions() -> anyhow::Result<()> {
    let (_upstream, service) = service(&[]).await?;

    let (status, content_type, body) =
        get_under_load(&service, "/debug/pprof/profile?seconds=1").await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(content_type, "application/octet-stream");
    let profile = decode(&body)?;

    let types: Vec<(&str, &str)> = profile
        .sample_type
        .iter()
        .map(|t| (string(&profile, t.ty), string(&profile, t.unit)))
        .collect();
    assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
    assert!(!profile.sample.is_empty(), "the load used CPU time");
    let names = function_names(&profile);
    assert!(
        names.iter().any(|name| {
            [
                "http_transport::",
                "domain::",
                "storage::",
                "callback_service::",
            ]
            .iter()
            .any(|ours| name.contains(ours))
        }),
        "no function of the service among {} sampled functions: {:?}",
        names.len(),
        &names[..names.len().min(40)]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flamegraph_is_an_svg_document() -> anyhow::Result<()> {
    let (_upstream, service) = service(&[]).await?;

    let (status, content_type, body) =
        get_under_load(&service, "/debug/pprof/profile?seconds=1&format=flamegraph").await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(content_type, "image/svg+xml");
    let svg = String::from_utf8(body)?;
    assert!(
        svg.starts_with("<?xml") || svg.starts_with("<svg"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    assert!(svg.contains("</svg>"), "an svg document");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cpu_profile_runs_at_a_time_and_bad_queries_are_refused() -> anyhow::Result<()> {
    let (_upstream, service) = service(&[]).await?;
    let client = http();

    // Two profiles of two seconds asked together: one runs, the other is refused.
    let url = service.admin_url("/debug/pprof/profile?seconds=2");
    let (first, second) = tokio::join!(client.get(&url).send(), client.get(&url).send());
    let (first, second) = (first?, second?);
    let mut statuses = [first.status().as_u16(), second.status().as_u16()];
    let refused = if statuses[0] == 409 { first } else { second };
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409]);
    let envelope: Value = refused.json().await?;
    assert_eq!(envelope["error"], "profile_in_progress", "{envelope}");

    for query in ["seconds=0", "seconds=301", "seconds=x", "format=svg"] {
        let response = client
            .get(service.admin_url(&format!("/debug/pprof/profile?{query}")))
            .send()
            .await?;
        assert_eq!(response.status(), 400, "{query}");
        let envelope: Value = response.json().await?;
        assert_eq!(envelope["error"], "invalid_query", "{query}: {envelope}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heap_profile_is_pprof_of_the_memory_in_use() -> anyhow::Result<()> {
    let (_upstream, service) = service(&[]).await?;

    let (status, content_type, body) = get_under_load(&service, "/debug/pprof/heap").await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(content_type, "application/octet-stream");
    let profile = decode(&body)?;
    let types: Vec<(&str, &str)> = profile
        .sample_type
        .iter()
        .map(|t| (string(&profile, t.ty), string(&profile, t.unit)))
        .collect();
    assert_eq!(types, [("inuse_space", "bytes")]);
    // Samples are taken every 512 KiB allocated on average, so a young process may have
    // none still in use; the mappings say whose heap this is.
    let mappings: Vec<&str> = profile
        .mapping
        .iter()
        .map(|m| string(&profile, m.filename))
        .collect();
    assert!(
        mappings
            .iter()
            .any(|file| file.ends_with("/callback-service")),
        "the service's own binary is mapped: {mappings:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_heap_profiling_off_the_heap_profile_says_how_to_turn_it_on() -> anyhow::Result<()> {
    let (_upstream, service) = service(&[("CALLBACK_TELEMETRY__HEAP_PROFILING", "false")]).await?;

    let response = http()
        .get(service.admin_url("/debug/pprof/heap"))
        .send()
        .await?;
    assert_eq!(response.status(), 409);
    let envelope: Value = response.json().await?;
    assert_eq!(envelope["error"], "heap_profiling_disabled", "{envelope}");
    let message = envelope["message"].as_str().unwrap_or_default();
    assert!(message.contains("telemetry.heap_profiling"), "{message}");

    // CPU profiles do not depend on it.
    let response = http()
        .get(service.admin_url("/debug/pprof/profile?seconds=1"))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    Ok(())
}
