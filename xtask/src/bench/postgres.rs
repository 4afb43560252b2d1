//! A throwaway PostgreSQL cluster on loopback, started the way `.ci/run` starts CI's.

use std::path::PathBuf;

use anyhow::{Context, bail};
use tokio::process::Command;

/// A running cluster in a temporary directory; [`Cluster::stop`] removes it.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    as_user: Option<&'static str>,
    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub url: String,
}

fn find_bin() -> anyhow::Result<PathBuf> {
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
    let initdb = on_path.or(debian).context(
        "no PostgreSQL found (initdb): `apt-get install postgresql`, or run with --db sqlite",
    )?;
    let initdb = std::fs::canonicalize(&initdb).unwrap_or(initdb);
    Ok(initdb
        .parent()
        .context("initdb has a folder")?
        .to_path_buf())
}

async fn run(as_user: Option<&str>, program: PathBuf, args: &[&str]) -> anyhow::Result<()> {
    let mut command = match as_user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(&program);
            c
        }
        None => Command::new(&program),
    };
    let output = command
        .args(args)
        .output()
        .await
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

impl Cluster {
    /// Creates and starts a cluster on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = find_bin()?;
        // PostgreSQL refuses to run as root: use the `postgres` system user then.
        let is_root = std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
        let as_user = is_root.then_some("postgres");
        let dir = std::env::temp_dir().join(format!("callback-bench-pg-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        if let Some(user) = as_user {
            let status = Command::new("chown").arg(user).arg(&dir).status().await?;
            if !status.success() {
                bail!(
                    "cannot hand {} to the {user} user (does it exist?)",
                    dir.display()
                );
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let data = dir.join("data");
        let data_s = data.display().to_string();
        let log = dir.join("server.log").display().to_string();
        eprintln!("bench: starting a throwaway PostgreSQL on 127.0.0.1:{port}");
        run(
            as_user,
            bin.join("initdb"),
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        )
        .await?;
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections=200",
            dir.display()
        );
        run(
            as_user,
            bin.join("pg_ctl"),
            &[
                "-D", &data_s, "-l", &log, "-w", "-t", "60", "-o", &options, "start",
            ],
        )
        .await?;
        Ok(Self {
            bin,
            dir,
            as_user,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        })
    }

    /// Stops the cluster and removes its files.
    pub async fn stop(self) {
        let data = self.dir.join("data").display().to_string();
        if let Err(err) = run(
            self.as_user,
            self.bin.join("pg_ctl"),
            &["-D", &data, "-m", "fast", "-w", "stop"],
        )
        .await
        {
            eprintln!("bench: stopping PostgreSQL: {err:#}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
