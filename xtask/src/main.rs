//! Developer commands, run as `cargo xtask <command>`.

mod bench;
mod compose;
mod demo;

use std::path::{Path, PathBuf};

use anyhow::Context;

use clap::{Parser, Subcommand};

/// Developer commands for callback-service.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build and run both binaries on SQLite and print client-service's reports
    Demo(demo::Args),
    /// Measure throughput, latency and memory with release binaries
    Bench(bench::Args),
    /// Run the whole stack in containers with Docker Compose (up, down, logs, ps)
    Compose(compose::Args),
}

/// The workspace root (the folder above `xtask/`).
fn workspace_root() -> anyhow::Result<PathBuf> {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    Ok(xtask_dir
        .parent()
        .context("xtask lives in the workspace root")?
        .to_path_buf())
}

fn main() -> anyhow::Result<()> {
    // Before any reqwest client is built: reqwest has no rustls provider of its own.
    tls::install_default_provider();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Demo(args) => runtime.block_on(demo::run(args)),
        Command::Bench(args) => runtime.block_on(bench::run(args)),
        Command::Compose(args) => runtime.block_on(compose::run(args)),
    }
}
