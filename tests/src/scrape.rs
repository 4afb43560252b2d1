//! Reading `GET /metrics` of a running service: the Prometheus text format parsed into
//! samples and metric families' types.

use std::collections::BTreeMap;

use crate::{Service, http};

/// One sample: the series name and its labels, sorted by name.
pub type Series = (String, Vec<(String, String)>);

/// `GET /metrics` on the admin listener of `service`: its content type and its text.
pub async fn scrape(service: &Service) -> anyhow::Result<(String, String)> {
    let response = http().get(service.admin_url("/metrics")).send().await?;
    anyhow::ensure!(
        response.status() == 200,
        "GET /metrics answered {}",
        response.status()
    );
    let content_type = crate::content_type(&response);
    Ok((content_type, response.text().await?))
}

/// Parses the Prometheus text format into samples; comment lines are skipped.
pub fn parse(text: &str) -> anyhow::Result<BTreeMap<Series, f64>> {
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| anyhow::anyhow!("no value in {line:?}"))?;
        let value: f64 = value.parse()?;
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or(rest);
                let mut labels: Vec<(String, String)> = inner
                    .split("\",")
                    .filter(|pair| !pair.is_empty())
                    .filter_map(|pair| pair.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                    .collect();
                labels.sort();
                (name, labels)
            }
        };
        samples.insert((name.to_owned(), labels), value);
    }
    Ok(samples)
}

/// The value of `name{labels}`, if the series exists.
pub fn value(samples: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    samples.get(&(name.to_owned(), labels)).copied()
}

/// The type of every metric family (`counter`, `gauge`, `histogram`, …) by family name,
/// from the `# TYPE` lines.
pub fn types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}
