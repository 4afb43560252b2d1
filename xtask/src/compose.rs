//! `cargo xtask compose up|down|logs|ps`: the whole stack (PostgreSQL, Zipkin, both
//! programs, Prometheus) in containers, through `docker compose` with the project's file and
//! project name, so it works from any folder of the workspace.
//!
//! Before running anything it checks that Docker can work here: the `docker` command, its
//! compose plugin (or a standalone `docker-compose` v2) and an engine that answers. When
//! one is missing it says which and what to do, and fails.
//!
//! The stack's PostgreSQL speaks TLS only and the service checks its certificate
//! (`sslmode=verify-full`), so `up` first makes a throwaway certificate authority and the
//! server's certificate in `docker/certs/` (git ignores it), unless they are there already.

use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::Command;

/// The compose project name: container, network and volume names start with it.
pub const PROJECT: &str = "callback-service";
/// The compose file, relative to the workspace root.
pub const FILE: &str = "docker/compose.yaml";
/// Where `up` keeps the stack's certificates, relative to the workspace root; the compose
/// file mounts them from there (`./certs/…`).
pub const CERTS: &str = "docker/certs";
/// The certificate authority's certificate: what the service trusts.
const CA_FILE: &str = "compose-ca.pem";
/// PostgreSQL's certificate and key, signed by it.
const SERVER_CERT: &str = "postgres.pem";
const SERVER_KEY: &str = "postgres.key";
/// The names PostgreSQL's certificate is issued for: its compose service name, which the
/// service connects to and `verify-full` checks, and `localhost` for a `psql` inside its
/// container.
const SERVER_NAMES: [&str; 2] = ["postgres", "localhost"];
/// How long one probe (`docker info`, …) may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Options of `cargo xtask compose`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

/// What to do with the stack.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
enum Action {
    /// Build the images, start the stack in the background and wait until it is healthy
    Up {
        /// Use the images already built instead of building them again
        #[arg(long)]
        no_build: bool,
        /// Start only these services (and the ones they depend on)
        services: Vec<String>,
    },
    /// Stop the stack and remove its containers and network; the database volume stays
    Down {
        /// Also delete the PostgreSQL volume (all stored data)
        #[arg(long)]
        volumes: bool,
    },
    /// Show the services' logs and follow them (Ctrl-C stops following)
    Logs {
        /// Print the logs so far and return instead of following
        #[arg(long)]
        no_follow: bool,
        /// Only these services
        services: Vec<String>,
    },
    /// List the services' containers, their state and health
    Ps,
    /// Only make the stack's certificates in docker/certs/ (`up` does it too), for running
    /// `docker compose` yourself; needs no Docker
    Certs,
}

/// How `docker compose` is invoked here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    /// The `docker compose` plugin.
    Plugin,
    /// A standalone `docker-compose` binary of Compose v2.
    Standalone,
}

impl Tool {
    /// The program and the arguments before compose's own.
    fn program(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Tool::Plugin => ("docker", &["compose"]),
            Tool::Standalone => ("docker-compose", &[]),
        }
    }
}

/// The full command line for `action` on the compose file `file`.
fn command_line(tool: Tool, file: &Path, action: &Action) -> (&'static str, Vec<OsString>) {
    let (program, prefix) = tool.program();
    let mut args: Vec<OsString> = prefix.iter().map(OsString::from).collect();
    args.push("--file".into());
    args.push(file.into());
    args.push("--project-name".into());
    args.push(PROJECT.into());
    match action {
        Action::Up { no_build, services } => {
            // --wait: return once every service is running, and healthy where it has a
            // health check; fail if one is not.
            args.extend(["up", "--detach", "--wait"].map(OsString::from));
            if !no_build {
                args.push("--build".into());
            }
            args.extend(services.iter().map(OsString::from));
        }
        Action::Down { volumes } => {
            args.extend(["down", "--remove-orphans"].map(OsString::from));
            if *volumes {
                args.push("--volumes".into());
            }
        }
        Action::Logs {
            no_follow,
            services,
        } => {
            args.push("logs".into());
            if !no_follow {
                args.push("--follow".into());
            }
            args.extend(services.iter().map(OsString::from));
        }
        Action::Ps => args.push("ps".into()),
        Action::Certs => unreachable!("`compose certs` runs no docker command"),
    }
    (program, args)
}

/// What the probes found out about Docker on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    /// It works.
    Yes,
    /// The program does not exist.
    Missing,
    /// It ran and failed, saying this.
    Failed(String),
}

/// The results of the probes, in the order they run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Probes {
    /// `docker --version`.
    docker: Found,
    /// `docker compose version`.
    plugin: Found,
    /// `docker-compose version`, only asked when the plugin is not there; must be v2.
    standalone: Found,
    /// `docker info`.
    engine: Found,
}

/// The tool to use, or a message saying everything that is missing and what to do.
fn diagnose(probes: &Probes) -> Result<Tool, String> {
    let mut problems = Vec::new();
    match &probes.docker {
        Found::Yes => {}
        Found::Missing => problems.push(
            "no `docker` command on PATH: install Docker Engine and its compose plugin \
             (https://docs.docker.com/engine/install/) or Docker Desktop"
                .to_owned(),
        ),
        Found::Failed(why) => problems.push(format!("`docker --version` failed: {why}")),
    }
    let tool = match (&probes.plugin, &probes.standalone) {
        (Found::Yes, _) => Some(Tool::Plugin),
        (_, Found::Yes) => Some(Tool::Standalone),
        (plugin, _) => {
            if probes.docker == Found::Yes {
                let why = match plugin {
                    Found::Failed(why) => format!(" (`docker compose version`: {why})"),
                    _ => String::new(),
                };
                problems.push(format!(
                    "the Docker Compose plugin is not installed{why}: install the \
                     `docker-compose-plugin` package from Docker's apt repository \
                     (https://docs.docker.com/compose/install/linux/)"
                ));
            }
            None
        }
    };
    match &probes.engine {
        Found::Yes => {}
        // Without the docker command the engine cannot be asked; that was said above.
        Found::Missing => {}
        Found::Failed(why) => problems.push(format!(
            "no Docker engine answers (`docker info`: {why}): start it (`sudo systemctl \
             start docker`, or Docker Desktop) or point DOCKER_HOST at one"
        )),
    }
    match tool {
        Some(tool) if problems.is_empty() => Ok(tool),
        _ => Err(format!(
            "cargo xtask compose cannot run here:\n{}\n\nNothing else needs Docker: \
             `cargo xtask demo` runs both programs on this machine with SQLite, and \
             `cargo test --workspace` needs no container either.",
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        )),
    }
}

/// Runs `program args` quietly and says whether it worked.
async fn probe(program: &str, args: &[&str]) -> Found {
    let run = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(PROBE_TIMEOUT, run).await {
        Err(_) => Found::Failed(format!("no answer within {PROBE_TIMEOUT:?}")),
        Ok(Err(err)) if err.kind() == ErrorKind::NotFound => Found::Missing,
        Ok(Err(err)) => Found::Failed(err.to_string()),
        Ok(Ok(output)) if output.status.success() => {
            if program == "docker-compose" && !is_compose_v2(&output.stdout) {
                return Found::Failed("it is Compose v1, which is not supported".to_owned());
            }
            Found::Yes
        }
        Ok(Ok(output)) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            // The first line says what went wrong; docker adds hints after it.
            let said = stderr
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("no message")
                .to_owned();
            Found::Failed(format!("{said} ({})", output.status))
        }
    }
}

/// Whether `docker-compose version` printed a v2 (or later) version.
fn is_compose_v2(stdout: &[u8]) -> bool {
    // Only the first line: Compose v1 goes on with the versions of docker-py and CPython.
    let text = String::from_utf8_lossy(stdout);
    let first = text.lines().next().unwrap_or_default();
    first
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter_map(|word| word.strip_prefix('v').or(Some(word)))
        .filter_map(|word| word.split('.').next()?.parse::<u32>().ok())
        .any(|major| major >= 2)
}

/// Asks the machine what it has.
async fn probe_all() -> Probes {
    let docker = probe("docker", &["--version"]).await;
    let (plugin, engine) = if docker == Found::Missing {
        (Found::Missing, Found::Missing)
    } else {
        (
            probe("docker", &["compose", "version"]).await,
            probe("docker", &["info", "--format", "{{.ServerVersion}}"]).await,
        )
    };
    let standalone = if plugin == Found::Yes {
        Found::Missing
    } else {
        probe("docker-compose", &["version"]).await
    };
    Probes {
        docker,
        plugin,
        standalone,
        engine,
    }
}

/// Makes the stack's certificates in `dir` unless all of them are there already (a new
/// authority each time, so they always belong together); whether it made them.
fn ensure_certificates(dir: &Path) -> anyhow::Result<bool> {
    let files = [CA_FILE, SERVER_CERT, SERVER_KEY].map(|file| dir.join(file));
    if files.iter().all(|file| file.is_file()) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Named so that its files are CA_FILE, SERVER_CERT and SERVER_KEY.
    let pki = tls::testing::TestPki::new(dir, "compose");
    pki.server("postgres", &SERVER_NAMES);
    Ok(true)
}

/// Runs `cargo xtask compose …`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let root = crate::workspace_root()?;
    let file: PathBuf = root.join(FILE);
    if !file.is_file() {
        bail!("{} is missing", file.display());
    }
    if args.action == Action::Certs {
        let made = ensure_certificates(&root.join(CERTS))?;
        println!(
            "{} the stack's PostgreSQL certificates in {CERTS}/",
            if made { "made" } else { "kept" }
        );
        return Ok(());
    }
    let tool = match diagnose(&probe_all().await) {
        Ok(tool) => tool,
        Err(message) => {
            // Not an error of xtask's: the message alone, without anyhow's backtrace.
            eprintln!("{message}");
            std::process::exit(1);
        }
    };
    if matches!(args.action, Action::Up { .. }) && ensure_certificates(&root.join(CERTS))? {
        println!("made the stack's PostgreSQL certificates in {CERTS}/");
    }
    let (program, argv) = command_line(tool, &file, &args.action);
    let status = Command::new(program)
        .args(&argv)
        .current_dir(&root)
        .status()
        .await
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        let hint = match args.action {
            Action::Up { .. } => {
                "; `cargo xtask compose ps` shows which service is not healthy and \
                 `cargo xtask compose logs --no-follow SERVICE` why"
            }
            _ => "",
        };
        bail!("docker compose failed: {status}{hint}");
    }
    if matches!(args.action, Action::Up { .. }) {
        println!(
            "\nThe stack is up (project {PROJECT}):\n\
             \x20 API         http://127.0.0.1:9090/  (try: curl -s 127.0.0.1:9090/objects)\n\
             \x20 admin       http://127.0.0.1:6060/stats, /failures, /metrics\n\
             \x20 Zipkin      http://127.0.0.1:9411/\n\
             \x20 upstream    http://127.0.0.1:9010/objects/0\n\
             \x20 Prometheus  http://127.0.0.1:9091/\n\
             \x20 Grafana     http://127.0.0.1:3000/  (the callback-service dashboard)\n\
             `cargo xtask compose logs` follows the logs; `cargo xtask compose down` stops it all."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(tool: Tool, action: Action) -> Vec<String> {
        let (program, args) = command_line(tool, Path::new("/w/docker/compose.yaml"), &action);
        std::iter::once(program.to_owned())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect()
    }

    const HEAD: [&str; 6] = [
        "docker",
        "compose",
        "--file",
        "/w/docker/compose.yaml",
        "--project-name",
        "callback-service",
    ];

    fn expect(tail: &[&str]) -> Vec<String> {
        HEAD.iter().chain(tail).map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn every_action_names_the_file_and_the_project() {
        let up = Action::Up {
            no_build: false,
            services: vec![],
        };
        assert_eq!(
            line(Tool::Plugin, up),
            expect(&["up", "--detach", "--wait", "--build"])
        );
        let up_some = Action::Up {
            no_build: true,
            services: vec!["postgres".into(), "zipkin".into()],
        };
        assert_eq!(
            line(Tool::Plugin, up_some),
            expect(&["up", "--detach", "--wait", "postgres", "zipkin"])
        );
        assert_eq!(
            line(Tool::Plugin, Action::Down { volumes: false }),
            expect(&["down", "--remove-orphans"])
        );
        assert_eq!(
            line(Tool::Plugin, Action::Down { volumes: true }),
            expect(&["down", "--remove-orphans", "--volumes"])
        );
        let logs = Action::Logs {
            no_follow: false,
            services: vec!["callback-service".into()],
        };
        assert_eq!(
            line(Tool::Plugin, logs),
            expect(&["logs", "--follow", "callback-service"])
        );
        let logs_once = Action::Logs {
            no_follow: true,
            services: vec![],
        };
        assert_eq!(line(Tool::Plugin, logs_once), expect(&["logs"]));
        assert_eq!(line(Tool::Plugin, Action::Ps), expect(&["ps"]));
    }

    #[test]
    fn the_standalone_binary_takes_the_same_arguments() {
        let got = line(Tool::Standalone, Action::Ps);
        assert_eq!(got[0], "docker-compose");
        assert_eq!(got[1..], expect(&["ps"])[2..]);
    }

    #[test]
    fn the_file_and_project_match_the_repository() {
        let root = crate::workspace_root().expect("root");
        let compose = std::fs::read_to_string(root.join(FILE)).expect("the compose file exists");
        assert!(
            compose
                .lines()
                .any(|l| l.trim() == format!("name: {PROJECT}")),
            "{FILE} names its project {PROJECT}"
        );
    }

    #[test]
    fn the_stack_certificates_let_the_service_verify_postgres_by_its_service_name() {
        use tls::{ClientSettings, Identity, Roots, Verification};
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = dir.path().join("certs");
        assert!(ensure_certificates(&certs).expect("made"));
        let ca = std::fs::read(certs.join(CA_FILE)).expect("the CA file");
        assert!(!ensure_certificates(&certs).expect("kept"), "made twice");
        assert_eq!(
            std::fs::read(certs.join(CA_FILE)).expect("CA"),
            ca,
            "replaced"
        );

        // The service's settings in the stack: sslmode=verify-full with the CA file.
        let client = tls::client_config(&ClientSettings {
            verification: Verification::Full,
            roots: Roots::File(certs.join(CA_FILE)),
            identity: None,
        })
        .expect("client configuration");
        let server = tls::server_config(&Identity {
            cert_file: certs.join(SERVER_CERT),
            key_file: certs.join(SERVER_KEY),
        })
        .expect("PostgreSQL's certificate and key load");
        for name in SERVER_NAMES {
            tls::testing::handshake(client.clone(), server.clone(), name).expect(name);
        }
        tls::testing::handshake(client, server, "db.example.com")
            .expect_err("the certificate is for the stack's names only");

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(certs.join(SERVER_KEY))
                .expect("key")
                .permissions();
            assert_eq!(
                mode.mode() & 0o077,
                0,
                "the key is readable by its owner only"
            );
        }

        // One file missing: all made again, a new authority.
        std::fs::remove_file(certs.join(SERVER_KEY)).expect("remove");
        assert!(ensure_certificates(&certs).expect("made again"));
        assert_ne!(std::fs::read(certs.join(CA_FILE)).expect("CA"), ca);
    }

    #[test]
    fn the_compose_file_mounts_the_certificates_up_makes() {
        let root = crate::workspace_root().expect("root");
        let compose = std::fs::read_to_string(root.join(FILE)).expect("the compose file exists");
        let relative = CERTS
            .strip_prefix("docker/")
            .expect("next to the compose file");
        for file in [CA_FILE, SERVER_CERT, SERVER_KEY] {
            let mount = format!("./{relative}/{file}:/certs/{file}:ro");
            assert!(compose.contains(&mount), "{FILE} mounts {mount}");
        }
        for setting in [
            "sslmode=verify-full",
            "CALLBACK_DATABASE__TLS_CA_FILE: /certs/compose-ca.pem",
            "ssl_cert_file=/certs/postgres.pem",
        ] {
            assert!(compose.contains(setting), "{FILE} sets {setting}");
        }
        let ignored = std::fs::read_to_string(root.join(".gitignore")).expect(".gitignore");
        assert!(
            ignored.lines().any(|line| line == format!("/{CERTS}")),
            "git ignores {CERTS}"
        );
    }

    #[test]
    fn the_command_line_parses() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(subcommand)]
            action: Action,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("compose").chain(args.iter().copied()))
                .map(|cli| cli.action)
        };
        assert_eq!(
            parse(&["up"]).unwrap(),
            Action::Up {
                no_build: false,
                services: vec![]
            }
        );
        assert_eq!(
            parse(&["logs", "--no-follow", "postgres"]).unwrap(),
            Action::Logs {
                no_follow: true,
                services: vec!["postgres".into()]
            }
        );
        assert_eq!(
            parse(&["down", "--volumes"]).unwrap(),
            Action::Down { volumes: true }
        );
        assert_eq!(parse(&["certs"]).unwrap(), Action::Certs);
        assert!(parse(&["restart"]).is_err());
        assert!(parse(&[]).is_err());
    }

    fn probes(docker: Found, plugin: Found, standalone: Found, engine: Found) -> Probes {
        Probes {
            docker,
            plugin,
            standalone,
            engine,
        }
    }

    #[test]
    fn a_working_docker_picks_the_plugin_or_the_standalone_binary() {
        use Found::*;
        assert_eq!(diagnose(&probes(Yes, Yes, Missing, Yes)), Ok(Tool::Plugin));
        assert_eq!(
            diagnose(&probes(Yes, Failed("unknown command".into()), Yes, Yes)),
            Ok(Tool::Standalone)
        );
    }

    #[test]
    fn each_missing_piece_is_named_with_what_to_do() {
        use Found::*;
        let no_docker = diagnose(&probes(Missing, Missing, Missing, Missing)).unwrap_err();
        assert!(no_docker.contains("no `docker` command"), "{no_docker}");
        assert!(no_docker.contains("install Docker Engine"), "{no_docker}");
        assert!(
            !no_docker.contains("plugin is not installed"),
            "{no_docker}"
        );
        assert!(no_docker.contains("cargo xtask demo"), "{no_docker}");

        // This machine: the docker CLI without the plugin and without an engine.
        let here = diagnose(&probes(
            Yes,
            Failed("docker: unknown command: docker compose (exit status: 1)".into()),
            Missing,
            Failed("Cannot connect to the Docker daemon at unix:///var/run/docker.sock".into()),
        ))
        .unwrap_err();
        assert!(here.contains("Compose plugin is not installed"), "{here}");
        assert!(here.contains("unknown command"), "{here}");
        assert!(here.contains("no Docker engine answers"), "{here}");
        assert!(
            here.contains("Cannot connect to the Docker daemon"),
            "{here}"
        );
        assert!(here.contains("systemctl start docker"), "{here}");

        let no_engine = diagnose(&probes(Yes, Yes, Missing, Failed("refused".into())));
        let no_engine = no_engine.unwrap_err();
        assert!(
            no_engine.contains("no Docker engine answers"),
            "{no_engine}"
        );
        assert!(!no_engine.contains("plugin"), "{no_engine}");
    }

    #[test]
    fn only_compose_v2_is_taken_as_standalone() {
        assert!(is_compose_v2(b"Docker Compose version v2.29.7\n"));
        assert!(is_compose_v2(
            b"Docker Compose version 2.24.6+ds1-0ubuntu1\n"
        ));
        assert!(!is_compose_v2(
            b"docker-compose version 1.29.2, build unknown\ndocker-py version: 5.0.0\nCPython version: 3.10.12\n"
        ));
    }
}
