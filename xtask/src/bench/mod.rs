//! `cargo xtask bench`: the service's figures, measured the same way on every machine.
//!
//! Builds release binaries, starts what a scenario needs (a throwaway PostgreSQL cluster
//! like CI's when `--db postgres`, the upstream simulator at 0–5 ms, the service on
//! loopback ports), drives load with its own load generator (HTTP/1.1 keep-alive, bounded
//! in time), samples the service's RSS and CPU from `/proc`, stops everything, and prints a
//! table plus one JSON line.
//!
//! Scenarios so far: `ingress` (32 connections posting 200-id callbacks back to back).

mod ingress;
mod postgres;
mod procs;

pub use procs::terminate;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scenarios to run (default: all): ingress
    scenarios: Vec<String>,
    /// Database backend
    #[arg(long, value_enum, default_value_t = Db::Sqlite)]
    db: Db,
    /// Also write the JSON result to this file
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// How long each load phase lasts, in seconds
    #[arg(long, value_name = "S", default_value_t = 20)]
    seconds: u64,
    /// Concurrent connections of the ingress load
    #[arg(long, value_name = "N", default_value_t = 32)]
    connections: usize,
}

/// Which database the service runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Db {
    /// The embedded SQLite file.
    Sqlite,
    /// A throwaway PostgreSQL cluster on loopback.
    Postgres,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let scenarios = if args.scenarios.is_empty() {
        vec!["ingress".to_owned()]
    } else {
        args.scenarios.clone()
    };
    for scenario in &scenarios {
        if scenario != "ingress" {
            bail!("unknown scenario {scenario:?}; known: ingress");
        }
    }
    let root = crate::workspace_root()?;
    let bins = procs::build_release(&root).await?;
    let mut results = Vec::new();
    for scenario in &scenarios {
        let cluster = match args.db {
            Db::Postgres => Some(postgres::Cluster::start().await?),
            Db::Sqlite => None,
        };
        let result = match scenario.as_str() {
            "ingress" => {
                ingress::run(
                    &bins,
                    cluster.as_ref(),
                    Duration::from_secs(args.seconds),
                    args.connections,
                )
                .await?
            }
            _ => unreachable!("checked above"),
        };
        if let Some(cluster) = cluster {
            cluster.stop().await;
        }
        results.push(result);
    }
    let json = serde_json::json!({
        "db": format!("{:?}", args.db).to_lowercase(),
        "results": results,
    });
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}
