//! A throwaway PostgreSQL cluster on loopback, started the way `.ci/run` starts CI's: for
//! tests that need a server of their own (TLS on, a `pg_hba.conf` of their own) and for
//! `cargo xtask bench`, which compiles this same file (`#[path]`) rather than depending on
//! the tests crate. Only `std` and `anyhow`, so both can.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Server-side TLS: the files are copied into the cluster's folder, handed to the user the
/// server runs as (PostgreSQL refuses a key others can read), and `ssl` is turned on.
#[derive(Debug, Clone, Copy)]
pub struct ServerTls<'a> {
    /// The server certificate, PEM.
    pub cert_file: &'a Path,
    /// Its key, PEM.
    pub key_file: &'a Path,
    /// The CA that client certificates must chain up to (`ssl_ca_file`), if any.
    pub ca_file: Option<&'a Path>,
}

/// How to set a cluster up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Setup<'a> {
    /// Names the cluster's folder (with the process id), for whoever finds it.
    pub name: &'a str,
    /// `pg_hba.conf` instead of initdb's (which trusts every local connection).
    pub hba: Option<&'a str>,
    /// TLS on, with these files.
    pub tls: Option<ServerTls<'a>>,
    /// `max_connections` (0: 200).
    pub max_connections: u32,
    /// Whether commits are flushed to disk (`fsync`), as in production: the benchmark's
    /// figures need it; tests do not, and run faster without.
    pub fsync: bool,
}

/// A running cluster in a temporary folder; stopped and removed by [`Cluster::stop`] or
/// when dropped, so a failing test leaves no server behind.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    as_user: Option<&'static str>,
    port: u16,
    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub url: String,
    stopped: bool,
}

/// The folder of the PostgreSQL server binaries: `initdb` on the `PATH`, or the newest
/// Debian package's.
pub fn find_bin() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("initdb"))
        .find(|p| p.is_file());
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin").join("initdb"))
        .filter(|p| p.is_file())
        .max();
    let initdb = on_path
        .or(debian)
        .context("no PostgreSQL server found (initdb): `apt-get install postgresql`")?;
    let initdb = std::fs::canonicalize(&initdb).unwrap_or(initdb);
    Ok(initdb
        .parent()
        .context("initdb has a folder")?
        .to_path_buf())
}

fn run(as_user: Option<&str>, program: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut command = match as_user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    let output = command
        .args(args)
        .output()
        .with_context(|| format!("run {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            program.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl Cluster {
    /// Creates and starts a cluster on a free loopback port. Blocking (initdb takes a
    /// second or two): async callers run it on `spawn_blocking`.
    pub fn start(setup: &Setup<'_>) -> anyhow::Result<Self> {
        let bin = find_bin()?;
        // PostgreSQL refuses to run as root: use the `postgres` system user then.
        let as_user = is_root().then_some("postgres");
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "callback-{}-pg-{}-{n}",
            setup.name,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        // From here on, a failure stops and removes what was made.
        let mut cluster = Self {
            bin,
            dir,
            as_user,
            port,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            stopped: true,
        };
        cluster.hand_over(&cluster.dir)?;
        let data = cluster.dir.join("data");
        let data_s = data.display().to_string();
        let mut initdb = vec![
            "-D",
            &data_s,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ];
        if !setup.fsync {
            initdb.push("--no-sync");
        }
        run(as_user, &cluster.bin.join("initdb"), &initdb)?;
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections={} -c fsync={}",
            cluster.dir.display(),
            if setup.max_connections == 0 {
                200
            } else {
                setup.max_connections
            },
            if setup.fsync { "on" } else { "off" },
        );
        if let Some(hba) = setup.hba {
            let path = data.join("pg_hba.conf");
            std::fs::write(&path, hba).with_context(|| format!("write {}", path.display()))?;
            cluster.hand_over(&path)?;
        }
        if let Some(tls) = setup.tls {
            let cert = cluster.copy_in(tls.cert_file, "server.pem")?;
            let key = cluster.copy_in(tls.key_file, "server.key")?;
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            ));
            if let Some(ca) = tls.ca_file {
                let ca = cluster.copy_in(ca, "client-ca.pem")?;
                options.push_str(&format!(" -c ssl_ca_file={}", ca.display()));
            }
        }
        let log = cluster.dir.join("server.log").display().to_string();
        cluster.stopped = false;
        if let Err(err) = run(
            as_user,
            &cluster.bin.join("pg_ctl"),
            &[
                "-D", &data_s, "-l", &log, "-w", "-t", "60", "-o", &options, "start",
            ],
        ) {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("{err:#}\nserver log:\n{log}");
        }
        Ok(cluster)
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Copies `from` into the cluster's folder as `name`, readable by the server's user
    /// alone.
    fn copy_in(&self, from: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let to = self.dir.join(name);
        std::fs::copy(from, &to)
            .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))?;
        }
        self.hand_over(&to)?;
        Ok(to)
    }

    /// Makes `path` the server user's, when the server runs as another user than this
    /// process.
    fn hand_over(&self, path: &Path) -> anyhow::Result<()> {
        let Some(user) = self.as_user else {
            return Ok(());
        };
        let status = Command::new("chown").arg(user).arg(path).status()?;
        if !status.success() {
            bail!(
                "cannot hand {} to the {user} user (does it exist?)",
                path.display()
            );
        }
        Ok(())
    }

    /// Stops the server (fast: sessions are ended) and removes its files.
    pub fn stop(mut self) {
        self.shut_down("fast");
    }

    fn shut_down(&mut self, mode: &str) {
        if !self.stopped {
            self.stopped = true;
            let data = self.dir.join("data").display().to_string();
            if let Err(err) = run(
                self.as_user,
                &self.bin.join("pg_ctl"),
                &["-D", &data, "-m", mode, "-w", "stop"],
            ) {
                eprintln!("stopping the throwaway PostgreSQL: {err:#}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shut_down("immediate");
    }
}
