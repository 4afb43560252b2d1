//! `docs/openapi.json` against the code and the running service.
//!
//! - The document's servers are the two listeners, the public API and the admin listener,
//!   at the ports `http.listen` and `admin.listen` default to; a path with its own
//!   `servers` naming the admin listener is the admin listener's, every other path the
//!   API's.
//! - The documented routes of each listener are the routes its router declares
//!   (`http-transport`'s `api.rs` and `admin.rs`).
//! - The error codes of the document, of README.md's table and of
//!   `crates/http-transport/src/error.rs` are the same, with the same statuses.
//! - Every example in the document matches its schema.
//! - Against the real `callback-service` (SQLite, an upstream with client-service's
//!   contract that answers `404` about [`DEAD_IDS`], so the admin listener has dead letters
//!   to list, replay and purge), each path on its own listener: every request example is
//!   sent and gets the status it documents (`x-status`, and `x-error` for the code) with a
//!   body of a documented media type that matches the documented schema and has the
//!   fields of a documented example; a documented path asked with another method answers
//!   `405` with the documented methods in `Allow`; undocumented paths, and the paths of
//!   the other listener, answer `404`; a body that cannot be an example (not JSON, not
//!   declared as JSON, over the id limit) gets the documented `400`, `415` or `413`.
//! - With authentication on, each API operation whose `security` names a scheme answers
//!   the documented `401` without credentials and succeeds with them; the others, and the
//!   admin listener, are not checked.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use figment::Figment;
use figment::providers::{Format, Toml};
use serde_json::{Map, Value, json};
use tests::{
    Backend, Service, eventually, http, parse_rfc3339_micros, read_workspace_file, workspace_file,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// HTTP methods an OpenAPI path item may hold, in the document's spelling.
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Methods tried on every documented path; those it does not document must get `405`.
const PROBED_METHODS: &[&str] = &["get", "post", "put", "patch", "delete"];

/// A `http.max_ids` small enough to exceed cheaply.
const MAX_IDS: usize = 50;

/// The most ids a dead-letter selector may name (`failures.rs`).
const MAX_SELECTED_IDS: usize = 10_000;

/// The ids the test's upstream answers `404` about: each is a dead letter at its first
/// fetch (a 404 is permanent). The admin examples name them.
const DEAD_IDS: [i64; 4] = [100, 101, 102, 103];

/// Which of the service's two listeners serves a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Listener {
    /// The public API (`http.listen`).
    Api,
    /// The admin listener (`admin.listen`).
    Admin,
}

impl Listener {
    /// The listener a top-level server's `x-listener` names.
    fn named(name: &str) -> Option<Self> {
        match name {
            "api" => Some(Self::Api),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    /// The configuration key of its address.
    fn config_key(self) -> &'static str {
        match self {
            Self::Api => "http.listen",
            Self::Admin => "admin.listen",
        }
    }

    /// The source file of its router.
    fn router_file(self) -> &'static str {
        match self {
            Self::Api => "crates/http-transport/src/api.rs",
            Self::Admin => "crates/http-transport/src/admin.rs",
        }
    }

    /// `target` (path and query) on this listener of `service`.
    fn url(self, service: &Service, target: &str) -> String {
        match self {
            Self::Api => service.url(target),
            Self::Admin => service.admin_url(target),
        }
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Api => "API",
            Self::Admin => "admin",
        })
    }
}

/// The document, with `$ref`s followed on demand.
struct Document {
    root: Value,
}

/// One documented operation.
struct Operation<'d> {
    path: &'d str,
    method: &'d str,
    op: &'d Value,
    /// The listener that serves its path.
    listener: Listener,
}

impl Document {
    fn load() -> anyhow::Result<Self> {
        let root = serde_json::from_str(&read_workspace_file("docs/openapi.json")?)
            .context("docs/openapi.json is not JSON")?;
        Ok(Self { root })
    }

    /// `value`, or what its `$ref` points at (`#/…` only), followed repeatedly.
    fn resolve<'d>(&'d self, mut value: &'d Value) -> anyhow::Result<&'d Value> {
        for _ in 0..16 {
            let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
                return Ok(value);
            };
            let pointer = reference
                .strip_prefix('#')
                .with_context(|| format!("only local $refs are supported, got {reference}"))?;
            value = self
                .root
                .pointer(pointer)
                .with_context(|| format!("$ref {reference} points at nothing"))?;
        }
        bail!("$ref chain too long")
    }

    /// The top-level servers by url, each with the listener its `x-listener` names; one
    /// server per listener.
    fn servers(&self) -> anyhow::Result<BTreeMap<&str, (Listener, &Value)>> {
        let servers = self.root["servers"]
            .as_array()
            .context("the document has no servers")?;
        let mut found = BTreeMap::new();
        for server in servers {
            let url = server["url"].as_str().context("a server without url")?;
            let listener = server["x-listener"]
                .as_str()
                .and_then(Listener::named)
                .with_context(|| format!("server {url}: x-listener is not `api` or `admin`"))?;
            ensure!(
                found.insert(url, (listener, server)).is_none(),
                "server {url} is listed twice"
            );
        }
        let listeners: Vec<Listener> = found.values().map(|(l, _)| *l).collect();
        ensure!(
            listeners.len() == 2
                && listeners.contains(&Listener::Api)
                && listeners.contains(&Listener::Admin),
            "the servers must be one API listener and one admin listener, got {listeners:?}"
        );
        Ok(found)
    }

    /// The listener of a path item: the one its own `servers` name, else the API.
    fn listener_of(&self, path: &str, item: &Value) -> anyhow::Result<Listener> {
        let Some(own) = item.get("servers") else {
            return Ok(Listener::Api);
        };
        let servers = self.servers()?;
        let mut listeners = BTreeSet::new();
        for server in own.as_array().into_iter().flatten() {
            let url = server["url"].as_str().unwrap_or_default();
            let (listener, _) = servers.get(url).with_context(|| {
                format!("{path}: its server {url:?} is none of the document's servers")
            })?;
            listeners.insert(*listener);
        }
        ensure!(
            listeners.len() == 1,
            "{path}: its servers must name one listener, got {listeners:?}"
        );
        Ok(listeners.into_iter().next().unwrap_or(Listener::Api))
    }

    fn operations(&self) -> anyhow::Result<Vec<Operation<'_>>> {
        let paths = self.root["paths"]
            .as_object()
            .context("the document has no paths")?;
        let mut found = Vec::new();
        for (path, item) in paths {
            let listener = self.listener_of(path, item)?;
            let item = item.as_object().context("a path item is an object")?;
            for (method, op) in item {
                if METHODS.contains(&method.as_str()) {
                    found.push(Operation {
                        path,
                        method,
                        op,
                        listener,
                    });
                } else {
                    ensure!(
                        ["parameters", "summary", "description", "servers"]
                            .contains(&method.as_str()),
                        "{path}: unexpected key {method}"
                    );
                }
            }
        }
        ensure!(!found.is_empty(), "the document lists no operation");
        Ok(found)
    }

    /// The error codes and their statuses, from `x-error-codes` on the `Error` schema.
    fn error_codes(&self) -> anyhow::Result<BTreeMap<String, u16>> {
        let codes = self.root["components"]["schemas"]["Error"]["x-error-codes"]
            .as_object()
            .context("components.schemas.Error has no x-error-codes")?;
        codes
            .iter()
            .map(|(code, status)| {
                let status = status
                    .as_u64()
                    .and_then(|s| u16::try_from(s).ok())
                    .with_context(|| format!("x-error-codes.{code} is not a status"))?;
                Ok((code.clone(), status))
            })
            .collect()
    }

    /// The responses of `op`, by status, resolved.
    fn responses<'d>(&'d self, op: &'d Value) -> anyhow::Result<BTreeMap<u16, &'d Value>> {
        let responses = op["responses"]
            .as_object()
            .context("an operation without responses")?;
        responses
            .iter()
            .map(|(status, response)| {
                let status: u16 = status
                    .parse()
                    .with_context(|| format!("response key {status:?} is not a status"))?;
                Ok((status, self.resolve(response)?))
            })
            .collect()
    }

    /// Checks `value` against `schema`; every problem is pushed to `errors` with its place.
    fn check(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = match self.resolve(schema) {
            Ok(schema) => schema,
            Err(err) => return errors.push(format!("{at}: {err}")),
        };
        let Some(keywords) = schema.as_object() else {
            return errors.push(format!("{at}: a schema must be an object"));
        };
        for (keyword, expected) in keywords {
            match keyword.as_str() {
                "type" => {
                    let types: Vec<&str> = match expected {
                        Value::String(one) => vec![one.as_str()],
                        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
                        _ => return errors.push(format!("{at}: bad `type` {expected}")),
                    };
                    if !types.iter().any(|t| has_type(value, t)) {
                        errors.push(format!("{at}: expected {types:?}, got {value}"));
                    }
                }
                "format" => match (expected.as_str(), value) {
                    (Some("int64"), Value::Number(n)) if n.as_i64().is_none() => {
                        errors.push(format!("{at}: {n} does not fit in i64"));
                    }
                    (Some("int64"), _) => {}
                    (Some("date-time"), Value::String(text)) => {
                        if let Err(err) = parse_rfc3339_micros(text) {
                            errors.push(format!("{at}: {err}"));
                        }
                    }
                    (Some("date-time"), _) => {}
                    (other, _) => errors.push(format!("{at}: unsupported format {other:?}")),
                },
                "minimum" | "maximum" => {
                    if let (Some(bound), Some(n)) = (expected.as_f64(), value.as_f64()) {
                        let fine = if keyword == "minimum" {
                            n >= bound
                        } else {
                            n <= bound
                        };
                        if !fine {
                            errors.push(format!("{at}: {n} is outside {keyword} {bound}"));
                        }
                    }
                }
                "enum" => {
                    let allowed = expected.as_array().map(Vec::as_slice).unwrap_or_default();
                    if !allowed.contains(value) {
                        errors.push(format!("{at}: {value} is not one of {expected}"));
                    }
                }
                "const" => {
                    if value != expected {
                        errors.push(format!("{at}: expected {expected}, got {value}"));
                    }
                }
                "required" => {
                    if let Value::Object(fields) = value {
                        for name in expected.as_array().into_iter().flatten() {
                            let name = name.as_str().unwrap_or_default();
                            if !fields.contains_key(name) {
                                errors.push(format!("{at}: missing field `{name}` in {value}"));
                            }
                        }
                    }
                }
                "properties" => {
                    if let (Value::Object(fields), Some(properties)) = (value, expected.as_object())
                    {
                        for (name, field) in fields {
                            if let Some(schema) = properties.get(name) {
                                self.check(schema, field, &format!("{at}.{name}"), errors);
                            }
                        }
                    }
                }
                "additionalProperties" => {
                    let properties = keywords.get("properties").and_then(Value::as_object);
                    match (expected, value) {
                        (Value::Bool(false), Value::Object(fields)) => {
                            for name in fields.keys() {
                                if !properties.is_some_and(|p| p.contains_key(name)) {
                                    errors.push(format!("{at}: undocumented field `{name}`"));
                                }
                            }
                        }
                        (Value::Bool(_), _) => {}
                        _ => errors.push(format!("{at}: only boolean additionalProperties")),
                    }
                }
                "items" => {
                    if let Value::Array(items) = value {
                        for (i, item) in items.iter().enumerate() {
                            self.check(expected, item, &format!("{at}[{i}]"), errors);
                        }
                    }
                }
                "maxItems" => {
                    if let (Some(most), Value::Array(items)) = (expected.as_u64(), value)
                        && items.len() as u64 > most
                    {
                        errors.push(format!("{at}: {} items, at most {most}", items.len()));
                    }
                }
                // Annotations: nothing to check.
                "description" | "title" | "default" | "example" | "examples"
                | "contentMediaType" => {}
                other if other.starts_with("x-") => {}
                other => errors.push(format!(
                    "{at}: schema keyword `{other}` is not checked by this test; teach it or drop it"
                )),
            }
        }
    }

    /// [`Document::check`] as a result.
    fn validate(&self, schema: &Value, value: &Value, at: &str) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        self.check(schema, value, at, &mut errors);
        ensure!(errors.is_empty(), "{}", errors.join("\n"));
        Ok(())
    }
}

/// The examples of a media type object: its `example` and the values of its `examples`.
fn media_examples(media: &Value) -> Vec<&Value> {
    let mut found: Vec<&Value> = media.get("example").into_iter().collect();
    for example in media["examples"].as_object().into_iter().flatten() {
        found.push(&example.1["value"]);
    }
    found
}

/// How `answer`'s fields differ from `example`'s, object by object (arrays by their first
/// elements, when both have one); the values themselves are the schema's business.
fn field_differences(example: &Value, answer: &Value, at: &str, found: &mut Vec<String>) {
    match (example, answer) {
        (Value::Object(documented), Value::Object(real)) => {
            let documented_keys: BTreeSet<&String> = documented.keys().collect();
            let real_keys: BTreeSet<&String> = real.keys().collect();
            if documented_keys != real_keys {
                found.push(format!(
                    "{at}: the example has the fields {documented_keys:?}, the answer {real_keys:?}"
                ));
            }
            for (name, value) in documented {
                if let Some(real) = real.get(name) {
                    field_differences(value, real, &format!("{at}.{name}"), found);
                }
            }
        }
        (Value::Array(documented), Value::Array(real)) => {
            if let (Some(documented), Some(real)) = (documented.first(), real.first()) {
                field_differences(documented, real, &format!("{at}[0]"), found);
            }
        }
        _ => {}
    }
}

fn has_type(value: &Value, name: &str) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    }
}

/// The status number of an `http::StatusCode` constant name such as `PAYLOAD_TOO_LARGE`.
fn status_of_constant(name: &str) -> Option<u16> {
    (100..=599u16).find(|&n| {
        reqwest::StatusCode::from_u16(n)
            .ok()
            .and_then(|s| s.canonical_reason())
            .is_some_and(|reason| reason.to_uppercase().replace([' ', '-'], "_") == name)
    })
}

/// The `(StatusCode::NAME, "code")` pairs of the one function that maps errors to responses.
fn codes_in_error_rs() -> anyhow::Result<BTreeMap<String, u16>> {
    let source = read_workspace_file("crates/http-transport/src/error.rs")?;
    // rustfmt breaks a long pair after its `(`: join the lines back.
    let source = source.split_whitespace().collect::<Vec<_>>().join(" ");
    let source = source.replace("( ", "(");
    let mut codes = BTreeMap::new();
    for piece in source.split("(StatusCode::").skip(1) {
        let Some((name, rest)) = piece.split_once(',') else {
            continue;
        };
        let Some(code) = rest
            .trim_start()
            .strip_prefix('"')
            .and_then(|r| r.split_once('"'))
            .map(|(code, _)| code)
        else {
            continue; // a StatusCode used elsewhere, not a mapping
        };
        let status = status_of_constant(name.trim())
            .with_context(|| format!("error.rs: unknown status constant {name}"))?;
        ensure!(
            codes.insert(code.to_owned(), status).is_none(),
            "error.rs maps `{code}` twice"
        );
    }
    ensure!(
        codes.len() >= 5,
        "found only {codes:?} in error.rs: did the shape of ApiError::into_response change?"
    );
    Ok(codes)
}

/// The `| status | `code` | when |` rows of README.md's error table.
fn codes_in_readme() -> anyhow::Result<BTreeMap<String, u16>> {
    let readme = read_workspace_file("README.md")?;
    let mut codes = BTreeMap::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, status, code, ..] = cells.as_slice() else {
            continue;
        };
        let (Ok(status), Some(code)) = (
            status.parse::<u16>(),
            code.strip_prefix('`').and_then(|c| c.strip_suffix('`')),
        ) else {
            continue;
        };
        ensure!(
            codes.insert(code.to_owned(), status).is_none(),
            "README.md lists `{code}` twice"
        );
    }
    Ok(codes)
}

/// The `(METHOD, "/path")` routes of the router of `listener` (`api.rs` or `admin.rs`).
fn routes_of(listener: Listener) -> anyhow::Result<BTreeSet<(String, String)>> {
    let file = listener.router_file();
    let source = read_workspace_file(file)?;
    let mut routes = BTreeSet::new();
    for piece in source.split(".route(Method::").skip(1) {
        let (method, rest) = piece
            .split_once(',')
            .with_context(|| format!("{file}: .route(Method::X, \"/path\", handler)"))?;
        let path = rest
            .trim_start()
            .strip_prefix('"')
            .and_then(|r| r.split_once('"'))
            .map(|(path, _)| path)
            .with_context(|| format!("{file}: the route's path is a string literal"))?;
        routes.insert((method.trim().to_lowercase(), path.to_owned()));
    }
    ensure!(!routes.is_empty(), "no .route(Method::…) found in {file}");
    Ok(routes)
}

#[test]
fn the_documented_routes_of_each_listener_are_the_routes_of_its_router() -> anyhow::Result<()> {
    let doc = Document::load()?;
    let operations = doc.operations()?;
    for listener in [Listener::Api, Listener::Admin] {
        let documented: BTreeSet<(String, String)> = operations
            .iter()
            .filter(|o| o.listener == listener)
            .map(|o| (o.method.to_owned(), o.path.to_owned()))
            .collect();
        let real = routes_of(listener)?;
        assert_eq!(
            documented,
            real,
            "the {listener} listener: docs/openapi.json (left) and the router in {} (right) disagree",
            listener.router_file()
        );
    }
    Ok(())
}

#[test]
fn the_servers_are_the_listeners_at_their_default_addresses() -> anyhow::Result<()> {
    let doc = Document::load()?;
    let config = Figment::from(Toml::file_exact(workspace_file("config/default.toml")));
    let configuration = read_workspace_file("docs/configuration.md")?;
    let servers = doc.servers()?;
    for listener in [Listener::Api, Listener::Admin] {
        let key = listener.config_key();
        let (url, server) = servers
            .iter()
            .find(|(_, (l, _))| *l == listener)
            .map(|(url, (_, server))| (*url, *server))
            .with_context(|| format!("no {listener} server"))?;
        let default: String = config
            .extract_inner(key)
            .with_context(|| format!("config/default.toml has no {key}"))?;
        let port = default
            .parse::<SocketAddr>()
            .with_context(|| format!("{key} = {default:?} is not an address"))?
            .port();
        let served = url
            .strip_prefix("http://")
            .and_then(|rest| rest.parse::<SocketAddr>().ok())
            .with_context(|| format!("server {url}: not http://<ip>:<port>"))?;
        ensure!(
            served.port() == port,
            "server {url}: the {listener} listener's {key} defaults to {default}"
        );
        let description = server["description"].as_str().unwrap_or_default();
        ensure!(
            description.contains(&format!("`{key}`")),
            "server {url}: its description must name its configuration key `{key}`: {description:?}"
        );
        ensure!(
            configuration.contains(&format!("| `{key}` |")),
            "docs/configuration.md does not list `{key}`, which server {url} names"
        );
    }
    // Only the admin listener's paths say which server they are on.
    for (path, item) in doc.root["paths"].as_object().into_iter().flatten() {
        if item.get("servers").is_some() {
            ensure!(
                doc.listener_of(path, item)? == Listener::Admin,
                "{path}: a path of the API listener needs no servers of its own"
            );
        }
    }
    Ok(())
}

#[test]
fn error_codes_agree_between_error_rs_the_document_and_the_readme() -> anyhow::Result<()> {
    let doc = Document::load()?;
    let in_code = codes_in_error_rs()?;
    let in_doc = doc.error_codes()?;
    assert_eq!(
        in_doc, in_code,
        "x-error-codes in docs/openapi.json (left) and ApiError::into_response (right) disagree"
    );
    let enumerated: BTreeSet<String> =
        doc.root["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
            .as_array()
            .context("Error.error has an enum")?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
    assert_eq!(
        enumerated,
        in_code.keys().cloned().collect::<BTreeSet<_>>(),
        "the enum of Error.error in docs/openapi.json lists other codes than error.rs"
    );
    assert_eq!(
        codes_in_readme()?,
        in_code,
        "README.md's error table (left) and ApiError::into_response (right) disagree"
    );
    Ok(())
}

/// The request examples of an operation, each with a name saying where it is.
fn request_examples(op: &Value) -> Vec<(String, &Value)> {
    let mut found = Vec::new();
    let body_examples = op["requestBody"]["content"]["application/json"]["examples"].as_object();
    for (name, example) in body_examples.into_iter().flatten() {
        found.push((format!("requestBody example {name}"), example));
    }
    for parameter in op["parameters"].as_array().into_iter().flatten() {
        let param = parameter["name"].as_str().unwrap_or("?");
        for (name, example) in parameter["examples"].as_object().into_iter().flatten() {
            found.push((format!("parameter {param} example {name}"), example));
        }
    }
    found
}

#[test]
fn every_example_matches_its_schema_and_names_a_documented_status() -> anyhow::Result<()> {
    let doc = Document::load()?;
    let codes = doc.error_codes()?;
    let mut checked = 0;
    for operation in doc.operations()? {
        let at = format!("{} {}", operation.method.to_uppercase(), operation.path);
        let responses = doc.responses(operation.op)?;
        for (status, response) in &responses {
            let content = response["content"]
                .as_object()
                .filter(|c| !c.is_empty())
                .with_context(|| format!("{at} {status}: no content"))?;
            ensure!(
                *status < 400 || content.keys().eq(["application/json"]),
                "{at} {status}: an error is application/json only"
            );
            for (media_type, media) in content {
                let at = format!("{at} {status} {media_type}");
                let schema = media
                    .get("schema")
                    .with_context(|| format!("{at}: no schema"))?;
                let examples = media_examples(media);
                match media_type.as_str() {
                    "application/json" | "text/plain" => {
                        ensure!(!examples.is_empty(), "{at}: no example");
                    }
                    // Binary: no example to write down.
                    "application/octet-stream" | "image/svg+xml" => {}
                    other => bail!("{at}: media type {other} is not checked by this test"),
                }
                for example in examples {
                    doc.validate(schema, example, &format!("{at} example"))?;
                    if let Some(code) = example.get("error").and_then(Value::as_str) {
                        ensure!(
                            codes.get(code) == Some(status),
                            "{at}: example code `{code}` belongs to status {:?}",
                            codes.get(code)
                        );
                    }
                    checked += 1;
                }
            }
        }
        let parameters: Vec<&Value> = operation.op["parameters"]
            .as_array()
            .map(|p| p.iter().collect())
            .unwrap_or_default();
        let names: BTreeSet<&str> = parameters
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        for param in &parameters {
            let param_name = param["name"].as_str().unwrap_or("?");
            for (name, example) in param["examples"].as_object().into_iter().flatten() {
                let Some(with) = example.get("x-with") else {
                    continue;
                };
                let with = with.as_object().with_context(|| {
                    format!("{at} {param_name} example {name}: x-with is an object")
                })?;
                for other in with.keys() {
                    ensure!(
                        other != param_name && names.contains(other.as_str()),
                        "{at} {param_name} example {name}: x-with names `{other}`, not another parameter"
                    );
                }
            }
        }
        let body_schema = &operation.op["requestBody"]["content"]["application/json"]["schema"];
        for (name, example) in request_examples(operation.op) {
            let status = example["x-status"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .with_context(|| format!("{at} {name}: no x-status"))?;
            ensure!(
                responses.contains_key(&status),
                "{at} {name}: x-status {status} is not a documented response"
            );
            match example.get("x-error").and_then(Value::as_str) {
                Some(code) => ensure!(
                    codes.get(code) == Some(&status),
                    "{at} {name}: x-error `{code}` does not go with status {status}"
                ),
                None => {
                    ensure!(status < 400, "{at} {name}: an error example needs x-error");
                    if name.starts_with("requestBody") {
                        doc.validate(body_schema, &example["value"], &format!("{at} {name}"))?;
                    }
                }
            }
        }
    }
    ensure!(checked > 0, "no response example checked");
    Ok(())
}

/// One request to send and what it must get.
#[derive(Debug)]
struct Case {
    /// Where it comes from, for messages.
    name: String,
    method: reqwest::Method,
    /// Path and query.
    target: String,
    body: Option<(String, String)>,
    status: u16,
    error: Option<String>,
}

/// `value` as it goes into a URL: strings as they are, numbers as JSON writes them.
fn url_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The request examples of `operation` as requests: each example varies one parameter
/// (or the body); the parameters its `x-with` names take the values it gives them, path
/// parameters not varied their first example, optional query parameters not varied are
/// left out.
fn cases(operation: &Operation<'_>) -> anyhow::Result<Vec<Case>> {
    let method = reqwest::Method::from_bytes(operation.method.to_uppercase().as_bytes())?;
    let parameters: Vec<&Value> = operation.op["parameters"]
        .as_array()
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    let first_example = |param: &Value| -> anyhow::Result<String> {
        let examples = param["examples"]
            .as_object()
            .with_context(|| format!("{}: parameter without examples", operation.path))?;
        let (_, first) = examples.iter().next().context("no example")?;
        Ok(url_text(&first["value"]))
    };
    let target = |varied: Option<(&str, &Value)>,
                  with: Option<&Map<String, Value>>|
     -> anyhow::Result<String> {
        let mut path = operation.path.to_owned();
        let mut query = Vec::new();
        for param in &parameters {
            let name = param["name"].as_str().context("parameter name")?;
            let value = match (varied, with.and_then(|w| w.get(name))) {
                (Some((varied_name, value)), _) if varied_name == name => Some(url_text(value)),
                (_, Some(value)) => Some(url_text(value)),
                _ if param["in"] == "path" => Some(first_example(param)?),
                _ => None,
            };
            match (param["in"].as_str(), value) {
                (Some("path"), Some(value)) => path = path.replace(&format!("{{{name}}}"), &value),
                (Some("query"), Some(value)) => query.push(format!("{name}={value}")),
                (Some("query"), None) => {}
                (other, _) => bail!("{}: parameter in {other:?}", operation.path),
            }
        }
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        Ok(path)
    };
    let expectation = |example: &Value| -> anyhow::Result<(u16, Option<String>)> {
        let status = example["x-status"]
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .context("x-status")?;
        let error = example["x-error"].as_str().map(str::to_owned);
        Ok((status, error))
    };

    let mut found = Vec::new();
    let body_examples =
        operation.op["requestBody"]["content"]["application/json"]["examples"].as_object();
    for (name, example) in body_examples.into_iter().flatten() {
        let (status, error) = expectation(example)?;
        found.push(Case {
            name: format!("requestBody example {name}"),
            method: method.clone(),
            target: target(None, None)?,
            body: Some(("application/json".to_owned(), example["value"].to_string())),
            status,
            error,
        });
    }
    for param in &parameters {
        let param_name = param["name"].as_str().context("parameter name")?;
        for (name, example) in param["examples"].as_object().into_iter().flatten() {
            let (status, error) = expectation(example)?;
            found.push(Case {
                name: format!("parameter {param_name} example {name}"),
                method: method.clone(),
                target: target(
                    Some((param_name, &example["value"])),
                    example.get("x-with").and_then(Value::as_object),
                )?,
                body: None,
                status,
                error,
            });
        }
    }
    Ok(found)
}

/// What the service answered.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    /// The media type of the body, without parameters (`text/plain`, not
    /// `text/plain; version=0.0.4`).
    media_type: String,
    /// The body, parsed, when it is JSON; `null` otherwise.
    body: Value,
    bytes: Vec<u8>,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.media_type == "application/json" {
            write!(f, "{} {}", self.status, self.body)
        } else {
            let media_type = &self.media_type;
            write!(
                f,
                "{} ({} bytes of {media_type})",
                self.status,
                self.bytes.len()
            )
        }
    }
}

async fn send(
    service: &Service,
    listener: Listener,
    method: reqwest::Method,
    target: &str,
    body: Option<(&str, String)>,
) -> anyhow::Result<Answer> {
    send_with_headers(service, listener, method, target, body, &[]).await
}

/// [`send`] with more request headers.
async fn send_with_headers(
    service: &Service,
    listener: Listener,
    method: reqwest::Method,
    target: &str,
    body: Option<(&str, String)>,
    headers: &[(&str, String)],
) -> anyhow::Result<Answer> {
    let mut request = http().request(method, listener.url(service, target));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    if let Some((content_type, body)) = body {
        request = request.header("content-type", content_type).body(body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let content_type = tests::content_type(&response);
    let headers = response.headers().clone();
    let bytes = response.bytes().await?.to_vec();
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let body = if media_type == "application/json" {
        serde_json::from_slice(&bytes).with_context(|| {
            format!("{target}: answered {status} with a JSON body that is not JSON")
        })?
    } else {
        Value::Null
    };
    Ok(Answer {
        status,
        headers,
        media_type,
        body,
        bytes,
    })
}

/// Checks an answer against the documented response of its status: a documented media
/// type; for JSON, the schema and the fields of one of the examples; for the Prometheus
/// text, every metric family the example declares; for binary types, what the bytes
/// start with.
fn check_answer(
    doc: &Document,
    responses: &BTreeMap<u16, &Value>,
    at: &str,
    answer: &Answer,
) -> anyhow::Result<()> {
    let response = responses.get(&answer.status).with_context(|| {
        format!(
            "{at}: answered {answer}, a status that is not documented ({:?} are)",
            responses.keys().collect::<Vec<_>>(),
        )
    })?;
    let content = &response["content"];
    let media = content.get(&answer.media_type).with_context(|| {
        format!(
            "{at}: answered {} as {:?}, the document has {:?}",
            answer.status,
            answer.media_type,
            content.as_object().map(|c| c.keys().collect::<Vec<_>>())
        )
    })?;
    let schema = &media["schema"];
    match answer.media_type.as_str() {
        "application/json" => {
            doc.validate(schema, &answer.body, at)?;
            let mut differences = Vec::new();
            let examples = media_examples(media);
            let matched = examples.iter().any(|example| {
                let before = differences.len();
                field_differences(example, &answer.body, at, &mut differences);
                differences.len() == before
            });
            ensure!(
                matched,
                "{at}: no documented example of {} has the fields of the answer {}:\n{}",
                answer.status,
                answer.body,
                differences.join("\n")
            );
        }
        "text/plain" => {
            let text = std::str::from_utf8(&answer.bytes)
                .with_context(|| format!("{at}: text that is not UTF-8"))?;
            doc.validate(schema, &Value::String(text.to_owned()), at)?;
            for example in media_examples(media) {
                let example = example.as_str().unwrap_or_default();
                for family in example.lines().filter(|l| l.starts_with("# TYPE ")) {
                    ensure!(
                        text.lines().any(|line| line == family),
                        "{at}: the example declares `{family}`, the answer does not:\n{text}"
                    );
                }
            }
        }
        "image/svg+xml" => {
            let text = String::from_utf8_lossy(&answer.bytes);
            ensure!(text.contains("<svg"), "{at}: an SVG without <svg: {text}");
        }
        "application/octet-stream" => ensure!(
            answer.bytes.starts_with(&[0x1f, 0x8b]),
            "{at}: {} bytes that are not gzip",
            answer.bytes.len()
        ),
        other => bail!("{at}: teach this test to check a {other} answer"),
    }
    for header in response["headers"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|h| h.0)
    {
        ensure!(
            answer.headers.contains_key(header.as_str()),
            "{at}: documented header {header} is missing"
        );
    }
    Ok(())
}

fn error_schema(doc: &Document) -> &Value {
    &doc.root["components"]["schemas"]["Error"]
}

/// The upstream of the test: client-service's contract (`GET /objects/{id}` answers
/// `{"id":N,"online":N%2==0}`), except that it answers `404` about [`DEAD_IDS`]. It stops
/// accepting connections when dropped.
struct DeadLetteringUpstream {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl DeadLetteringUpstream {
    async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer_upstream_requests(stream));
            }
        });
        Ok(Self { addr, accept })
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for DeadLetteringUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Answers the requests of one keep-alive connection until the client closes it.
async fn answer_upstream_requests(stream: TcpStream) -> anyhow::Result<()> {
    let mut conn = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if conn.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        loop {
            let mut header = String::new();
            if conn.read_line(&mut header).await? == 0 {
                return Ok(());
            }
            if header.trim_end().is_empty() {
                break;
            }
        }
        let id = request_line
            .split_whitespace()
            .nth(1)
            .and_then(|path| path.strip_prefix("/objects/"))
            .and_then(|id| id.parse::<i64>().ok());
        let (status, body) = match id {
            Some(id) if DEAD_IDS.contains(&id) => ("404 Not Found", String::new()),
            Some(id) => (
                "200 OK",
                json!({ "id": id, "online": id % 2 == 0 }).to_string(),
            ),
            None => ("400 Bad Request", String::new()),
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.get_mut().write_all(reply.as_bytes()).await?;
    }
}

/// Waits until the pipeline has fetched `distinct` ids (each accepted id at least once),
/// written every online one and listed every one of [`DEAD_IDS`] as a dead letter.
async fn wait_until_settled(service: &Service, distinct: usize) -> anyhow::Result<()> {
    let distinct = u64::try_from(distinct)?;
    let dead: Vec<String> = DEAD_IDS.iter().map(i64::to_string).collect();
    let failures = format!("/failures?ids={}", dead.join(","));
    eventually(WAIT, POLL, || async {
        let stats: Value = http()
            .get(service.admin_url("/stats"))
            .send()
            .await?
            .json()
            .await?;
        let count = |key: &str| stats[key].as_u64().unwrap_or(0);
        let fetched = count("online") + count("offline") + count("failed") >= distinct
            && count("stored") >= count("online");
        if !fetched {
            return Ok(None);
        }
        let listed: Value = http()
            .get(service.admin_url(&failures))
            .send()
            .await?
            .json()
            .await?;
        let listed: BTreeSet<i64> = listed["failures"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["id"].as_i64())
            .collect();
        Ok((listed == BTreeSet::from(DEAD_IDS)).then_some(()))
    })
    .await
    .context("the pipeline did not settle the accepted examples and the dead letters")
}

/// The bodies of `operation` that cannot be examples (not JSON, not declared as JSON, over
/// a limit), each with the status and code it must get.
fn unexampled_bodies(
    operation: &Operation<'_>,
) -> anyhow::Result<Vec<(u16, &'static str, &'static str, String)>> {
    let not_json = (400, "invalid_json", "application/json", "{".to_owned());
    let operation_id = operation.op["operationId"].as_str().unwrap_or_default();
    Ok(match operation_id {
        "postCallback" => vec![
            not_json,
            (
                415,
                "unsupported_media_type",
                "text/plain",
                r#"{"object_ids":[0]}"#.to_owned(),
            ),
            (
                413,
                "payload_too_large",
                "application/json",
                json!({ "object_ids": vec![0; MAX_IDS + 1] }).to_string(),
            ),
        ],
        "replayFailures" | "purgeFailures" => vec![
            not_json,
            (
                413,
                "payload_too_large",
                "application/json",
                json!({ "ids": vec![0; MAX_SELECTED_IDS + 1] }).to_string(),
            ),
        ],
        other => bail!(
            "{} {}: teach this test the bodies of {other:?} that cannot be examples",
            operation.method,
            operation.path
        ),
    })
}

/// Sends every example request of `operation` to its listener (and, for a JSON body, the
/// bodies that cannot be examples) and checks each answer; returns how many requests were
/// sent. The ids of bodies answered `202` are added to `accepted`.
async fn exercise(
    doc: &Document,
    service: &Service,
    operation: &Operation<'_>,
    accepted: &mut BTreeSet<i64>,
) -> anyhow::Result<usize> {
    let mut sent = 0;
    let listener = operation.listener;
    let responses = doc.responses(operation.op)?;
    let mut cases = cases(operation)?;
    if cases.is_empty() {
        // No examples: the plain request must get a documented success status.
        let success = *responses
            .keys()
            .find(|s| (200..300).contains(*s))
            .with_context(|| format!("{}: no success response", operation.path))?;
        cases.push(Case {
            name: "the request without parameters".to_owned(),
            method: reqwest::Method::from_bytes(operation.method.to_uppercase().as_bytes())?,
            target: operation.path.to_owned(),
            body: None,
            status: success,
            error: None,
        });
    }
    for case in cases {
        let at = format!(
            "{} {} on the {listener} listener ({})",
            case.method, case.target, case.name
        );
        let body = case.body.as_ref().map(|(t, b)| (t.as_str(), b.clone()));
        let answer = send(service, listener, case.method.clone(), &case.target, body).await?;
        ensure!(
            answer.status == case.status,
            "{at}: expected {}, got {answer}",
            case.status,
        );
        check_answer(doc, &responses, &at, &answer)?;
        if let Some(code) = &case.error {
            ensure!(
                answer.body["error"] == code.as_str(),
                "{at}: expected error {code}, got {answer}",
            );
        }
        if answer.status == 202
            && let Some((_, body)) = &case.body
        {
            let body: Value = serde_json::from_str(body)?;
            accepted.extend(
                body["object_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_i64),
            );
        }
        sent += 1;
    }

    if operation.op["requestBody"]["content"]["application/json"].is_object() {
        let method = reqwest::Method::from_bytes(operation.method.to_uppercase().as_bytes())?;
        for (status, code, content_type, body) in unexampled_bodies(operation)? {
            let at = format!(
                "{method} {} on the {listener} listener ({content_type}, {status})",
                operation.path
            );
            ensure!(
                responses.contains_key(&status),
                "{at}: {status} is not documented"
            );
            let answer = send(
                service,
                listener,
                method.clone(),
                operation.path,
                Some((content_type, body)),
            )
            .await?;
            ensure!(
                answer.status == status && answer.body["error"] == code,
                "{at}: expected {status} {code}, got {answer}",
            );
            check_answer(doc, &responses, &at, &answer)?;
            sent += 1;
        }
    }
    Ok(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_service_answers_as_documented() -> anyhow::Result<()> {
    let doc = Document::load()?;
    let upstream = DeadLetteringUpstream::start().await?;
    let max_ids = MAX_IDS.to_string();
    let Some(service) = Service::start(
        Backend::Sqlite,
        &upstream.base_url(),
        Duration::from_secs(120),
        &[("CALLBACK_HTTP__MAX_IDS", &max_ids)],
    )
    .await?
    else {
        bail!("SQLite is always available");
    };

    // The dead letters the admin examples list, replay and purge.
    let seeded = http()
        .post(service.url("/callback"))
        .header("content-type", "application/json")
        .body(json!({ "object_ids": DEAD_IDS }).to_string())
        .send()
        .await?
        .status();
    ensure!(seeded == 202, "the callback of the dead ids got {seeded}");
    let mut accepted: BTreeSet<i64> = DEAD_IDS.into_iter().collect();

    let operations = doc.operations()?;
    // Requests that change state on the API go first; then, once the pipeline has settled
    // what they accepted and the dead letters, the reads, each asked once: the state they
    // see no longer changes; the admin listener's replays and purges last (purges last of
    // all), so that the reads list every dead letter.
    let (writes, reads): (Vec<_>, Vec<_>) = operations.iter().partition(|o| o.method != "get");
    let (mut admin_writes, api_writes): (Vec<_>, Vec<_>) = writes
        .into_iter()
        .partition(|o| o.listener == Listener::Admin);
    admin_writes.sort_by_key(|o| o.method == "delete");
    let mut sent = 0;
    for operation in api_writes {
        sent += exercise(&doc, &service, operation, &mut accepted).await?;
    }
    wait_until_settled(&service, accepted.len()).await?;
    for operation in reads.into_iter().chain(admin_writes) {
        sent += exercise(&doc, &service, operation, &mut accepted).await?;
    }
    ensure!(sent >= operations.len(), "only {sent} requests sent");

    // A documented path asked with a method it does not document: 405 naming the others.
    let mut documented: BTreeMap<&str, (Listener, BTreeSet<String>)> = BTreeMap::new();
    for operation in &operations {
        documented
            .entry(operation.path)
            .or_insert_with(|| (operation.listener, BTreeSet::new()))
            .1
            .insert(operation.method.to_uppercase());
    }
    let concrete = |path: &str| -> anyhow::Result<String> {
        let concrete = path.replace("{id}", "0");
        ensure!(
            !concrete.contains('{'),
            "{path}: teach this test a value for its parameter"
        );
        Ok(concrete)
    };
    for (path, (listener, methods)) in &documented {
        let concrete = concrete(path)?;
        for method in PROBED_METHODS {
            let method = method.to_uppercase();
            if methods.contains(&method) {
                continue;
            }
            let at = format!("{method} {concrete} on the {listener} listener");
            let body = Some(("application/json", r#"{"object_ids":[0]}"#.to_owned()));
            let answer = send(
                &service,
                *listener,
                reqwest::Method::from_bytes(method.as_bytes())?,
                &concrete,
                body,
            )
            .await?;
            ensure!(
                answer.status == 405 && answer.body["error"] == "method_not_allowed",
                "{at}: expected 405 method_not_allowed, got {answer}",
            );
            doc.validate(error_schema(&doc), &answer.body, &at)?;
            let allow: BTreeSet<String> = answer
                .headers
                .get("allow")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .split(',')
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect();
            ensure!(
                &allow == methods,
                "{at}: Allow says {allow:?}, the document {methods:?}"
            );
        }
    }

    // Paths the document does not list for a listener, the other listener's among them: 404.
    for (listener, unlisted) in [
        (
            Listener::Api,
            &[
                "/nope",
                "/objects/",
                "/objects/0/extra",
                "/callback/extra",
                "/Objects",
            ][..],
        ),
        (
            Listener::Admin,
            &[
                "/nope",
                "/failures/",
                "/failures/replay/extra",
                "/Failures",
                "/debug/pprof",
            ][..],
        ),
    ] {
        let mut paths: Vec<String> = unlisted.iter().map(|p| (*p).to_owned()).collect();
        for (path, (served_by, _)) in &documented {
            if *served_by != listener {
                paths.push(concrete(path)?);
            }
        }
        for path in paths {
            let at = format!("GET {path} on the {listener} listener");
            let answer = send(&service, listener, reqwest::Method::GET, &path, None).await?;
            ensure!(
                answer.status == 404 && answer.body["error"] == "not_found",
                "{at}: expected 404 not_found, got {answer}",
            );
            doc.validate(error_schema(&doc), &answer.body, &at)?;
        }
    }
    drop(upstream);
    Ok(())
}

/// With authentication on (`auth.mode = "bearer"`), each API operation as its `security`
/// says: one that names a scheme documents `401` and answers it, as documented (envelope,
/// a `WWW-Authenticate` the document lists), to a request without credentials, and a
/// documented answer other than `401` to the same request with a key; one that names none
/// (health) succeeds without credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_each_api_operation_is_checked_as_its_security_says() -> anyhow::Result<()> {
    const KEY: &str = "openapi-test-key";
    let doc = Document::load()?;
    let schemes = doc.root["components"]["securitySchemes"]
        .as_object()
        .context("components.securitySchemes")?;
    let challenge_schema = &doc.root["components"]["headers"]["WwwAuthenticate"]["schema"];
    let upstream = DeadLetteringUpstream::start().await?;
    let Some(service) = Service::start(
        Backend::Sqlite,
        &upstream.base_url(),
        Duration::from_secs(120),
        &[
            ("CALLBACK_AUTH__MODE", "bearer"),
            ("CALLBACK_AUTH__API_KEYS", KEY),
        ],
    )
    .await?
    else {
        bail!("SQLite is always available");
    };
    let mut protected = 0;
    for operation in doc.operations()? {
        let method = reqwest::Method::from_bytes(operation.method.to_uppercase().as_bytes())?;
        let at = format!("{method} {} with auth on", operation.path);
        let responses = doc.responses(operation.op)?;
        let named: BTreeSet<&str> = operation.op["security"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_object)
            .flat_map(|requirement| requirement.keys().map(String::as_str))
            .collect();
        for name in &named {
            ensure!(
                schemes.contains_key(*name),
                "{at}: no security scheme {name}"
            );
        }
        if operation.listener == Listener::Admin {
            ensure!(
                named.is_empty() && !responses.contains_key(&401),
                "{at}: the admin listener is never authenticated"
            );
            continue;
        }
        // The first example documented to succeed, or the plain request.
        let (target, body, success) = match cases(&operation)?
            .into_iter()
            .find(|case| (200..300).contains(&case.status))
        {
            Some(case) => (case.target, case.body, case.status),
            None => (
                operation.path.to_owned(),
                None,
                *responses
                    .keys()
                    .find(|s| (200..300).contains(*s))
                    .with_context(|| format!("{at}: no success response"))?,
            ),
        };
        let body = || body.as_ref().map(|(t, b)| (t.as_str(), b.clone()));
        let without = send(&service, Listener::Api, method.clone(), &target, body()).await?;
        if named.is_empty() {
            ensure!(
                !responses.contains_key(&401),
                "{at}: 401 is documented but the security names no scheme"
            );
            ensure!(
                without.status == success,
                "{at}: expected {success} without credentials, got {without}"
            );
            continue;
        }
        ensure!(
            responses.contains_key(&401) && named.contains("apiKey"),
            "{at}: a checked operation documents 401 and the apiKey scheme"
        );
        ensure!(
            without.status == 401 && without.body["error"] == "unauthorized",
            "{at}: expected 401 unauthorized without credentials, got {without}"
        );
        check_answer(&doc, &responses, &at, &without)?;
        let challenge = without
            .headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        doc.validate(challenge_schema, &Value::from(challenge), &at)?;
        let key = [("authorization", format!("Bearer {KEY}"))];
        let with =
            send_with_headers(&service, Listener::Api, method, &target, body(), &key).await?;
        // Past authentication, the request is served as without auth (an object not
        // stored yet is a documented 404).
        ensure!(
            with.status != 401,
            "{at}: expected the key to be accepted, got {with}"
        );
        check_answer(&doc, &responses, &at, &with)?;
        protected += 1;
    }
    ensure!(
        protected >= 3,
        "only {protected} operations checked for credentials"
    );
    drop(upstream);
    Ok(())
}
