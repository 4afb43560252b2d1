//! Figures and their presentation: percentiles, Markdown tables, checks against targets.

use serde_json::{Value, json};

/// The value at percentile `p` (0–100) of ascending `sorted` values, by nearest rank; NaN
/// when there are none. Infinite values (ids never seen) sort last and count.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Sorts `values` ascending for [`percentile`] (infinities last).
pub fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_unstable_by(f64::total_cmp);
    values
}

/// `12.3 ms`, `∞` for a value never reached, `?` when unknown.
pub fn ms(value: f64) -> String {
    if value.is_nan() {
        "?".to_owned()
    } else if value.is_infinite() {
        "∞".to_owned()
    } else if value >= 100.0 {
        format!("{value:.0} ms")
    } else {
        format!("{value:.1} ms")
    }
}

/// Bytes as `12.3 MB` (MiB), `?` when unknown.
pub fn mb(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "?".to_owned(), |b| format!("{:.1} MB", to_mb(b)))
}

/// Bytes in MiB.
pub fn to_mb(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// A JSON number, or null for NaN and infinities (JSON has neither).
pub fn num(value: f64) -> Value {
    if value.is_finite() {
        json!((value * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

/// A Markdown table printed to stdout.
#[derive(Debug)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds one row, a cell per header.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len(), "one cell per column");
        self.rows.push(cells);
    }

    /// Prints the table after an empty line.
    pub fn print(&self) {
        println!();
        println!("| {} |", self.headers.join(" | "));
        println!("|{}", " --- |".repeat(self.headers.len()));
        for row in &self.rows {
            println!("| {} |", row.join(" | "));
        }
    }
}

/// Prints legend lines under a table.
pub fn legend(lines: &[&str]) {
    for line in lines {
        println!("  {line}");
    }
}

/// One figure compared with its target from the issue.
#[derive(Debug, Clone)]
pub struct Check {
    pub scenario: &'static str,
    /// What is compared, e.g. `RSS peak`.
    pub what: String,
    /// The target, e.g. `≤ 150 MB`.
    pub target: String,
    /// The measured figure, formatted.
    pub measured: String,
    /// `None` when the figure is missing or there is no target for this configuration.
    pub pass: Option<bool>,
}

impl Check {
    /// A check of `measured` against `target`.
    pub fn new(
        scenario: &'static str,
        what: impl Into<String>,
        target: impl Into<String>,
        measured: impl Into<String>,
        pass: Option<bool>,
    ) -> Self {
        Self {
            scenario,
            what: what.into(),
            target: target.into(),
            measured: measured.into(),
            pass,
        }
    }

    /// The check as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "check": self.what,
            "target": self.target,
            "measured": self.measured,
            "pass": self.pass,
        })
    }
}

/// `PASS`, `FAIL`, or `—` when there is nothing to judge.
pub fn verdict(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "PASS",
        Some(false) => "FAIL",
        None => "—",
    }
}

/// What one scenario reports: its JSON object and its checks against the targets.
#[derive(Debug)]
pub struct Outcome {
    pub json: Value,
    pub checks: Vec<Check>,
    /// What the scenario plots, written next to the JSON.
    pub figure: Option<super::plot::Figure>,
}

/// Prints every check of the run as one table.
pub fn print_checks(checks: &[Check]) {
    if checks.is_empty() {
        return;
    }
    let mut table = Table::new(&["scenario", "check", "target", "measured", "result"]);
    for check in checks {
        table.row(vec![
            check.scenario.to_owned(),
            check.what.clone(),
            check.target.clone(),
            check.measured.clone(),
            verdict(check.pass).to_owned(),
        ]);
    }
    println!();
    println!("targets:");
    table.print();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank_and_counts_infinities() {
        let values = sorted(vec![5.0, 1.0, f64::INFINITY, 3.0, 2.0]);
        assert_eq!(values[4], f64::INFINITY);
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert_eq!(percentile(&values, 50.0), 3.0);
        assert_eq!(percentile(&values, 100.0), f64::INFINITY);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn formats_say_what_is_unknown_or_never_reached() {
        assert_eq!(ms(f64::NAN), "?");
        assert_eq!(ms(f64::INFINITY), "∞");
        assert_eq!(ms(1.26), "1.3 ms");
        assert_eq!(ms(1234.0), "1234 ms");
        assert_eq!(mb(Some(3 * 1_048_576)), "3.0 MB");
        assert_eq!(num(f64::INFINITY), Value::Null);
        assert_eq!(num(1.23456), json!(1.235));
    }
}
