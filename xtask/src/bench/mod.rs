//! `cargo xtask bench`: the service's figures, measured the same way on every machine.
//!
//! Builds release binaries, starts what a scenario needs (a throwaway PostgreSQL cluster
//! like CI's when `--db postgres`, the upstream simulator, the service on loopback ports),
//! drives load with its own load generator (HTTP/1.1 keep-alive, bounded in time), samples
//! the service's RSS and CPU from `/proc`, stops everything (also on an error or Ctrl-C),
//! and prints a table per scenario, the targets met or missed, and one JSON line.
//!
//! Everything lands in `--out` (`target/bench` by default): `bench.json` (the JSON line)
//! and an SVG plot per scenario that ran: `ingress.svg` (accepted callbacks/s and ack
//! latency p50/p99/max per 1 s bucket over the load), `pipeline.svg` (visibility lag
//! p50/p99/max and the accepted rate per rate step), `real.svg` (each callback's lag and
//! RSS over the run) and `soak.svg` (RSS and open fds over the run). The scenarios keep
//! their samples with offsets from the phase start (times they take anyway) and `plot`
//! draws them after the load.
//!
//! Scenarios: `ingress` (closed loop, 32 connections of 200-id callbacks), `pipeline`
//! (unique ids at rising open-loop rates: the highest rate stored within 1 s), `real` (the
//! reference client against the reference upstream: CPU, RSS, lags, deletion lateness)
//! and `soak` (long mixed load: RSS and fds must not grow).
//!
//! Code map: `procs` starts and samples the children, `postgres` the throwaway cluster,
//! `load` has the request and open-loop parts every scenario shares, `store` reads
//! `GET /objects` and `GET /metrics`, `report` formats tables and checks, `plot` writes
//! the SVG line charts.

mod ingress;
mod load;
mod pipeline;
mod plot;
// The throwaway cluster the e2e tests use too, compiled here from its one source file.
#[path = "../../../tests/src/pg_cluster.rs"]
mod postgres;
mod procs;
mod real;
mod report;
mod soak;
mod store;
mod zipkin;

pub use procs::terminate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use serde_json::json;

use report::{Check, Outcome};

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Without a scenario, runs ingress, pipeline and real in turn (about 3 minutes after the build); \
soak runs only when named. Each scenario gets a fresh service, simulator and database. \
The exit status is 0 whenever the measurements ran: a missed target shows as FAIL in the \
tables and as \"pass\": false in the JSON line, which always comes last on stdout. \
The JSON line is also written to bench.json in --out (target/bench by default), with an SVG \
plot per scenario that ran: ingress.svg (callbacks/s and ack latency per second), \
pipeline.svg (lag per rate step), real.svg (lag and RSS over time), soak.svg (RSS and open \
fds over time); the paths written are printed on stderr.")]
pub struct Args {
    /// Scenarios to run, in order [default: ingress pipeline real]
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// Database backend
    #[arg(long, value_enum, default_value_t = Db::Sqlite)]
    db: Db,
    /// Also write the JSON result to this file
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Folder for bench.json and the SVG plots [default: target/bench in the workspace]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Length of each load phase in seconds [default: ingress 20, each pipeline step 10, real 60, soak 600]
    #[arg(long, value_name = "S", visible_alias = "duration-s", value_parser = clap::value_parser!(u64).range(1..))]
    seconds: Option<u64>,
    /// ingress: concurrent connections
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    connections: u64,
    /// pipeline: target rates in ids/s, one step each, stopping after the first failed step
    #[arg(
        long,
        value_name = "IDS_PER_S,…",
        value_delimiter = ',',
        default_values_t = [2_000, 5_000, 10_000, 20_000, 40_000],
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    rates: Vec<u64>,
    /// pipeline: an accepted id not in the store this long after its 202 counts as not visible
    #[arg(long, value_name = "MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    deadline_ms: u64,
    /// pipeline, real: how often the store is read to see ids appear, the lag's resolution [default: pipeline 25, real 250 (its polls count in the service's CPU)]
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    poll_ms: Option<u64>,
    /// The service's expiry.ttl_ms [default: real 10000; the others keep the service's 30000]
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    ttl_ms: Option<u64>,
    /// soak: fresh ids per second, besides the reference client
    #[arg(long, value_name = "IDS_PER_S", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    soak_rate: u64,
    /// ingress: export traces to a discarding Zipkin collector, sampling this ratio (0–1) of
    /// callbacks; compare with a run without it for what telemetry costs
    #[arg(long, value_name = "RATIO")]
    trace_sample: Option<f64>,
    /// ingress: run the service with this auth.mode and send valid credentials (a bearer key,
    /// or a Standard Webhooks signature per callback); compare with a run without it for
    /// what authentication costs
    #[arg(long, value_enum, default_value_t = load::Auth::None)]
    auth: load::Auth,
}

/// What a benchmark measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Closed loop: N connections post 200-id callbacks back to back (memory, ack latency)
    Ingress,
    /// Open loop: fresh ids at rising rates; the highest rate stored with lag p99 ≤ 1 s
    Pipeline,
    /// The reference client (200 ids / 5 s, upstream 300–4000 ms): CPU, RSS, lags, deletions
    Real,
    /// Long mixed load (10 min by default): RSS and open fds must not grow; only when named
    Soak,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Ingress => "ingress",
            Scenario::Pipeline => "pipeline",
            Scenario::Real => "real",
            Scenario::Soak => "soak",
        }
    }
}

/// Which database the service runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Db {
    /// The embedded SQLite file.
    Sqlite,
    /// A throwaway PostgreSQL cluster on loopback.
    Postgres,
}

impl Args {
    /// The scenarios to run: the named ones without repeats, or the default set.
    fn scenarios(&self) -> Vec<Scenario> {
        if self.scenarios.is_empty() {
            return vec![Scenario::Ingress, Scenario::Pipeline, Scenario::Real];
        }
        let mut chosen = Vec::new();
        for &scenario in &self.scenarios {
            if !chosen.contains(&scenario) {
                chosen.push(scenario);
            }
        }
        chosen
    }

    /// `--seconds`, or the scenario's default.
    fn seconds(&self, default: u64) -> Duration {
        Duration::from_secs(self.seconds.unwrap_or(default))
    }
}

async fn run_scenario(
    scenario: Scenario,
    bins: &procs::Bins,
    cluster: Option<&postgres::Cluster>,
    args: &Args,
) -> anyhow::Result<Outcome> {
    match scenario {
        Scenario::Ingress => {
            let connections = usize::try_from(args.connections)?;
            ingress::run(
                bins,
                cluster,
                args.seconds(20),
                connections,
                args.trace_sample,
                args.auth,
            )
            .await
        }
        Scenario::Pipeline => {
            let options = pipeline::Options {
                rates: args.rates.clone(),
                step: args.seconds(10),
                deadline: Duration::from_millis(args.deadline_ms),
                poll: Duration::from_millis(args.poll_ms.unwrap_or(25)),
                ttl_ms: args.ttl_ms,
            };
            pipeline::run(bins, cluster, &options).await
        }
        Scenario::Real => {
            let options = real::Options {
                duration: args.seconds(60),
                poll: Duration::from_millis(args.poll_ms.unwrap_or(250)),
                ttl_ms: args.ttl_ms.unwrap_or(real::DEFAULT_TTL_MS),
            };
            real::run(bins, cluster, options).await
        }
        Scenario::Soak => {
            let options = soak::Options {
                duration: args.seconds(600),
                rate: args.soak_rate,
                ttl_ms: args.ttl_ms,
            };
            soak::run(bins, cluster, options).await
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(ratio) = args.trace_sample {
        anyhow::ensure!(
            (0.0..=1.0).contains(&ratio),
            "--trace-sample must be between 0 and 1, got {ratio}"
        );
    }
    let scenarios = args.scenarios();
    let root = crate::workspace_root()?;
    let bins = procs::build_release(&root).await?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target").join("bench"));
    let mut results = Vec::new();
    let mut checks: Vec<Check> = Vec::new();
    let mut figures = Vec::new();
    for &scenario in &scenarios {
        let cluster = match args.db {
            Db::Postgres => {
                let setup = postgres::Setup {
                    name: "bench",
                    fsync: true,
                    ..postgres::Setup::default()
                };
                let cluster =
                    tokio::task::spawn_blocking(move || postgres::Cluster::start(&setup)).await??;
                eprintln!(
                    "bench: a throwaway PostgreSQL runs on 127.0.0.1:{}",
                    cluster.port()
                );
                Some(cluster)
            }
            Db::Sqlite => None,
        };
        println!();
        println!("## {} ({})", scenario.name(), db_name(args.db));
        // Dropping the scenario kills its children and removes its files; the cluster is
        // stopped here in every case.
        let outcome = tokio::select! {
            outcome = run_scenario(scenario, &bins, cluster.as_ref(), &args) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        if let Some(cluster) = cluster {
            tokio::task::spawn_blocking(move || cluster.stop()).await?;
        }
        let outcome = outcome.with_context(|| format!("bench {}", scenario.name()))?;
        results.push(outcome.json);
        checks.extend(outcome.checks);
        figures.extend(outcome.figure);
    }
    report::print_checks(&checks);
    let failed = checks
        .iter()
        .filter(|check| check.pass == Some(false))
        .count();
    let json = json!({
        "db": db_name(args.db),
        "scenarios": scenarios.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "results": results,
        "checks": checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        "pass": failed == 0,
    });
    let written = write_out(&out, &json, &figures)?;
    println!();
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    for path in written.iter().chain(&args.json) {
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// Writes `bench.json` and each figure's SVG into `out` (created if missing); returns the
/// paths written.
fn write_out(
    out: &Path,
    json: &serde_json::Value,
    figures: &[plot::Figure],
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let path = out.join("bench.json");
    std::fs::write(&path, format!("{json}\n"))
        .with_context(|| format!("write {}", path.display()))?;
    let mut written = vec![path];
    for figure in figures {
        let path = out.join(figure.file);
        plot::write(&path, figure)?;
        written.push(path);
    }
    Ok(written)
}

fn db_name(db: Db) -> &'static str {
    match db {
        Db::Sqlite => "sqlite",
        Db::Postgres => "postgres",
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn no_scenario_runs_the_default_set_without_soak() {
        let args = parse(&[]).unwrap();
        assert_eq!(
            args.scenarios(),
            [Scenario::Ingress, Scenario::Pipeline, Scenario::Real]
        );
        assert_eq!(args.rates, [2_000, 5_000, 10_000, 20_000, 40_000]);
        assert_eq!(args.seconds(20), Duration::from_secs(20));
    }

    #[test]
    fn flags_parse_and_scenarios_keep_their_order_once() {
        let args = parse(&[
            "soak",
            "pipeline",
            "soak",
            "--db",
            "postgres",
            "--rates",
            "100,200",
            "--duration-s",
            "3",
        ])
        .unwrap();
        assert_eq!(args.scenarios(), [Scenario::Soak, Scenario::Pipeline]);
        assert_eq!(args.db, Db::Postgres);
        assert_eq!(args.rates, [100, 200]);
        assert_eq!(args.seconds(60), Duration::from_secs(3));
        assert!(parse(&["nonsense"]).is_err());
        assert!(parse(&["--rates", "100,0"]).is_err(), "a zero rate");
        assert!(parse(&["--seconds", "0"]).is_err());
        assert_eq!(parse(&[]).unwrap().auth, load::Auth::None);
        assert_eq!(
            parse(&["ingress", "--auth", "standard-webhooks"])
                .unwrap()
                .auth,
            load::Auth::StandardWebhooks
        );
        assert_eq!(
            parse(&["--auth", "bearer"]).unwrap().auth,
            load::Auth::Bearer
        );
        assert!(parse(&["--auth", "basic"]).is_err());
        assert_eq!(parse(&[]).unwrap().out, None);
        assert_eq!(
            parse(&["--out", "some/dir"]).unwrap().out,
            Some(PathBuf::from("some/dir"))
        );
    }

    #[test]
    fn the_out_folder_gets_the_json_line_and_one_svg_per_figure() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nested").join("bench");
        let json = json!({ "pass": true });
        let figure = plot::Figure {
            file: "pipeline.svg",
            charts: vec![plot::Chart::new(
                "lag",
                "target rate (ids/s)",
                "lag (ms)",
                vec![plot::Series::new(
                    "p99",
                    vec![(2_000.0, 30.0), (5_000.0, 40.0)],
                )],
            )],
        };
        let written = write_out(&out, &json, &[figure]).unwrap();
        assert_eq!(written, [out.join("bench.json"), out.join("pipeline.svg")]);
        assert_eq!(
            std::fs::read_to_string(out.join("bench.json")).unwrap(),
            "{\"pass\":true}\n"
        );
        let svg = std::fs::read_to_string(out.join("pipeline.svg")).unwrap();
        assert!(svg.contains("target rate (ids/s)") && svg.contains(">\np99\n</text>"));
    }
}
