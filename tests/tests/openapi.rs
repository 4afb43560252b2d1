//! `docs/openapi.json` against the code and the running service.
//!
//! - The documented routes are the routes `http-transport`'s public router declares.
//! - The error codes of the document, of README.md's table and of
//!   `crates/http-transport/src/error.rs` are the same, with the same statuses.
//! - Every example in the document matches its schema.
//! - Against the real `callback-service` (SQLite, client-service's simulator as upstream):
//!   every request example is sent and gets the status it documents (`x-status`, and
//!   `x-error` for the code) with a body that matches the documented schema; a documented
//!   path asked with another method answers `405` with the documented methods in `Allow`;
//!   undocumented paths answer `404`; a body that is not JSON, not declared as JSON or over
//!   the id limit gets the documented `400`, `415` and `413`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use tests::{
    Backend, Service, Upstream, eventually, http, parse_rfc3339_micros, read_workspace_file,
};

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

/// The document, with `$ref`s followed on demand.
struct Document {
    root: Value,
}

/// One documented operation.
struct Operation<'d> {
    path: &'d str,
    method: &'d str,
    op: &'d Value,
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

    fn operations(&self) -> anyhow::Result<Vec<Operation<'_>>> {
        let paths = self.root["paths"]
            .as_object()
            .context("the document has no paths")?;
        let mut found = Vec::new();
        for (path, item) in paths {
            let item = item.as_object().context("a path item is an object")?;
            for (method, op) in item {
                if METHODS.contains(&method.as_str()) {
                    found.push(Operation { path, method, op });
                } else {
                    ensure!(
                        method == "parameters" || method == "summary" || method == "description",
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

    /// The JSON schema of a response, if it has JSON content.
    fn response_schema<'d>(&'d self, response: &'d Value) -> Option<&'d Value> {
        response
            .get("content")?
            .get("application/json")?
            .get("schema")
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
                // Annotations: nothing to check.
                "description" | "title" | "default" | "example" | "examples" => {}
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

/// The `(METHOD, "/path")` routes of the public router in `http-transport`'s `api.rs`.
fn routes_in_api_rs() -> anyhow::Result<BTreeSet<(String, String)>> {
    let source = read_workspace_file("crates/http-transport/src/api.rs")?;
    let mut routes = BTreeSet::new();
    for piece in source.split(".route(Method::").skip(1) {
        let (method, rest) = piece
            .split_once(',')
            .context("api.rs: .route(Method::X, \"/path\", handler)")?;
        let path = rest
            .trim_start()
            .strip_prefix('"')
            .and_then(|r| r.split_once('"'))
            .map(|(path, _)| path)
            .context("api.rs: the route's path is a string literal")?;
        routes.insert((method.trim().to_lowercase(), path.to_owned()));
    }
    ensure!(!routes.is_empty(), "no .route(Method::…) found in api.rs");
    Ok(routes)
}

#[test]
fn the_documented_routes_are_the_routes_of_the_public_router() -> anyhow::Result<()> {
    let doc = Document::load()?;
    let documented: BTreeSet<(String, String)> = doc
        .operations()?
        .iter()
        .map(|o| (o.method.to_owned(), o.path.to_owned()))
        .collect();
    let real = routes_in_api_rs()?;
    assert_eq!(
        documented, real,
        "docs/openapi.json (left) and the router in crates/http-transport/src/api.rs (right) disagree"
    );
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
            let content = &response["content"]["application/json"];
            let schema = doc
                .response_schema(response)
                .with_context(|| format!("{at} {status}: no application/json schema"))?;
            let mut examples: Vec<&Value> = Vec::new();
            if let Some(example) = content.get("example") {
                examples.push(example);
            }
            for example in content["examples"].as_object().into_iter().flatten() {
                examples.push(&example.1["value"]);
            }
            ensure!(!examples.is_empty(), "{at} {status}: no example");
            for example in examples {
                doc.validate(schema, example, &format!("{at} {status} example"))?;
                if let Some(code) = example.get("error").and_then(Value::as_str) {
                    ensure!(
                        codes.get(code) == Some(status),
                        "{at} {status}: example code `{code}` belongs to status {:?}",
                        codes.get(code)
                    );
                }
                checked += 1;
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
/// (or the body); path parameters not varied take their first example, optional query
/// parameters not varied are left out.
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
    let target = |varied: Option<(&str, &Value)>| -> anyhow::Result<String> {
        let mut path = operation.path.to_owned();
        let mut query = Vec::new();
        for param in &parameters {
            let name = param["name"].as_str().context("parameter name")?;
            let value = match varied {
                Some((varied_name, value)) if varied_name == name => Some(url_text(value)),
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
            target: target(None)?,
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
                target: target(Some((param_name, &example["value"])))?,
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
    body: Value,
}

async fn send(
    service: &Service,
    method: reqwest::Method,
    target: &str,
    body: Option<(&str, String)>,
) -> anyhow::Result<Answer> {
    let mut request = http().request(method, service.url(target));
    if let Some((content_type, body)) = body {
        request = request.header("content-type", content_type).body(body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await?;
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    ensure!(
        content_type == "application/json",
        "{target}: answered {status} with content-type {content_type:?}: {text}"
    );
    let body = serde_json::from_str(&text)
        .with_context(|| format!("{target}: answered {status} with a body that is not JSON"))?;
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// Checks an answer against the documented response of its status.
fn check_answer(
    doc: &Document,
    responses: &BTreeMap<u16, &Value>,
    at: &str,
    answer: &Answer,
) -> anyhow::Result<()> {
    let response = responses.get(&answer.status).with_context(|| {
        format!(
            "{at}: answered {}, which is not documented ({:?} are): {}",
            answer.status,
            responses.keys().collect::<Vec<_>>(),
            answer.body
        )
    })?;
    let schema = doc
        .response_schema(response)
        .with_context(|| format!("{at}: no schema for {}", answer.status))?;
    doc.validate(schema, &answer.body, at)?;
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

/// Waits until the pipeline has fetched `distinct` ids (each accepted id at least once)
/// and written every online one.
async fn wait_until_settled(service: &Service, distinct: usize) -> anyhow::Result<()> {
    let distinct = u64::try_from(distinct)?;
    eventually(WAIT, POLL, || async {
        let stats: Value = http()
            .get(service.admin_url("/stats"))
            .send()
            .await?
            .json()
            .await?;
        let count = |key: &str| stats[key].as_u64().unwrap_or(0);
        let settled = count("online") + count("offline") + count("failed") >= distinct
            && count("stored") >= count("online");
        Ok(settled.then_some(()))
    })
    .await
    .context("the pipeline did not settle the accepted examples")
}

/// Sends every example request of `operation` (and, for a JSON body, the bodies that
/// cannot be examples) and checks each answer; returns how many requests were sent. The
/// ids of bodies answered `202` are added to `accepted`.
async fn exercise(
    doc: &Document,
    service: &Service,
    operation: &Operation<'_>,
    accepted: &mut BTreeSet<i64>,
) -> anyhow::Result<usize> {
    let mut sent = 0;
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
        let at = format!("{} {} ({})", case.method, case.target, case.name);
        let body = case.body.as_ref().map(|(t, b)| (t.as_str(), b.clone()));
        let answer = send(service, case.method.clone(), &case.target, body).await?;
        ensure!(
            answer.status == case.status,
            "{at}: expected {}, got {} {}",
            case.status,
            answer.status,
            answer.body
        );
        check_answer(doc, &responses, &at, &answer)?;
        if let Some(code) = &case.error {
            ensure!(
                answer.body["error"] == code.as_str(),
                "{at}: expected error {code}, got {}",
                answer.body
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

    // Bodies that cannot be examples: not JSON, not declared as JSON, too many ids.
    let body_content = &operation.op["requestBody"]["content"]["application/json"];
    if body_content.is_object() {
        let method = reqwest::Method::from_bytes(operation.method.to_uppercase().as_bytes())?;
        let too_many = json!({ "object_ids": vec![0; MAX_IDS + 1] }).to_string();
        for (status, code, content_type, body) in [
            (400, "invalid_json", "application/json", "{".to_owned()),
            (
                415,
                "unsupported_media_type",
                "text/plain",
                r#"{"object_ids":[0]}"#.to_owned(),
            ),
            (413, "payload_too_large", "application/json", too_many),
        ] {
            let at = format!("{method} {} ({content_type}, {status})", operation.path);
            ensure!(
                responses.contains_key(&status),
                "{at}: {status} is not documented"
            );
            let answer = send(
                service,
                method.clone(),
                operation.path,
                Some((content_type, body)),
            )
            .await?;
            ensure!(
                answer.status == status && answer.body["error"] == code,
                "{at}: expected {status} {code}, got {} {}",
                answer.status,
                answer.body
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
    let upstream = Upstream::start(0, 1).await?;
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

    let operations = doc.operations()?;
    // Requests that change state go first; then, once the pipeline has settled what they
    // accepted, the reads, each asked once: the state they see no longer changes.
    let (writes, reads): (Vec<_>, Vec<_>) = operations.iter().partition(|o| o.method != "get");
    let mut sent = 0;
    let mut accepted = BTreeSet::new();
    for operation in writes {
        sent += exercise(&doc, &service, operation, &mut accepted).await?;
    }
    wait_until_settled(&service, accepted.len()).await?;
    for operation in reads {
        sent += exercise(&doc, &service, operation, &mut accepted).await?;
    }
    ensure!(sent >= operations.len(), "only {sent} requests sent");

    // A documented path asked with a method it does not document: 405 naming the others.
    let mut documented: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for operation in &operations {
        documented
            .entry(operation.path)
            .or_default()
            .insert(operation.method.to_uppercase());
    }
    for (path, methods) in &documented {
        let concrete = path.replace("{id}", "0");
        ensure!(
            !concrete.contains('{'),
            "{path}: teach this test a value for its parameter"
        );
        for method in PROBED_METHODS {
            let method = method.to_uppercase();
            if methods.contains(&method) {
                continue;
            }
            let at = format!("{method} {concrete}");
            let body = Some(("application/json", r#"{"object_ids":[0]}"#.to_owned()));
            let answer = send(
                &service,
                reqwest::Method::from_bytes(method.as_bytes())?,
                &concrete,
                body,
            )
            .await?;
            ensure!(
                answer.status == 405 && answer.body["error"] == "method_not_allowed",
                "{at}: expected 405 method_not_allowed, got {} {}",
                answer.status,
                answer.body
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

    // Paths the document does not list: 404.
    for path in [
        "/nope",
        "/objects/",
        "/objects/0/extra",
        "/callback/extra",
        "/Objects",
    ] {
        let answer = send(&service, reqwest::Method::GET, path, None).await?;
        ensure!(
            answer.status == 404 && answer.body["error"] == "not_found",
            "GET {path}: expected 404 not_found, got {} {}",
            answer.status,
            answer.body
        );
        doc.validate(error_schema(&doc), &answer.body, path)?;
    }
    drop(upstream);
    Ok(())
}
