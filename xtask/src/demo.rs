//! `cargo xtask demo`: the product at work in one command.
//!
//! Builds both binaries, starts callback-service on its embedded SQLite file and
//! client-service (upstream simulator and callback emitter) with their default addresses,
//! prints the client's one-line reports and what the service stores, and stops both
//! cleanly on Ctrl-C or after `--duration-s`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// Options of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Stop by itself after this many seconds (default: run until Ctrl-C)
    #[arg(long, value_name = "N")]
    duration_s: Option<u64>,
    /// TTL of stored objects, so expiry is visible sooner than the 30 s default
    #[arg(long, value_name = "MS", default_value_t = 12_000)]
    ttl_ms: u64,
    /// Build and run release binaries
    #[arg(long)]
    release: bool,
}

const API: &str = "http://127.0.0.1:9090";

pub async fn run(args: Args) -> anyhow::Result<()> {
    let root = crate::workspace_root()?;
    let bin_dir = build(&root, args.release).await?;

    println!(
        "demo: starting callback-service (API {API}, SQLite at data/callback-service.db, ttl {} ms)",
        args.ttl_ms
    );
    let mut service = spawn(
        Command::new(bin_dir.join("callback-service"))
            .current_dir(&root)
            .args(["--ttl-ms", &args.ttl_ms.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            ),
        "service",
    )?;
    wait_until_healthy(&mut service).await?;
    println!("demo: starting client-service (upstream simulator on :9010, a callback every 5 s)");
    let mut client = spawn(
        Command::new(bin_dir.join("client-service"))
            .current_dir(&root)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        "client",
    )?;
    println!("demo: press Ctrl-C to stop");

    let stop_after = async {
        match args.duration_s {
            Some(seconds) => tokio::time::sleep(Duration::from_secs(seconds)).await,
            None => std::future::pending().await,
        }
    };
    let mut last_seen_ids = BTreeSet::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    tokio::pin!(stop_after);
    let reason = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break "Ctrl-C",
            () = &mut stop_after => break "--duration-s elapsed",
            status = service.wait() => bail!("callback-service exited early: {status:?}"),
            status = client.wait() => bail!("client-service exited early: {status:?}"),
            _ = ticker.tick() => print_store_summary(&mut last_seen_ids).await,
        }
    };
    println!("demo: {reason}; stopping both services");
    let client_status = crate::bench::terminate(&mut client).await?;
    let service_status = crate::bench::terminate(&mut service).await?;
    println!(
        "demo: client-service exited with {client_status}, callback-service with {service_status}"
    );
    if !(client_status.success() && service_status.success()) {
        bail!("a service did not stop cleanly");
    }
    Ok(())
}

async fn build(root: &Path, release: bool) -> anyhow::Result<PathBuf> {
    println!(
        "demo: building callback-service and client-service (the first build takes a few minutes; errors are shown)"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(root).args([
        "build",
        "--quiet",
        "-p",
        "callback-service",
        "-p",
        "client-service",
    ]);
    if release {
        command.arg("--release");
    }
    let status = command.status().await.context("run cargo build")?;
    if !status.success() {
        bail!("cargo build failed: {status}");
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join(if release { "release" } else { "debug" }))
}

/// Starts a child; its report lines are printed as they are, warnings and errors prefixed.
fn spawn(command: &mut Command, name: &'static str) -> anyhow::Result<Child> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    forward(child.stdout.take().context("stdout")?, name, true);
    forward(child.stderr.take().context("stderr")?, name, false);
    Ok(child)
}

fn forward(stream: impl AsyncRead + Unpin + Send + 'static, name: &'static str, stdout: bool) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if stdout && line.starts_with("round=") {
                println!("client  | {line}");
            } else if line.contains("WARN")
                || line.contains("ERROR")
                || line.contains("listening")
                || line.contains("stopped")
            {
                println!("{name:<7} | {line}");
            }
        }
    });
}

async fn wait_until_healthy(service: &mut Child) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if let Some(status) = service.try_wait()? {
            bail!("callback-service exited at start with {status} (is port 9090 or 6060 in use?)");
        }
        if let Ok(response) = client.get(format!("{API}/")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("callback-service did not become healthy within 30 s")
}

/// Prints what the store holds now, and what appeared and expired since the last look.
async fn print_store_summary(previous: &mut BTreeSet<i64>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build();
    let Ok(client) = client else { return };
    let Ok(response) = client
        .get(format!("{API}/objects?limit=10000"))
        .send()
        .await
    else {
        println!("store   | (service not answering)");
        return;
    };
    let Ok(body) = response.json::<serde_json::Value>().await else {
        return;
    };
    let ids: BTreeSet<i64> = body["objects"]
        .as_array()
        .map(|objects| objects.iter().filter_map(|o| o["id"].as_i64()).collect())
        .unwrap_or_default();
    let odd = ids.iter().filter(|id| *id % 2 != 0).count();
    let new = ids.difference(previous).count();
    let expired = previous.difference(&ids).count();
    println!(
        "store   | {} objects stored now: {new} new, {expired} expired since the last look, {odd} odd",
        ids.len()
    );
    *previous = ids;
}
