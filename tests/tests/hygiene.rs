//! Workspace hygiene: the layering of ARCHITECTURE.md, checked on every `cargo test`.

use std::collections::BTreeSet;
use std::process::Command;

/// Crates that do I/O, talk HTTP or SQL, or export telemetry.
const IO_CRATES: &[&str] = &[
    "diesel",
    "diesel-async",
    "diesel_migrations",
    "libsqlite3-sys",
    "tokio-postgres",
    "deadpool",
    "hyper",
    "hyper-util",
    "http-body-util",
    "reqwest",
    "h2",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry-zipkin",
    "tracing-opentelemetry",
    "metrics-exporter-prometheus",
    "figment",
];

/// The names of every crate `package` depends on at run time, transitively.
fn runtime_dependencies(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--quiet",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-f",
            "{p}",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn assert_free_of(package: &str, banned: &[&str]) {
    let deps = runtime_dependencies(package);
    assert!(
        deps.contains(package),
        "cargo tree did not list {package} itself: {deps:?}"
    );
    let found: Vec<&str> = banned
        .iter()
        .copied()
        .filter(|b| deps.contains(*b))
        .collect();
    assert!(
        found.is_empty(),
        "{package} must not depend on {found:?} (see ARCHITECTURE.md)"
    );
}

#[test]
fn domain_depends_on_no_io_crate() {
    assert_free_of("domain", IO_CRATES);
}

#[test]
fn domain_manifest_names_no_io_crate() {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crates/domain/Cargo.toml"
    ))
    .expect("domain manifest");
    for line in manifest.lines() {
        let name = line
            .split(['=', ' ', '.'])
            .next()
            .unwrap_or_default()
            .trim();
        assert!(
            !IO_CRATES.contains(&name),
            "crates/domain/Cargo.toml names {name}"
        );
    }
}

#[test]
fn adapters_do_not_depend_on_each_other() {
    assert_free_of(
        "storage",
        &["hyper", "reqwest", "upstream-client", "http-transport"],
    );
    assert_free_of("upstream-client", &["diesel", "storage", "http-transport"]);
    assert_free_of(
        "http-transport",
        &["diesel", "reqwest", "storage", "upstream-client"],
    );
    // Adapters carry trace context (`trace-context`) but never hold the exporter.
    for adapter in ["storage", "upstream-client", "http-transport"] {
        assert_free_of(adapter, &["telemetry", "opentelemetry-zipkin"]);
    }
}
