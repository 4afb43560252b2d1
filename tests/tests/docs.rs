//! The newcomer's documents and the container files, checked against what they describe.
//!
//! - `docs/configuration.md` lists exactly the keys of `config/default.toml` and
//!   `config/client-service.toml`, with their environment variable names and defaults,
//!   and the flags the binaries' `--help` shows for them (a key a file leaves unset on
//!   purpose is shown there commented out and documented as `unset`).
//! - README.md's configuration table agrees with both.
//! - `docker/compose.yaml` sets only variables that name real keys, and publishes the
//!   documented ports (the admin listener on the host's loopback only).
//! - `docker/Dockerfile` copies files that exist and builds with CI's command.
//! - `docker/healthcheck.sh`, the image's health check, passes against the real service and
//!   fails where nothing answers; with `/readyz` it fails while the service is alive but not
//!   ready. The image checks `/livez`, compose's callback-service `/readyz`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use figment::Figment;
use figment::providers::{Format, Toml};
use serde_json::Value;
use tests::{Backend, Service, bins, read_workspace_file, workspace_file};

/// The keys of a configuration file as `section.key`, with their values.
fn toml_keys(relative: &str) -> anyhow::Result<BTreeMap<String, Value>> {
    let root: Value = Figment::from(Toml::file_exact(workspace_file(relative)))
        .extract()
        .with_context(|| format!("{relative} is not valid TOML"))?;
    let mut keys = BTreeMap::new();
    for (section, table) in root.as_object().context("a TOML document")? {
        let table = table
            .as_object()
            .with_context(|| format!("{relative}: `{section}` is not a [section]"))?;
        for (key, value) in table {
            keys.insert(format!("{section}.{key}"), value.clone());
        }
    }
    ensure!(!keys.is_empty(), "{relative} has no keys");
    Ok(keys)
}

/// The keys a configuration file leaves unset on purpose, as `section.key`: optional keys
/// whose default is worked out at start, shown commented out (`# key = example`) in their
/// section. The reference documents their default as `unset`.
fn commented_keys(relative: &str) -> anyhow::Result<BTreeSet<String>> {
    let mut section = None;
    let mut keys = BTreeSet::new();
    for line in read_workspace_file(relative)?.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
            continue;
        }
        let Some((key, _)) = line.strip_prefix("# ").and_then(|l| l.split_once(" = ")) else {
            continue;
        };
        if let Some(section) = &section
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            keys.insert(format!("{section}.{key}"));
        }
    }
    Ok(keys)
}

/// What the reference writes as the default of a key left unset.
const UNSET: &str = "unset";

/// A TOML value written in a document (`"text"`, `10`, `1.0`, `true`).
fn toml_value(literal: &str) -> anyhow::Result<Value> {
    Figment::from(Toml::string(&format!("value = {literal}")))
        .extract_inner("value")
        .with_context(|| format!("{literal:?} is not a TOML value"))
}

/// The environment variable of `section.key` for `prefix`.
fn env_name(prefix: &str, key: &str) -> String {
    format!("{prefix}{}", key.to_uppercase().replace('.', "__"))
}

/// The first `` `code` `` span of a table cell.
fn code_span(cell: &str) -> Option<&str> {
    let (_, rest) = cell.split_once('`')?;
    rest.split_once('`').map(|(code, _)| code)
}

/// One row of a configuration table.
#[derive(Debug)]
struct Row {
    key: String,
    env: String,
    flag: Option<String>,
    default: String,
}

/// The rows of the configuration table under `heading` (up to the next heading).
fn config_rows(text: &str, heading: &str) -> anyhow::Result<Vec<Row>> {
    let start = text
        .lines()
        .position(|l| l.trim() == heading)
        .with_context(|| format!("no heading {heading:?}"))?;
    let mut rows = Vec::new();
    for line in text.lines().skip(start + 1) {
        if line.starts_with('#') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| `key` | `ENV` | `--flag` | `default` | …": cells[0] is before the first bar.
        let [_, key, env, flag, default, ..] = cells.as_slice() else {
            continue;
        };
        let (Some(key), Some(env)) = (code_span(key), code_span(env)) else {
            continue; // the header and the separator
        };
        if !key.contains('.') {
            continue;
        }
        rows.push(Row {
            key: key.to_owned(),
            env: env.to_owned(),
            flag: code_span(flag)
                .filter(|f| f.starts_with("--"))
                .map(str::to_owned),
            default: code_span(default)
                .with_context(|| format!("{heading}: `{key}` has no default"))?
                .to_owned(),
        });
    }
    ensure!(!rows.is_empty(), "no configuration rows under {heading:?}");
    Ok(rows)
}

/// Checks the rows against the file: every key once, with its env name and default (or,
/// for a key the file leaves `unset`, shown commented out there).
fn check_rows(
    rows: &[Row],
    keys: &BTreeMap<String, Value>,
    unset: &BTreeSet<String>,
    prefix: &str,
    what: &str,
) -> anyhow::Result<()> {
    let mut seen = BTreeSet::new();
    for row in rows {
        ensure!(seen.insert(&row.key), "{what}: `{}` twice", row.key);
        if row.default == UNSET {
            ensure!(
                unset.contains(&row.key) && !keys.contains_key(&row.key),
                "{what}: `{}` is documented as unset, so the file must show it commented out (`# key = …`) in its section, not set it",
                row.key
            );
            ensure!(
                row.env == env_name(prefix, &row.key),
                "{what}: `{}` has env {}, expected {}",
                row.key,
                row.env,
                env_name(prefix, &row.key)
            );
            continue;
        }
        let value = keys
            .get(&row.key)
            .with_context(|| format!("{what}: `{}` is not a key of the file", row.key))?;
        ensure!(
            row.env == env_name(prefix, &row.key),
            "{what}: `{}` has env {}, expected {}",
            row.key,
            row.env,
            env_name(prefix, &row.key)
        );
        let documented = toml_value(&row.default)?;
        ensure!(
            &documented == value,
            "{what}: `{}` documents default {}, the file says {value}",
            row.key,
            row.default
        );
    }
    Ok(())
}

/// `(flag, key)` for every flag whose help starts with the key it sets.
fn flags_in_help(binary: &Path) -> anyhow::Result<BTreeSet<(String, String)>> {
    let output = std::process::Command::new(binary)
        .arg("--help")
        .output()
        .with_context(|| format!("run {} --help", binary.display()))?;
    ensure!(output.status.success(), "--help failed: {output:?}");
    let help = String::from_utf8(output.stdout)?;
    let mut flags = BTreeSet::new();
    for line in help.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("--") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let flag = format!("--{}", words.next().unwrap_or_default());
        // Skip the value placeholder, then the first word of the help names the key:
        // "http.listen: …" or "upstream.enabled = false: …".
        let key = words
            .find(|w| !w.starts_with('<'))
            .map(|w| w.trim_end_matches(':'))
            .unwrap_or_default();
        if key.contains('.')
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || "._".contains(c))
        {
            flags.insert((flag, key.to_owned()));
        }
    }
    ensure!(!flags.is_empty(), "no key flags in --help:\n{help}");
    Ok(flags)
}

#[test]
fn the_configuration_reference_lists_every_key_of_both_files() -> anyhow::Result<()> {
    let reference = read_workspace_file("docs/configuration.md")?;
    for (heading, file, prefix) in [
        ("## callback-service", "config/default.toml", "CALLBACK_"),
        ("## client-service", "config/client-service.toml", "CLIENT_"),
    ] {
        let keys = toml_keys(file)?;
        let rows = config_rows(&reference, heading)?;
        let what = format!("docs/configuration.md {heading}");
        let unset = commented_keys(file)?;
        check_rows(&rows, &keys, &unset, prefix, &what)?;
        let documented: BTreeSet<&String> = rows.iter().map(|r| &r.key).collect();
        let missing: Vec<&String> = keys
            .keys()
            .chain(&unset)
            .filter(|k| !documented.contains(k))
            .collect();
        ensure!(
            missing.is_empty(),
            "{file} has keys {what} does not list: {missing:?}; add a row for each"
        );
    }
    Ok(())
}

#[test]
fn the_reference_names_the_flags_the_binaries_have() -> anyhow::Result<()> {
    let reference = read_workspace_file("docs/configuration.md")?;
    for (heading, binary) in [
        ("## callback-service", &bins().callback_service),
        ("## client-service", &bins().client_service),
    ] {
        let documented: BTreeSet<(String, String)> = config_rows(&reference, heading)?
            .into_iter()
            .filter_map(|row| Some((row.flag?, row.key)))
            .collect();
        assert_eq!(
            documented,
            flags_in_help(binary)?,
            "docs/configuration.md {heading} (left) and --help (right) disagree on flags"
        );
    }
    Ok(())
}

#[test]
fn the_readme_configuration_table_agrees_with_the_file_and_the_reference() -> anyhow::Result<()> {
    let readme = read_workspace_file("README.md")?;
    let rows = config_rows(&readme, "## Configuration")?;
    check_rows(
        &rows,
        &toml_keys("config/default.toml")?,
        &commented_keys("config/default.toml")?,
        "CALLBACK_",
        "README.md ## Configuration",
    )?;
    let reference = read_workspace_file("docs/configuration.md")?;
    let flags: BTreeMap<String, Option<String>> = config_rows(&reference, "## callback-service")?
        .into_iter()
        .map(|row| (row.key, row.flag))
        .collect();
    for row in &rows {
        ensure!(
            flags.get(&row.key) == Some(&row.flag),
            "README.md: `{}` has flag {:?}, docs/configuration.md {:?}",
            row.key,
            row.flag,
            flags.get(&row.key)
        );
    }
    Ok(())
}

#[test]
fn the_compose_file_sets_real_keys_and_publishes_the_documented_ports() -> anyhow::Result<()> {
    let compose = read_workspace_file("docker/compose.yaml")?;
    let callback = toml_keys("config/default.toml")?;
    let client = toml_keys("config/client-service.toml")?;
    let mut set = BTreeMap::<&str, usize>::new();
    for line in compose.lines() {
        let Some((name, _)) = line.trim().split_once(':') else {
            continue;
        };
        let (prefix, keys) = if name.starts_with("CALLBACK_") {
            ("CALLBACK_", &callback)
        } else if name.starts_with("CLIENT_") {
            ("CLIENT_", &client)
        } else {
            continue;
        };
        ensure!(
            keys.keys().any(|key| env_name(prefix, key) == name),
            "docker/compose.yaml sets {name}, which names no key of the {prefix} configuration"
        );
        *set.entry(prefix).or_default() += 1;
    }
    ensure!(
        set.get("CALLBACK_").is_some_and(|n| *n >= 3)
            && set.get("CLIENT_").is_some_and(|n| *n >= 1),
        "docker/compose.yaml configures the programs through their variables; found {set:?}"
    );
    for published in [
        "\"9090:9090\"",
        "\"9411:9411\"",
        "\"9010:9010\"",
        "\"127.0.0.1:6060:6060\"",
    ] {
        ensure!(
            compose.contains(published),
            "docker/compose.yaml does not publish {published}"
        );
    }
    ensure!(
        !compose.contains("\"6060:6060\"") && !compose.contains("0.0.0.0:6060:"),
        "the admin listener is published on the host's loopback only"
    );
    Ok(())
}

#[test]
fn the_dockerfile_copies_files_that_exist_and_builds_with_cis_command() -> anyhow::Result<()> {
    let dockerfile = read_workspace_file("docker/Dockerfile")?;
    // Continuation lines joined, so each instruction is one line.
    let joined = dockerfile.replace("\\\n", " ");
    let mut copied = 0;
    for line in joined.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        if rest.contains("--from=") {
            continue;
        }
        let words: Vec<&str> = rest
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let Some((_, sources)) = words.split_last() else {
            bail!("COPY without a destination: {line}");
        };
        for source in sources.iter().filter(|s| **s != ".") {
            ensure!(
                workspace_file(source).exists(),
                "docker/Dockerfile copies {source}, which does not exist"
            );
            let ignore = read_workspace_file("docker/Dockerfile.dockerignore")?;
            ensure!(
                ignore
                    .lines()
                    .filter_map(|l| l.strip_prefix('!'))
                    .any(|allowed| source.starts_with(allowed.trim_end_matches('/'))),
                "docker/Dockerfile copies {source}, which docker/Dockerfile.dockerignore leaves out"
            );
            copied += 1;
        }
    }
    ensure!(copied >= 2, "no COPY of the configuration files found");

    let build = joined
        .lines()
        .filter(|l| l.trim_start().starts_with("RUN "))
        .find_map(|l| l.split_once("cargo build ").map(|(_, rest)| rest))
        .context("docker/Dockerfile runs no cargo build")?;
    let build = build.split("&&").next().unwrap_or_default();
    let words: Vec<&str> = build.split_whitespace().collect();
    ensure!(
        words.contains(&"--release") && words.contains(&"--locked"),
        "the image is built with --release --locked: {build}"
    );
    let ci_build = format!(
        "cargo build {}",
        words
            .iter()
            .filter(|w| **w != "--release")
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
    );
    ensure!(
        read_workspace_file(".ci/run")?
            .lines()
            .any(|l| l.trim() == ci_build),
        ".ci/run does not run the Dockerfile's build command (without --release): {ci_build}"
    );
    Ok(())
}

/// Runs `docker/healthcheck.sh [path]` with `CALLBACK_HTTP__LISTEN=listen`.
async fn health_check(listen: &str, path: Option<&str>) -> anyhow::Result<(bool, String)> {
    let run = tokio::process::Command::new("bash")
        .arg(workspace_file("docker/healthcheck.sh"))
        .args(path)
        .env("CALLBACK_HTTP__LISTEN", listen)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .context("the health check did not finish within 10 s")??;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), said))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_health_check_passes_only_against_a_healthy_service() -> anyhow::Result<()> {
    // The backlog bound is one id and the upstream refuses every connection, so once a
    // callback of one id is accepted the service stays alive but is not ready (until the
    // id's retry deadline, 15 s, makes it a failure).
    let Some(service) = Service::start(
        Backend::Sqlite,
        "http://127.0.0.1:9",
        Duration::from_secs(30),
        &[("CALLBACK_PIPELINE__MAX_PENDING_IDS", "1")],
    )
    .await?
    else {
        bail!("SQLite is always available");
    };
    // As in the container: the service listens on every interface, the check asks loopback.
    let listen = format!("0.0.0.0:{}", service.api.port());
    for path in [None, Some("/livez"), Some("/readyz")] {
        let (healthy, said) = health_check(&listen, path).await?;
        ensure!(
            healthy,
            "the health check {path:?} failed against a healthy service: {said}"
        );
    }

    service.accept_callback(&[1]).await?;
    let said = tests::eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let (healthy, said) = health_check(&listen, Some("/readyz")).await?;
            Ok((!healthy).then_some(said))
        },
    )
    .await
    .context("the readiness check still passed with the backlog at its bound")?;
    ensure!(said.contains("503"), "it names the answer: {said}");
    for path in [None, Some("/livez")] {
        let (healthy, said) = health_check(&listen, path).await?;
        ensure!(
            healthy,
            "the liveness check {path:?} failed on a live service that is not ready: {said}"
        );
    }

    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (healthy, said) = health_check(&closed.to_string(), None).await?;
    ensure!(
        !healthy,
        "the health check passed with nothing listening: {said}"
    );
    ensure!(said.contains("unhealthy"), "it says why: {said}");

    // Something that answers, but not 200: the admin listener has no `GET /livez`.
    let (healthy, said) = health_check(&service.admin.to_string(), None).await?;
    ensure!(!healthy, "the health check passed on a 404: {said}");
    ensure!(said.contains("404"), "it names the answer: {said}");

    let (healthy, said) = health_check(&listen, Some("livez")).await?;
    ensure!(!healthy, "a path without a leading / passed: {said}");
    Ok(())
}

#[test]
fn the_image_checks_liveness_and_compose_waits_for_readiness() -> anyhow::Result<()> {
    let dockerfile = read_workspace_file("docker/Dockerfile")?;
    let check = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .take(2)
        .collect::<String>();
    ensure!(
        check.contains(r#"CMD ["/usr/local/bin/healthcheck", "/livez"]"#),
        "the image's HEALTHCHECK does not run the health check on /livez: {check}"
    );

    let compose = read_workspace_file("docker/compose.yaml")?;
    // A top-level service's block: from its `  name:` line to the next service's.
    let block = |name: &str| -> anyhow::Result<String> {
        let header = format!("  {name}:");
        let lines: Vec<&str> = compose
            .lines()
            .skip_while(|l| *l != header)
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("   ") || l.starts_with("  #"))
            .collect();
        ensure!(
            !lines.is_empty(),
            "docker/compose.yaml has no service {name}"
        );
        Ok(lines.join("\n"))
    };
    let service = block("callback-service")?;
    ensure!(
        service.contains(r#"test: ["CMD", "/usr/local/bin/healthcheck", "/readyz"]"#),
        "compose's callback-service health check is not /readyz:\n{service}"
    );
    let client = block("client-service")?;
    ensure!(
        client.contains("callback-service:\n        condition: service_healthy"),
        "client-service does not wait for callback-service to be ready:\n{client}"
    );
    Ok(())
}
