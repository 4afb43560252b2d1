//! `ingress`: N connections post 200-id callbacks (ids 0..99) back to back.
//!
//! Reports accepted callbacks/s, ack latency p50/p99/p99.9, non-2xx answers, the service's
//! RSS peak and CPU, and "kept up": how long after the load stops until every even id of
//! the last accepted callbacks is stored with a `last_seen` after that callback was sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{Value, json};

use super::postgres::Cluster;
use super::procs::{self, Bins};

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

#[derive(Debug, Default)]
struct Tally {
    latencies_us: Vec<u32>,
    accepted: u64,
    non_2xx: u64,
    errors: u64,
    /// For each id in a callback that got a 202: the latest send time.
    last_sent: BTreeMap<i64, i64>,
}

fn body(seed: u64) -> (Vec<i64>, String) {
    let mut rng = fastrand_like(seed);
    let ids: Vec<i64> = (0..200).map(|_| (rng() % 100) as i64).collect();
    let body = json!({ "object_ids": ids }).to_string();
    (ids, body)
}

/// A tiny xorshift generator: the load needs variety, not quality.
fn fastrand_like(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1_000.0
}

async fn load(api: SocketAddr, seconds: Duration, connections: usize) -> anyhow::Result<Tally> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(5))
        .build()?;
    let bodies: Arc<Vec<(Vec<i64>, String)>> = Arc::new((0..64).map(body).collect());
    let url = format!("http://{api}/callback");
    let end = Instant::now() + seconds;
    let workers: Vec<_> = (0..connections)
        .map(|worker| {
            let (client, bodies, url) = (client.clone(), bodies.clone(), url.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut n = worker;
                while Instant::now() < end {
                    n += connections;
                    let (ids, body) = &bodies[n % bodies.len()];
                    let sent_at = now_micros();
                    let started = Instant::now();
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    let took = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                    match response {
                        Ok(r) if r.status().as_u16() == 202 => {
                            let _ = r.bytes().await;
                            tally.accepted += 1;
                            tally.latencies_us.push(took);
                            for &id in ids {
                                tally.last_sent.insert(id, sent_at);
                            }
                        }
                        Ok(r) => {
                            let _ = r.bytes().await;
                            tally.non_2xx += 1;
                        }
                        Err(_) => tally.errors += 1,
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for worker in workers {
        let t = worker.await?;
        total.latencies_us.extend(t.latencies_us);
        total.accepted += t.accepted;
        total.non_2xx += t.non_2xx;
        total.errors += t.errors;
        for (id, at) in t.last_sent {
            let kept = total.last_sent.entry(id).or_insert(at);
            *kept = (*kept).max(at);
        }
    }
    Ok(total)
}

/// Time from the end of the load until every even id is stored fresh, or `None` after 60 s.
async fn kept_up(api: SocketAddr, owed: &BTreeMap<i64, i64>) -> anyhow::Result<Option<Duration>> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let page: Value = client
            .get(format!("http://{api}/objects?limit=10000"))
            .send()
            .await?
            .json()
            .await?;
        let mut stored = BTreeMap::new();
        for object in page["objects"].as_array().into_iter().flatten() {
            if let (Some(id), Some(seen)) = (object["id"].as_i64(), object["last_seen"].as_str()) {
                stored.insert(id, seen.to_owned());
            }
        }
        let fresh = owed
            .iter()
            .filter(|(id, _)| *id % 2 == 0)
            .all(|(id, sent)| {
                stored
                    .get(id)
                    .and_then(|seen| parse_rfc3339_micros(seen))
                    .is_some_and(|seen| seen >= *sent)
            });
        if fresh {
            return Ok(Some(started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(None)
}

/// Parses an RFC 3339 time into microseconds since the epoch.
fn parse_rfc3339_micros(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_micros())
}

pub async fn run(
    bins: &Bins,
    cluster: Option<&Cluster>,
    seconds: Duration,
    connections: usize,
) -> anyhow::Result<Value> {
    let work = std::env::temp_dir().join(format!("callback-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let database_url = match cluster {
        Some(cluster) => cluster.url.clone(),
        None => format!("sqlite://{}", work.join("bench.db").display()),
    };
    let (upstream, upstream_addr) = procs::upstream(bins, 0, 5).await?;
    let (service, api) = procs::service(bins, &work, &database_url, upstream_addr).await?;
    eprintln!(
        "bench: ingress, {connections} connections, {} s",
        seconds.as_secs()
    );
    let cpu_before = service.cpu_time();
    let wall = Instant::now();
    let tally = load(api, seconds, connections).await?;
    let elapsed = wall.elapsed();
    let cpu = service
        .cpu_time()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    let kept_up = kept_up(api, &tally.last_sent)
        .await
        .context("read the store")?;
    let rss = service.rss_peak_bytes();
    service.stop().await.context("stop callback-service")?;
    upstream.stop().await.context("stop client-service")?;
    let _ = std::fs::remove_dir_all(&work);

    let mut sorted = tally.latencies_us.clone();
    sorted.sort_unstable();
    let per_second = tally.accepted as f64 / elapsed.as_secs_f64();
    let cpu_percent = cpu.map(|cpu| 100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64());
    let result = json!({
        "scenario": "ingress",
        "connections": connections,
        "seconds": elapsed.as_secs_f64(),
        "accepted": tally.accepted,
        "accepted_per_s": per_second.round(),
        "ack_p50_ms": percentile(&sorted, 50.0),
        "ack_p99_ms": percentile(&sorted, 99.0),
        "ack_p999_ms": percentile(&sorted, 99.9),
        "non_2xx": tally.non_2xx,
        "errors": tally.errors,
        "rss_peak_mb": rss.map(|b| b as f64 / 1_048_576.0),
        "service_cpu_percent": cpu_percent,
        "kept_up_ms": kept_up.map(|d| d.as_secs_f64() * 1_000.0),
    });
    println!();
    println!(
        "| scenario | accepted/s | ack p50 | p99 | p99.9 | non-2xx | errors | RSS peak | service CPU | kept up |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| ingress | {per_second:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} | {} | {} | {} |",
        percentile(&sorted, 50.0),
        percentile(&sorted, 99.0),
        percentile(&sorted, 99.9),
        tally.non_2xx,
        tally.errors,
        rss.map_or("?".into(), |b| format!("{:.1} MB", b as f64 / 1_048_576.0)),
        cpu_percent.map_or("?".into(), |p| format!("{p:.0} %")),
        kept_up.map_or("not within 60 s".into(), |d| format!(
            "{:.0} ms",
            d.as_secs_f64() * 1_000.0
        )),
    );
    Ok(result)
}
