//! Developer commands, run as `cargo xtask <command>`.

mod demo;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Demo(args) => runtime.block_on(demo::run(args)),
    }
}
