//! Child processes for the benchmarks: building, starting and sampling them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Where the release binaries are.
#[derive(Debug)]
pub struct Bins {
    pub callback_service: PathBuf,
    pub client_service: PathBuf,
}

/// Builds both binaries in release mode.
pub async fn build_release(root: &Path) -> anyhow::Result<Bins> {
    eprintln!("bench: building release binaries");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "callback-service",
            "-p",
            "client-service",
        ])
        .status()
        .await
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed: {status}");
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let dir = target.join("release");
    Ok(Bins {
        callback_service: dir.join("callback-service"),
        client_service: dir.join("client-service"),
    })
}

/// A running child whose log lines are watched for the address it listens on.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Proc {
    /// Starts `command` with its stderr watched.
    pub fn spawn(command: &mut Command) -> anyhow::Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = tx.send(line);
            }
        });
        Ok(Self { child, lines })
    }

    /// Waits for a log line containing `marker` and returns the first socket address in it.
    pub async fn address(&mut self, marker: &str) -> anyhow::Result<SocketAddr> {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(marker)
                    && let Some(addr) = line
                        .split(|c: char| c.is_whitespace() || c == '=' || c == '"')
                        .find_map(|word| word.parse::<SocketAddr>().ok())
                {
                    return Some(addr);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(addr)) => Ok(addr),
            _ => bail!("no {marker:?} line from the process"),
        }
    }

    /// Peak resident memory in bytes (VmHWM).
    pub fn rss_peak_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// CPU time used so far (user + system), from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()?)).ok()?;
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        // Clock ticks are 100 per second on Linux.
        Some(Duration::from_millis((utime + stime) * 10))
    }

    /// Sends SIGTERM and waits for a successful exit, killing after 20 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let status = terminate(&mut self.child).await?;
        if !status.success() {
            bail!("exited with {status}");
        }
        Ok(())
    }
}

/// Sends SIGTERM to `child` and waits for it to exit; kills it after 20 s.
pub async fn terminate(child: &mut Child) -> anyhow::Result<std::process::ExitStatus> {
    if let Some(pid) = child.id() {
        // In a terminal, Ctrl-C already reached the children; SIGTERM covers the rest.
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
        Ok(status) => Ok(status?),
        Err(_) => {
            child.kill().await?;
            bail!("a child did not stop within 20 s and was killed")
        }
    }
}

/// The upstream simulator on a free loopback port, answering after 0–5 ms.
pub async fn upstream(bins: &Bins, min_ms: u64, max_ms: u64) -> anyhow::Result<(Proc, SocketAddr)> {
    let mut proc = Proc::spawn(
        Command::new(&bins.client_service)
            .args(["--no-emitter", "--upstream-listen", "127.0.0.1:0"])
            .args([
                "--min-latency-ms",
                &min_ms.to_string(),
                "--max-latency-ms",
                &max_ms.to_string(),
            ])
            .env("RUST_LOG", "info"),
    )?;
    let addr = proc.address("listening on").await?;
    Ok((proc, addr))
}

/// The service on free loopback ports with a fresh database.
pub async fn service(
    bins: &Bins,
    work_dir: &Path,
    database_url: &str,
    upstream: SocketAddr,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let mut proc = Proc::spawn(
        Command::new(&bins.callback_service)
            .current_dir(work_dir)
            .env("RUST_LOG", "info,domain::pipeline=error")
            .env("CALLBACK_HTTP__LISTEN", "127.0.0.1:0")
            .env("CALLBACK_ADMIN__LISTEN", "127.0.0.1:0")
            .env("CALLBACK_DATABASE__URL", database_url)
            .env("CALLBACK_UPSTREAM__BASE_URL", format!("http://{upstream}")),
    )?;
    let addr = proc.address("api listening").await?;
    Ok((proc, addr))
}
