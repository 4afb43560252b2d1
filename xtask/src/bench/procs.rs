//! Child processes for the benchmarks: building, starting, sampling and stopping them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::postgres::Cluster;

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

/// Log lines kept for the address search; later ones are dropped, never blocking the child.
const LOG_BUFFER: usize = 256;

/// Warning and error lines kept word for word; later ones are only counted.
const PROBLEMS_KEPT: usize = 5;

/// The warnings and errors a child logged: how many, and the first few.
#[derive(Debug, Default, Clone)]
pub struct Problems {
    pub count: u64,
    pub first: Vec<String>,
}

impl Problems {
    /// Counts `line` when it is a warning or an error of the text log format
    /// (`<time>  WARN <target>: …`).
    fn note(&mut self, line: &str) {
        let level = line.split_whitespace().nth(1);
        if matches!(level, Some("WARN" | "ERROR")) {
            self.count += 1;
            if self.first.len() < PROBLEMS_KEPT {
                self.first.push(line.to_owned());
            }
        }
    }
}

/// A running child whose log lines are watched for the address it listens on, and for
/// warnings and errors.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    problems: Arc<Mutex<Problems>>,
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
        let (tx, lines) = mpsc::channel(LOG_BUFFER);
        let problems = Arc::new(Mutex::new(Problems::default()));
        let noted = Arc::clone(&problems);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                noted.lock().expect("not poisoned").note(&line);
                // Keep reading when nobody looks any more: a full pipe would stall the child.
                let _ = tx.try_send(line);
            }
        });
        Ok(Self {
            child,
            lines,
            problems,
        })
    }

    /// The warnings and errors logged so far.
    pub fn problems(&self) -> Problems {
        self.problems.lock().expect("not poisoned").clone()
    }

    /// Waits for a log line containing `marker` and returns the first socket address in it.
    pub async fn address(&mut self, marker: &str) -> anyhow::Result<SocketAddr> {
        let mut tail = VecDeque::new();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(marker)
                    && let Some(addr) = line
                        .split(|c: char| c.is_whitespace() || c == '=' || c == '"')
                        .find_map(|word| word.parse::<SocketAddr>().ok())
                {
                    return Some(addr);
                }
                if tail.len() == 20 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            None
        })
        .await;
        match found {
            Ok(Some(addr)) => Ok(addr),
            _ => {
                let tail: Vec<String> = tail.into_iter().collect();
                bail!(
                    "no {marker:?} line from the process; its last lines:\n{}",
                    tail.join("\n")
                )
            }
        }
    }

    /// A `kB` field of `/proc/<pid>/status`, in bytes.
    fn status_bytes(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// Resident memory now, in bytes (VmRSS).
    pub fn rss_bytes(&self) -> Option<u64> {
        self.status_bytes("VmRSS:")
    }

    /// Peak resident memory since start, in bytes (VmHWM).
    pub fn rss_peak_bytes(&self) -> Option<u64> {
        self.status_bytes("VmHWM:")
    }

    /// Open file descriptors now (entries of `/proc/<pid>/fd`).
    pub fn fd_count(&self) -> Option<usize> {
        let dir = std::fs::read_dir(format!("/proc/{}/fd", self.child.id()?)).ok()?;
        Some(dir.count())
    }

    /// CPU time used so far (user + system), from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()?)).ok()?;
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        // /proc counts in USER_HZ, which is 100 per second on every Linux ABI.
        Some(Duration::from_millis((utime + stime) * 10))
    }

    /// Starts measuring this child's CPU use from now.
    pub fn cpu_meter(&self) -> CpuMeter {
        CpuMeter {
            cpu: self.cpu_time(),
            wall: std::time::Instant::now(),
        }
    }

    /// Fails when the child has exited.
    pub fn ensure_running(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{name} exited during the benchmark: {status}");
        }
        Ok(())
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

/// A child's CPU use since a starting point.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    cpu: Option<Duration>,
    wall: std::time::Instant,
}

impl CpuMeter {
    /// (utime + stime) / wall time since the start, in % of one core; `None` when
    /// `/proc` could not be read.
    pub fn percent(&self, proc: &Proc) -> Option<f64> {
        let wall = self.wall.elapsed().as_secs_f64();
        let used = proc.cpu_time()?.checked_sub(self.cpu?)?;
        (wall > 0.0).then(|| 100.0 * used.as_secs_f64() / wall)
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

/// A temporary folder removed when dropped, also when a scenario fails or is interrupted.
#[derive(Debug)]
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a scenario runs against: the upstream simulator and the service on a fresh
/// database, both on loopback ports. Dropping it kills both (`kill_on_drop`).
#[derive(Debug)]
pub struct Stack {
    pub service: Proc,
    pub upstream: Proc,
    /// The service's public API.
    pub api: SocketAddr,
    /// The service's admin listener (`GET /metrics`).
    pub admin: SocketAddr,
    /// The discarding Zipkin collector, when traces are exported.
    pub zipkin: Option<super::zipkin::Sink>,
    work: WorkDir,
}

/// How a [`Stack`] is started.
#[derive(Debug, Clone, Copy)]
pub struct StackOptions {
    /// The simulator's answer time range, in milliseconds.
    pub latency_ms: (u64, u64),
    /// The service's `expiry.ttl_ms`; `None` keeps its default (30 s).
    pub ttl_ms: Option<u64>,
    /// Export traces to a discarding Zipkin collector, sampling this ratio of callbacks
    /// (`telemetry.sample_ratio`); `None` leaves export off.
    pub trace_sample: Option<f64>,
}

impl Stack {
    /// Starts the simulator, then the service on `cluster` or on a SQLite file of its own.
    pub async fn start(
        bins: &Bins,
        cluster: Option<&Cluster>,
        scenario: &str,
        options: StackOptions,
    ) -> anyhow::Result<Self> {
        Self::start_with_env(bins, cluster, scenario, options, &[]).await
    }

    /// [`Stack::start`] with more `CALLBACK_…` variables for the service (`--auth`).
    pub async fn start_with_env(
        bins: &Bins,
        cluster: Option<&Cluster>,
        scenario: &str,
        options: StackOptions,
        service_env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let work = WorkDir(
            std::env::temp_dir().join(format!("callback-bench-{}-{scenario}", std::process::id())),
        );
        std::fs::create_dir_all(&work.0)?;
        let database_url = match cluster {
            Some(cluster) => cluster.url.clone(),
            None => format!("sqlite://{}", work.0.join("bench.db").display()),
        };
        let (min_ms, max_ms) = options.latency_ms;
        let mut upstream = Proc::spawn(
            Command::new(&bins.client_service)
                .args(["--no-emitter", "--upstream-listen", "127.0.0.1:0"])
                .args(["--min-latency-ms", &min_ms.to_string()])
                .args(["--max-latency-ms", &max_ms.to_string()])
                .env("RUST_LOG", "info"),
        )
        .context("start client-service")?;
        let upstream_addr = upstream
            .address("listening on")
            .await
            .context("client-service")?;
        let mut command = Command::new(&bins.callback_service);
        command
            .current_dir(&work.0)
            .env("RUST_LOG", "info,domain::pipeline=error")
            .env("CALLBACK_HTTP__LISTEN", "127.0.0.1:0")
            .env("CALLBACK_ADMIN__LISTEN", "127.0.0.1:0")
            .env("CALLBACK_DATABASE__URL", &database_url)
            .env(
                "CALLBACK_UPSTREAM__BASE_URL",
                format!("http://{upstream_addr}"),
            );
        if let Some(ttl_ms) = options.ttl_ms {
            command.env("CALLBACK_EXPIRY__TTL_MS", ttl_ms.to_string());
        }
        command.envs(service_env.iter().map(|(key, value)| (*key, value)));
        let zipkin = match options.trace_sample {
            Some(ratio) => {
                let sink = super::zipkin::Sink::start().await?;
                command
                    .env("CALLBACK_TELEMETRY__ZIPKIN_ENDPOINT", sink.endpoint())
                    .env("CALLBACK_TELEMETRY__SAMPLE_RATIO", ratio.to_string());
                Some(sink)
            }
            None => None,
        };
        let mut service = Proc::spawn(&mut command).context("start callback-service")?;
        let api = service
            .address("api listening")
            .await
            .context("callback-service")?;
        // The admin line follows the api line.
        let admin = service
            .address("admin listening")
            .await
            .context("callback-service")?;
        Ok(Self {
            service,
            upstream,
            api,
            admin,
            zipkin,
            work,
        })
    }

    /// Fails when either child has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.service.ensure_running("callback-service")?;
        self.upstream.ensure_running("client-service")
    }

    /// Stops the service, then the simulator (the service may finish fetches while it
    /// drains), then removes the database file; says what the service logged as warnings
    /// or errors, when it did (the bench silences `domain::pipeline` below errors).
    pub async fn stop(self) -> anyhow::Result<()> {
        let problems = self.service.problems();
        if problems.count > 0 {
            eprintln!(
                "bench: callback-service logged {} warnings or errors; the first:",
                problems.count
            );
            for line in &problems.first {
                eprintln!("  {line}");
            }
        }
        let service = self.service.stop().await.context("stop callback-service");
        let upstream = self.upstream.stop().await.context("stop client-service");
        drop(self.work);
        service?;
        upstream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_and_errors_are_counted_and_the_first_kept() {
        let mut problems = Problems::default();
        problems.note("2026-12-05T07:00:00.000001Z  INFO callback_service: api listening");
        problems.note("2026-12-05T07:00:00.000002Z  WARN domain::pipeline: cannot claim");
        problems.note("the service said WARN, but not as its level");
        for n in 0..PROBLEMS_KEPT {
            problems.note(&format!("2026-12-05T07:00:01Z ERROR storage: failure {n}"));
        }
        assert_eq!(problems.count, 1 + PROBLEMS_KEPT as u64);
        assert_eq!(problems.first.len(), PROBLEMS_KEPT);
        assert!(problems.first[0].contains("cannot claim"));
    }
}
