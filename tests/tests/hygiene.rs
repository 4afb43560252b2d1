//! Workspace hygiene: the layering of ARCHITECTURE.md, checked on every `cargo test`; the
//! dependencies' licences; and a repository that stands on its own (no file cites a document
//! kept outside it).

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
    "rustls",
    "tokio-rustls",
];

/// Runs the cargo that runs the tests with `args` in the workspace; its stdout.
fn cargo(args: &[&str]) -> Vec<u8> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|err| panic!("cargo {args:?} does not run: {err}"));
    assert!(
        output.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// The names of every crate `package` depends on at run time, transitively.
fn runtime_dependencies(package: &str) -> BTreeSet<String> {
    let tree = cargo(&[
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
    ]);
    String::from_utf8_lossy(&tree)
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
    // The TLS helpers serve every adapter and depend on none.
    assert_free_of(
        "tls",
        &[
            "storage",
            "upstream-client",
            "http-transport",
            "hyper",
            "reqwest",
            "diesel",
        ],
    );
    // Adapters carry trace context (`trace-context`) but never hold the exporter.
    for adapter in ["storage", "upstream-client", "http-transport"] {
        assert_free_of(adapter, &["telemetry", "opentelemetry-zipkin"]);
    }
}

/// Licences a dependency may be under (SPDX ids): permissive ones only.
const ALLOWED_LICENCES: &[&str] = &[
    "MIT",
    "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "ISC",
    "Zlib",
    "Unicode-3.0",
    "Unlicense",
    "0BSD",
    "BSL-1.0",
    "CC0-1.0",
];

/// Dependencies allowed under another licence, each for a stated reason.
const LICENCE_EXCEPTIONS: &[(&str, &str)] = &[
    // The flamegraph renderer behind `GET /debug/pprof/profile?format=flamegraph` (through
    // `pprof`). CDDL-1.0 is file-level copyleft: it binds changes to inferno's own files,
    // which we use unmodified from crates.io.
    ("inferno", "CDDL-1.0"),
    // Mozilla's root certificates as compiled-in data (`sslrootcert=system`, https
    // upstreams). CDLA-Permissive-2.0 is a permissive licence for data: use and share,
    // keeping the licence text; no copyleft.
    ("webpki-roots", "CDLA-Permissive-2.0"),
    // The same roots as certificates, through reqwest's rustls-platform-verifier.
    ("webpki-root-certs", "CDLA-Permissive-2.0"),
];

/// Whether an SPDX expression is satisfied by the allowed licences: `OR` needs one side,
/// `AND` both; the legacy `/` separator means `OR`. Parentheses group.
fn licence_allowed(expression: &str) -> bool {
    fn any_of(expression: &str) -> bool {
        split_top(expression, " OR ")
            .iter()
            .any(|term| all_of(term))
    }
    fn all_of(term: &str) -> bool {
        split_top(term, " AND ").iter().all(|factor| {
            let factor = factor.trim();
            match factor.strip_prefix('(').and_then(|f| f.strip_suffix(')')) {
                Some(inner) => any_of(inner),
                None => ALLOWED_LICENCES.contains(&factor),
            }
        })
    }
    /// `text` split on `separator` outside parentheses.
    fn split_top<'t>(text: &'t str, separator: &str) -> Vec<&'t str> {
        let mut parts = Vec::new();
        let (mut depth, mut start, mut at) = (0_i32, 0, 0);
        while at < text.len() {
            match text.as_bytes()[at] {
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ if depth == 0 && text[at..].starts_with(separator) => {
                    parts.push(&text[start..at]);
                    at += separator.len();
                    start = at;
                    continue;
                }
                _ => {}
            }
            at += 1;
        }
        parts.push(&text[start..]);
        parts
    }
    any_of(&expression.replace('/', " OR ").replace("  ", " "))
}

#[test]
fn licence_expressions_are_read_as_spdx_says() {
    assert!(licence_allowed("MIT"));
    assert!(licence_allowed("MIT OR Apache-2.0"));
    assert!(licence_allowed("MIT/Apache-2.0"));
    assert!(licence_allowed("(MIT OR Apache-2.0) AND Unicode-3.0"));
    assert!(licence_allowed("MIT OR Apache-2.0 OR LGPL-2.1-or-later"));
    assert!(!licence_allowed("GPL-3.0"));
    assert!(!licence_allowed("MIT AND GPL-3.0"));
    assert!(!licence_allowed("(MIT OR Apache-2.0) AND GPL-3.0"));
    assert!(!licence_allowed(""));
}

/// Every crate the workspace can build (any target, any feature) carries a permissive
/// licence, or is a named exception: the licence half of what `cargo deny` checks, run
/// on every `cargo test`. (Advisories need the RustSec database from the network, which
/// this project's machines do not reach.)
///
/// Not `--offline`: the graph of every platform names crates a build on this one never
/// downloads (android_system_properties, windows-sys, …), and on a fresh machine their
/// manifests are not in cargo's cache yet, so cargo fetches them from the registry, as the
/// build did for the others. `--locked` keeps it from touching Cargo.lock.
#[test]
fn every_dependency_has_an_allowed_licence() {
    let metadata: serde_json::Value =
        serde_json::from_slice(&cargo(&["metadata", "--format-version", "1", "--locked"]))
            .expect("cargo metadata prints json");
    let packages = metadata["packages"].as_array().expect("packages");
    assert!(packages.len() > 100, "the whole graph is listed");
    let refused: Vec<String> = packages
        .iter()
        .filter(|p| p["source"].is_string()) // not one of ours
        .filter_map(|p| {
            let name = p["name"].as_str().unwrap_or_default();
            let licence = p["license"].as_str().unwrap_or_default();
            let excepted = LICENCE_EXCEPTIONS.contains(&(name, licence));
            (!excepted && !licence_allowed(licence))
                .then(|| format!("{name} {} ({licence:?})", p["version"]))
        })
        .collect();
    assert!(
        refused.is_empty(),
        "dependencies under licences not allowed: {refused:?}"
    );
}

/// Every file of the repository that is text: the workspace minus build output, VCS data
/// and the local stack's generated certificates.
fn repository_text_files() -> Vec<(std::path::PathBuf, String)> {
    fn walk(dir: &std::path::Path, found: &mut Vec<(std::path::PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().unwrap().is_dir() {
                if !(name == "target" || name.starts_with('.') && name != ".ci" || name == "certs")
                {
                    walk(&path, found);
                }
            } else if let Ok(text) = std::fs::read_to_string(&path) {
                found.push((path, text));
            }
        }
    }
    let mut found = Vec::new();
    walk(&tests::workspace_file(""), &mut found);
    found
}

#[test]
fn no_file_cites_a_document_outside_the_repository() {
    // Spelled in pieces so that this file does not match itself.
    let outside = [["DESIGN", ".md"].concat(), ["../", "shared"].concat()];
    let files = repository_text_files();
    assert!(
        files
            .iter()
            .any(|(path, _)| path.ends_with("ARCHITECTURE.md")),
        "the walk did not reach ARCHITECTURE.md: {} files",
        files.len()
    );
    let outside = &outside;
    let citing: Vec<String> = files
        .iter()
        .flat_map(|(path, text)| {
            text.lines()
                .enumerate()
                .filter(|(_, line)| outside.iter().any(|needle| line.contains(needle.as_str())))
                .map(move |(n, line)| format!("{}:{}: {}", path.display(), n + 1, line.trim()))
        })
        .collect();
    assert!(
        citing.is_empty(),
        "these lines cite a document that is not in the repository; what they rely on belongs \
         in ARCHITECTURE.md or docs/:\n{}",
        citing.join("\n")
    );
}

/// A `major.minor[.patch]` version as numbers, for comparing (a missing patch is 0).
fn version(text: &str) -> Vec<u64> {
    let mut parts: Vec<u64> = text.split('.').map(|part| part.parse().unwrap()).collect();
    parts.resize(3, 0);
    parts
}

#[test]
fn the_declared_rust_version_is_what_the_locked_dependencies_need() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let host = String::from_utf8(Command::new(rustc).arg("-vV").output().unwrap().stdout)
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names the host");
    // The packages built for this platform, at their locked versions.
    let metadata: serde_json::Value = serde_json::from_slice(&cargo(&[
        "metadata",
        "--quiet",
        "--offline",
        "--locked",
        "--format-version",
        "1",
        "--filter-platform",
        &host,
    ]))
    .expect("cargo metadata prints json");
    let resolved: BTreeSet<&str> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|node| node["id"].as_str())
        .collect();
    let packages = metadata["packages"].as_array().unwrap();
    let needed = packages
        .iter()
        .filter(|p| resolved.contains(p["id"].as_str().unwrap_or_default()))
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].as_str()?)))
        .max()
        .expect("some dependency declares a rust-version");
    let manifest = tests::read_workspace_file("Cargo.toml").unwrap();
    let declared_text = manifest
        .lines()
        .find_map(|line| line.strip_prefix("rust-version = "))
        .map(|quoted| quoted.trim_matches('"'))
        .expect("the workspace's Cargo.toml declares a rust-version");
    let declared = version(declared_text);
    let shown = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(".");
    assert!(
        declared >= needed.0,
        "the workspace declares rust-version {} but {} needs {}",
        shown(&declared),
        needed.1,
        shown(&needed.0)
    );
    let readme = tests::read_workspace_file("README.md").unwrap();
    let claim = format!("{declared_text} or newer");
    assert!(
        readme.contains(&claim),
        "README.md does not say \"{claim}\""
    );
}
