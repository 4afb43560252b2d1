//! Reading what the service exposes: `GET /objects` pages on the API and the Prometheus
//! text of `GET /metrics` on the admin listener.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use serde_json::Value;

/// The most objects one `GET /objects` page may hold (the API's limit).
pub const MAX_PAGE: usize = 10_000;

/// One stored object as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub id: i64,
    /// `last_seen`, µs since the epoch.
    pub last_seen_us: i64,
    /// `expires_at`, µs since the epoch.
    pub expires_us: i64,
}

/// One page of `GET /objects`.
#[derive(Debug, Default)]
pub struct Page {
    pub rows: Vec<Row>,
    /// The cursor of the next page when this one was full.
    pub next_after: Option<i64>,
}

/// Reads up to `limit` stored objects with ids above `after`, ascending by id.
pub async fn objects(
    client: &reqwest::Client,
    api: SocketAddr,
    after: Option<i64>,
    limit: usize,
) -> anyhow::Result<Page> {
    let url = match after {
        Some(after) => format!("http://{api}/objects?after={after}&limit={limit}"),
        None => format!("http://{api}/objects?limit={limit}"),
    };
    let response = client.get(&url).send().await.context("GET /objects")?;
    if !response.status().is_success() {
        bail!("GET /objects answered {}", response.status());
    }
    let page: Value = response.json().await.context("GET /objects body")?;
    let rows = page["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|object| {
            Some(Row {
                id: object["id"].as_i64()?,
                last_seen_us: rfc3339_micros(object["last_seen"].as_str()?)?,
                expires_us: rfc3339_micros(object["expires_at"].as_str()?)?,
            })
        })
        .collect();
    Ok(Page {
        rows,
        next_after: page["next_after"].as_i64(),
    })
}

/// Parses an RFC 3339 time into microseconds since the epoch.
pub fn rfc3339_micros(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_micros())
}

/// The Prometheus text the admin listener serves at `GET /metrics`.
pub async fn metrics(client: &reqwest::Client, admin: SocketAddr) -> anyhow::Result<String> {
    let response = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .context("GET /metrics")?;
    if !response.status().is_success() {
        bail!("GET /metrics answered {}", response.status());
    }
    Ok(response.text().await?)
}

/// A Prometheus histogram as rendered: cumulative buckets, count and sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// `(upper bound, observations ≤ bound)`, ascending, `+Inf` last.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    /// The upper bound of the bucket holding quantile `q` (0–1): the true quantile is at
    /// most this (bucket resolution). `None` without observations; infinite when the
    /// quantile lies past the last finite bound.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= rank)
            .map(|(bound, _)| *bound)
            .or(Some(f64::INFINITY))
    }

    /// The mean observation, NaN without observations.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.sum / self.count as f64
        }
    }
}

/// The unlabelled histogram `name` in Prometheus `text`, if it was rendered.
pub fn histogram(text: &str, name: &str) -> Option<Histogram> {
    let bucket_prefix = format!("{name}_bucket{{");
    let mut buckets = Vec::new();
    let (mut count, mut sum) = (None, None);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&bucket_prefix) {
            let (labels, value) = rest.split_once('}')?;
            let bound = labels
                .split(',')
                .find_map(|label| label.strip_prefix("le=\""))?
                .trim_end_matches('"');
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            buckets.push((bound, value.trim().parse::<f64>().ok()? as u64));
        } else if let Some(value) = sample(line, &format!("{name}_count")) {
            count = Some(value as u64);
        } else if let Some(value) = sample(line, &format!("{name}_sum")) {
            sum = Some(value);
        }
    }
    if buckets.is_empty() {
        return None;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Some(Histogram {
        buckets,
        count: count?,
        sum: sum.unwrap_or(f64::NAN),
    })
}

/// The sum over every label set of the series `name` (a counter or gauge), if rendered.
pub fn series_sum(text: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let rest = match line.strip_prefix(name) {
            Some(rest) if rest.starts_with(' ') => rest,
            Some(rest) if rest.starts_with('{') => rest.split_once('}').map_or("", |(_, v)| v),
            _ => continue,
        };
        if let Ok(value) = rest.trim().parse::<f64>() {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

/// The value of an unlabelled sample line `name value`.
fn sample(line: &str, name: &str) -> Option<f64> {
    line.strip_prefix(name)?
        .strip_prefix(' ')?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP expiry_lateness_seconds time from the earliest due deadline to the delete of its batch
# TYPE expiry_lateness_seconds histogram
expiry_lateness_seconds_bucket{le=\"0.0005\"} 10
expiry_lateness_seconds_bucket{le=\"0.001\"} 80
expiry_lateness_seconds_bucket{le=\"0.005\"} 97
expiry_lateness_seconds_bucket{le=\"0.05\"} 99
expiry_lateness_seconds_bucket{le=\"0.1\"} 100
expiry_lateness_seconds_bucket{le=\"+Inf\"} 100
expiry_lateness_seconds_sum 0.25
expiry_lateness_seconds_count 100
expiry_lateness_seconds_other 1
fetches_total{outcome=\"online\"} 7
fetches_total{outcome=\"offline\"} 5
fetches_total_extra 100
expired_rows_deleted_total 42
";

    #[test]
    fn reads_a_histogram_and_bounds_its_quantiles() {
        let h = histogram(TEXT, "expiry_lateness_seconds").expect("rendered");
        assert_eq!(h.count, 100);
        assert_eq!(h.buckets.len(), 6);
        assert_eq!(h.quantile_bound(0.5), Some(0.001));
        assert_eq!(h.quantile_bound(0.97), Some(0.005));
        assert_eq!(h.quantile_bound(0.99), Some(0.05));
        assert_eq!(h.quantile_bound(1.0), Some(0.1));
        assert!((h.mean() - 0.0025).abs() < 1e-12);
        assert!(histogram(TEXT, "missing_seconds").is_none());
    }

    #[test]
    fn quantiles_past_the_last_bound_are_unbounded_and_none_without_data() {
        let h = Histogram {
            buckets: vec![(0.05, 1), (f64::INFINITY, 4)],
            count: 4,
            sum: 100.0,
        };
        assert_eq!(h.quantile_bound(0.99), Some(f64::INFINITY));
        let empty = Histogram {
            buckets: vec![(f64::INFINITY, 0)],
            count: 0,
            sum: 0.0,
        };
        assert_eq!(empty.quantile_bound(0.99), None);
    }

    #[test]
    fn sums_a_series_over_its_labels() {
        assert_eq!(series_sum(TEXT, "fetches_total"), Some(12.0));
        assert_eq!(series_sum(TEXT, "expired_rows_deleted_total"), Some(42.0));
        assert_eq!(series_sum(TEXT, "absent_total"), None);
    }
}
