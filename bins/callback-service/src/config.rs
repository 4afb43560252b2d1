//! The service's configuration: built-in defaults, then `config/default.toml`, then the
//! file named by `--config`, then `CALLBACK_…` environment variables, then flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use telemetry::{LogFormat, TelemetryConfig};

/// The file read after the built-in defaults, relative to the working directory.
pub const DEFAULT_FILE: &str = "config/default.toml";

/// The shortest `pipeline.lease_ms`: the heartbeat renews leases every third of it, and a
/// renewal every 100 ms is already a steady load on the database.
const MIN_LEASE_MS: u64 = 300;

/// Command-line flags for the common keys; each overrides every other source.
#[derive(Debug, Default, Parser)]
#[command(
    name = "callback-service",
    version,
    about = "Ingests callbacks, fetches object status upstream, stores online objects and expires them"
)]
pub struct Flags {
    /// A TOML file read after config/default.toml
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// http.listen: the public API address
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// admin.listen: the admin listener address
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// database.url: sqlite://PATH or postgres://…
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// upstream.base_url: where GET /objects/{id} is asked
    #[arg(long, value_name = "URL")]
    pub upstream_url: Option<String>,
    /// expiry.ttl_ms: how long after last_seen an object is deleted
    #[arg(long, value_name = "MS")]
    pub ttl_ms: Option<u64>,
}

impl Flags {
    /// The flags that were given, as a nested map figment can merge.
    fn as_provider(&self) -> Serialized<serde_json::Value> {
        let mut root = serde_json::Map::new();
        let mut set = |section: &str, key: &str, value: serde_json::Value| {
            let entry = root
                .entry(section.to_owned())
                .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
            if let serde_json::Value::Object(map) = entry {
                map.insert(key.to_owned(), value);
            }
        };
        if let Some(v) = &self.listen {
            set("http", "listen", v.clone().into());
        }
        if let Some(v) = &self.admin_listen {
            set("admin", "listen", v.clone().into());
        }
        if let Some(v) = &self.database_url {
            set("database", "url", v.clone().into());
        }
        if let Some(v) = &self.upstream_url {
            set("upstream", "base_url", v.clone().into());
        }
        if let Some(v) = self.ttl_ms {
            set("expiry", "ttl_ms", v.into());
        }
        Serialized::defaults(serde_json::Value::Object(root))
    }
}

/// Everything the service can be told.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The public API listener.
    pub http: HttpSection,
    /// The admin/debug listener.
    pub admin: AdminSection,
    /// The database.
    pub database: DatabaseSection,
    /// The upstream API.
    pub upstream: UpstreamSection,
    /// Expiry of stored objects.
    pub expiry: ExpirySection,
    /// The fetch → store pipeline.
    pub pipeline: PipelineSection,
    /// `[failures]`.
    pub failures: FailuresSection,
    /// Logs, traces and heap profiling.
    pub telemetry: TelemetrySection,
    /// Who may call the public API.
    pub auth: AuthSection,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Address of the public API.
    pub listen: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most ids in one callback.
    pub max_ids: usize,
    /// How long a client may take to send its request headers.
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send its request body.
    pub body_read_timeout_ms: u64,
    /// Most open connections at once.
    pub max_connections: usize,
    /// Bytes the callbacks being received at once may hold together; past it, fast 503s.
    pub max_body_memory_bytes: usize,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace_ms: u64,
    /// On SIGTERM, how long `GET /readyz` answers 503 while everything is still served,
    /// before the listener stops accepting (load balancers stop sending meanwhile).
    pub shutdown_delay_ms: u64,
    /// The API's certificate chain (PEM); with `tls_key_file`, the API speaks HTTPS only.
    /// Empty: plain HTTP.
    pub tls_cert_file: String,
    /// The API certificate's private key (PEM).
    pub tls_key_file: String,
    /// How often both listeners' certificate files are read again; 0: only on SIGHUP.
    pub tls_reload_interval_ms: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            max_body_bytes: 1_048_576,
            max_ids: 10_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            max_connections: 10_000,
            max_body_memory_bytes: 67_108_864,
            shutdown_grace_ms: 10_000,
            shutdown_delay_ms: 5_000,
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_reload_interval_ms: 2_000,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Address of the admin listener (keep it on loopback).
    pub listen: SocketAddr,
    /// The admin listener's certificate chain (PEM); with `tls_key_file`, HTTPS only.
    /// Empty: plain HTTP.
    pub tls_cert_file: String,
    /// Its private key (PEM).
    pub tls_key_file: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 6060)),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

/// `[database]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSection {
    /// `sqlite://PATH` (embedded, the default) or `postgres://…`.
    pub url: String,
    /// Pool size.
    pub max_connections: usize,
    /// How long a caller waits for a pooled connection.
    pub wait_timeout_ms: u64,
    /// How long opening one connection may take (PostgreSQL).
    pub connect_timeout_ms: u64,
    /// The longest one statement may run before the server cancels it (PostgreSQL).
    pub statement_timeout_ms: u64,
    /// PostgreSQL: the CA certificates (PEM) the server's must chain up to; empty: the
    /// url's `sslrootcert`, if any.
    pub tls_ca_file: String,
    /// PostgreSQL: a client certificate (PEM) for mutual TLS; empty: the url's `sslcert`.
    pub tls_cert_file: String,
    /// PostgreSQL: the client certificate's key (PEM); empty: the url's `sslkey`.
    pub tls_key_file: String,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        Self {
            url: "sqlite://data/callback-service.db".to_owned(),
            max_connections: 8,
            wait_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            statement_timeout_ms: 30_000,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

/// `[upstream]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    /// Base URL of the upstream API.
    pub base_url: String,
    /// Timeout of one request; above the 4 s worst case.
    pub request_timeout_ms: u64,
    /// Timeout of one connection attempt.
    pub connect_timeout_ms: u64,
    /// How long one fetch may keep retrying transient failures in-process before the id
    /// is handed back to the inbox for a later attempt.
    pub retry_deadline_ms: u64,
    /// The longest pause before the first attempt from the inbox; it doubles per failure.
    pub retry_first_delay_ms: u64,
    /// The longest pause between two attempts from the inbox.
    pub retry_max_delay_ms: u64,
    /// How long after its first request an id keeps being retried before it becomes a
    /// dead letter.
    pub retry_horizon_ms: u64,
    /// Most upstream requests in flight at once.
    pub max_in_flight: usize,
    /// Most upstream requests per second (retries included); 0 = unlimited.
    pub max_requests_per_second: u32,
    /// Transient fetch failures in a row that open the circuit breaker (fetching pauses);
    /// 0 = never.
    pub breaker_failures: u32,
    /// How long an open breaker fetches nothing before it probes with one fetch.
    pub breaker_cool_down_ms: u64,
    /// An `https://` upstream's private CA (PEM) instead of Mozilla's roots; empty: none.
    pub tls_ca_file: String,
    /// A client certificate (PEM) for an upstream that asks for one; empty: none.
    pub tls_cert_file: String,
    /// Its private key (PEM); empty: none.
    pub tls_key_file: String,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:9010".to_owned(),
            request_timeout_ms: 5_000,
            connect_timeout_ms: 3_000,
            retry_deadline_ms: 2_000,
            retry_first_delay_ms: 1_000,
            retry_max_delay_ms: 300_000,
            retry_horizon_ms: 86_400_000,
            max_in_flight: 512,
            max_requests_per_second: 0,
            breaker_failures: 10,
            breaker_cool_down_ms: 5_000,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

/// `[expiry]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExpirySection {
    /// How long after `last_seen` an object is deleted.
    pub ttl_ms: u64,
    /// Most rows one delete statement removes.
    pub delete_batch: usize,
}

impl Default for ExpirySection {
    fn default() -> Self {
        Self {
            ttl_ms: 30_000,
            delete_batch: 10_000,
        }
    }
}

/// `[pipeline]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSection {
    /// Most objects in one store write.
    pub max_batch: usize,
    /// Most distinct ids waiting or in flight before callbacks get 503.
    pub max_pending_ids: usize,
    /// How long shutdown lets the fetches in flight finish.
    pub drain_grace_ms: u64,
    /// Most callbacks committed to the inbox in one transaction (group commit).
    pub max_group: usize,
    /// How long a claimed id stays leased to this instance without a heartbeat (renewed
    /// every third of it while the fetch runs) before another may take it.
    pub lease_ms: u64,
    /// How often to look for ids whose lease ran out and to refresh the backlog figures.
    pub poll_interval_ms: u64,
    /// How long an id requested again during its fetch waits after it before the next one.
    pub refetch_delay_ms: u64,
    /// How long the first fetch outcome waits for others to share its store transaction.
    pub store_linger_ms: u64,
    /// The name this instance takes leases under; empty = the host name. Must be unique per
    /// running instance and stay the same across its restarts.
    pub instance_id: String,
}

impl Default for PipelineSection {
    fn default() -> Self {
        Self {
            max_batch: 1_000,
            max_pending_ids: 1_000_000,
            drain_grace_ms: 10_000,
            max_group: 1_024,
            lease_ms: 5_000,
            poll_interval_ms: 1_000,
            refetch_delay_ms: 250,
            store_linger_ms: 100,
            instance_id: String::new(),
        }
    }
}

/// `[failures]`: the dead letters.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailuresSection {
    /// How long a dead letter is kept unless replayed or purged first; 0 = for ever.
    pub retention_ms: u64,
}

impl Default for FailuresSection {
    fn default() -> Self {
        Self {
            retention_ms: 7 * 24 * 3_600_000,
        }
    }
}

/// `[telemetry]`: the keys shared with client-service ([`TelemetryConfig`]) and heap
/// profiling, which only this service has.
///
/// The shared keys are repeated here rather than flattened in: serde cannot refuse unknown
/// keys of a flattened struct, and a misspelt key must fail at start. `Default` and
/// [`TelemetrySection::common`] destructure [`TelemetryConfig`] field by field, so a new
/// shared key does not compile until it is added here too.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySection {
    /// The log filter when `RUST_LOG` is not set, in `EnvFilter` syntax.
    pub log_filter: String,
    /// Human or JSON log lines.
    pub log_format: LogFormat,
    /// Where spans are sent as Zipkin v2 JSON; empty turns this export off.
    pub zipkin_endpoint: String,
    /// Where spans are sent as OTLP over HTTP/protobuf (the full traces url); empty turns
    /// this export off.
    pub otlp_endpoint: String,
    /// The share of new traces recorded and exported, from 0.0 to 1.0.
    pub sample_ratio: f64,
    /// Whether jemalloc samples allocations from the start, so `GET /debug/pprof/heap`
    /// answers (Linux only).
    pub heap_profiling: bool,
    /// Whether a request's `traceparent` continues the caller's trace (and so decides its
    /// sampling); unset: yes while `auth.mode` is `none`, no once callers are checked
    /// ([`Config::trust_incoming_trace`]).
    pub trust_incoming_trace: Option<bool>,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        let TelemetryConfig {
            log_filter,
            log_format,
            zipkin_endpoint,
            otlp_endpoint,
            sample_ratio,
        } = TelemetryConfig::default();
        Self {
            log_filter,
            log_format,
            zipkin_endpoint,
            otlp_endpoint,
            sample_ratio,
            heap_profiling: true,
            trust_incoming_trace: None,
        }
    }
}

impl TelemetrySection {
    /// The settings `telemetry::init` takes.
    pub fn common(&self) -> TelemetryConfig {
        let Self {
            log_filter,
            log_format,
            zipkin_endpoint,
            otlp_endpoint,
            sample_ratio,
            heap_profiling: _,
            trust_incoming_trace: _,
        } = self;
        TelemetryConfig {
            log_filter: log_filter.clone(),
            log_format: *log_format,
            zipkin_endpoint: zipkin_endpoint.clone(),
            otlp_endpoint: otlp_endpoint.clone(),
            sample_ratio: *sample_ratio,
        }
    }
}

/// How callers of the public API authenticate (`auth.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Nobody is checked.
    #[default]
    None,
    /// `Authorization: Bearer <key>`, one of `auth.api_keys`.
    Bearer,
    /// Callbacks signed with one of `auth.webhook_secrets`; reads with a bearer key.
    StandardWebhooks,
}

impl AuthMode {
    fn name(self) -> &'static str {
        match self {
            AuthMode::None => "none",
            AuthMode::Bearer => "bearer",
            AuthMode::StandardWebhooks => "standard-webhooks",
        }
    }
}

/// `[auth]`: who may call the public API; off by default. The keys and secrets are never
/// logged: `Debug` and [`Config::redacted_json`] show `***` for each.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// `none`, `bearer` or `standard-webhooks`.
    pub mode: AuthMode,
    /// The bearer API keys accepted (a list, or one comma-separated string from the
    /// environment).
    #[serde(deserialize_with = "list_of_secrets")]
    pub api_keys: Vec<String>,
    /// The Standard Webhooks secrets (`whsec_<base64>`) callbacks may be signed with.
    #[serde(deserialize_with = "list_of_secrets")]
    pub webhook_secrets: Vec<String>,
    /// How far a callback's `webhook-timestamp` may be from the service's clock.
    pub tolerance_ms: u64,
    /// Whether `GET /objects` and `GET /objects/{id}` need a bearer key too (auth on).
    pub protect_reads: bool,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            api_keys: Vec::new(),
            webhook_secrets: Vec::new(),
            tolerance_ms: 300_000,
            protect_reads: true,
        }
    }
}

impl std::fmt::Debug for AuthSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSection")
            .field("mode", &self.mode)
            .field("api_keys", &redacted(&self.api_keys))
            .field("webhook_secrets", &redacted(&self.webhook_secrets))
            .field("tolerance_ms", &self.tolerance_ms)
            .field("protect_reads", &self.protect_reads)
            .finish()
    }
}

/// `***` for each secret of `list`.
fn redacted(list: &[String]) -> Vec<&'static str> {
    vec!["***"; list.len()]
}

/// The shortest `auth.tolerance_ms`: `webhook-timestamp` is in whole seconds.
const MIN_TOLERANCE_MS: u64 = 1_000;

impl AuthSection {
    /// What the HTTP layer enforces; fails naming the key at fault, never showing a secret.
    pub fn transport(&self) -> anyhow::Result<http_transport::AuthConfig> {
        let api_keys = self
            .api_keys
            .iter()
            .enumerate()
            .map(|(n, key)| {
                http_transport::ApiKey::new(key).map_err(|err| {
                    anyhow::anyhow!("invalid configuration: auth.api_keys[{n}] {err}")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let webhook_secrets = self
            .webhook_secrets
            .iter()
            .enumerate()
            .map(|(n, secret)| {
                http_transport::WebhookSecret::parse(secret).map_err(|err| {
                    anyhow::anyhow!("invalid configuration: auth.webhook_secrets[{n}] {err}")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mode = self.mode.name();
        let mode = match self.mode {
            AuthMode::None => http_transport::AuthMode::None,
            AuthMode::Bearer => {
                if api_keys.is_empty() {
                    bail!(
                        "invalid configuration: auth.api_keys must list at least one key when auth.mode is \"{mode}\""
                    );
                }
                http_transport::AuthMode::Bearer
            }
            AuthMode::StandardWebhooks => {
                if webhook_secrets.is_empty() {
                    bail!(
                        "invalid configuration: auth.webhook_secrets must list at least one whsec_ secret when auth.mode is \"{mode}\""
                    );
                }
                if self.protect_reads && api_keys.is_empty() {
                    bail!(
                        "invalid configuration: auth.api_keys must list at least one key when auth.mode is \"{mode}\" and auth.protect_reads is true (reads have no body to sign: they take a bearer key); or set auth.protect_reads = false"
                    );
                }
                http_transport::AuthMode::StandardWebhooks
            }
        };
        if self.tolerance_ms < MIN_TOLERANCE_MS {
            bail!(
                "invalid configuration: auth.tolerance_ms ({}) must be at least {MIN_TOLERANCE_MS}: webhook-timestamp is in whole seconds",
                self.tolerance_ms
            );
        }
        Ok(http_transport::AuthConfig {
            mode,
            api_keys,
            webhook_secrets,
            tolerance: ms(self.tolerance_ms),
            protect_reads: self.protect_reads,
            ..http_transport::AuthConfig::default()
        })
    }
}

/// A list of secrets: a TOML array, or one string of comma-separated items (how a list
/// arrives from an environment variable, `CALLBACK_AUTH__API_KEYS=key1,key2`). Errors never
/// show the values.
fn list_of_secrets<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    struct Secrets;
    impl<'de> serde::de::Visitor<'de> for Secrets {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of strings, or one string of comma-separated items")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Vec<String>, E> {
            Ok(text
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect())
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<Secret>()? {
                items.push(item.0);
            }
            Ok(items)
        }

        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Vec<String>, E> {
            Err(E::custom(NOT_TEXT))
        }

        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Vec<String>, E> {
            Err(E::custom(NOT_TEXT))
        }

        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Vec<String>, E> {
            Err(E::custom(NOT_TEXT))
        }

        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Vec<String>, E> {
            Err(E::custom(NOT_TEXT))
        }
    }

    /// One item of the list, which must be a string.
    struct Secret(String);
    impl<'de> Deserialize<'de> for Secret {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Item;
            impl serde::de::Visitor<'_> for Item {
                type Value = Secret;

                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a string")
                }

                fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Secret, E> {
                    Ok(Secret(text.to_owned()))
                }

                fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                    Err(E::custom(NOT_TEXT))
                }

                fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                    Err(E::custom(NOT_TEXT))
                }

                fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                    Err(E::custom(NOT_TEXT))
                }

                fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                    Err(E::custom(NOT_TEXT))
                }
            }
            deserializer.deserialize_any(Item)
        }
    }

    deserializer.deserialize_any(Secrets)
}

/// What a key or secret that was read as a number or a boolean is told (without its value).
const NOT_TEXT: &str = "each key or secret must be a string: one made only of digits or \
     `true`/`false` is read as a number or a boolean, so quote it (in the environment as \
     [\"…\"])";

impl Config {
    /// Reads every source in order, later wins, and checks the result.
    pub fn load(flags: &Flags) -> anyhow::Result<Self> {
        Self::figment(flags)?
            .extract::<Config>()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {}", describe(e)))
            .and_then(|config| config.validated())
    }

    fn figment(flags: &Flags) -> anyhow::Result<Figment> {
        let mut figment =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::file(DEFAULT_FILE));
        if let Some(path) = &flags.config {
            if !path.is_file() {
                bail!("--config: no such file: {}", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        Ok(figment
            .merge(Env::prefixed("CALLBACK_").split("__"))
            .merge(flags.as_provider()))
    }

    fn validated(self) -> anyhow::Result<Self> {
        let positive = [
            ("http.max_body_bytes", self.http.max_body_bytes as u64),
            ("http.max_ids", self.http.max_ids as u64),
            ("http.max_connections", self.http.max_connections as u64),
            (
                "http.max_body_memory_bytes",
                self.http.max_body_memory_bytes as u64,
            ),
            (
                "database.max_connections",
                self.database.max_connections as u64,
            ),
            (
                "upstream.request_timeout_ms",
                self.upstream.request_timeout_ms,
            ),
            ("upstream.max_in_flight", self.upstream.max_in_flight as u64),
            ("expiry.ttl_ms", self.expiry.ttl_ms),
            ("expiry.delete_batch", self.expiry.delete_batch as u64),
            ("pipeline.max_batch", self.pipeline.max_batch as u64),
            (
                "pipeline.max_pending_ids",
                self.pipeline.max_pending_ids as u64,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                bail!("invalid configuration: {key} must be greater than 0");
            }
        }
        if self.upstream.retry_first_delay_ms > self.upstream.retry_max_delay_ms {
            bail!(
                "invalid configuration: upstream.retry_first_delay_ms ({}) must not exceed upstream.retry_max_delay_ms ({})",
                self.upstream.retry_first_delay_ms,
                self.upstream.retry_max_delay_ms
            );
        }
        let instance = &self.pipeline.instance_id;
        if instance.len() > 200 || instance.chars().any(char::is_control) {
            bail!(
                "invalid configuration: pipeline.instance_id must be at most 200 printable characters, got {instance:?}"
            );
        }
        if self.pipeline.lease_ms < MIN_LEASE_MS {
            bail!(
                "invalid configuration: pipeline.lease_ms ({}) must be at least {MIN_LEASE_MS}: the heartbeat renews leases every third of it",
                self.pipeline.lease_ms
            );
        }
        if self.upstream.breaker_failures > 0 && self.upstream.breaker_cool_down_ms == 0 {
            bail!(
                "invalid configuration: upstream.breaker_cool_down_ms must be greater than 0 while upstream.breaker_failures is set"
            );
        }
        let upstream = &self.upstream.base_url;
        if !(upstream.starts_with("http://") || upstream.starts_with("https://")) {
            bail!(
                "invalid configuration: upstream.base_url must be an http:// or https:// url, got {upstream:?}"
            );
        }
        self.auth.transport()?;
        let url = &self.database.url;
        if !["sqlite://", "postgres://", "postgresql://"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            bail!(
                "invalid configuration: database.url must start with sqlite:// or postgres://, got {:?}",
                redact_url(url)
            );
        }
        Ok(self)
    }

    /// Whether the public API continues a caller's trace: `telemetry.trust_incoming_trace`,
    /// or, unset, only while callers are not authenticated (an unknown caller could
    /// otherwise force every request to be sampled and exported).
    pub fn trust_incoming_trace(&self) -> bool {
        self.telemetry
            .trust_incoming_trace
            .unwrap_or(self.auth.mode == AuthMode::None)
    }

    /// The configuration as JSON with secrets replaced, for the start-up log line.
    pub fn redacted_json(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = redact_url(&shown.database.url);
        for secret in shown
            .auth
            .api_keys
            .iter_mut()
            .chain(shown.auth.webhook_secrets.iter_mut())
        {
            "***".clone_into(secret);
        }
        serde_json::to_string(&shown).unwrap_or_else(|e| format!("<unprintable: {e}>"))
    }
}

/// Every problem figment found, each naming its key as `section.key` and where it came from.
fn describe(errors: figment::Error) -> String {
    errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let from = e
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            if key.is_empty() {
                format!("{}{from}", e.kind)
            } else {
                format!("{key}: {}{from}", e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Hides the password of a `scheme://user:password@host/…` url.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// Milliseconds from configuration as a [`Duration`].
pub fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

#[cfg(test)]
#[expect(
    clippy::result_large_err,
    reason = "figment::Jail closures must return figment::Error, which is large"
)]
mod tests {
    use super::*;
    use figment::Jail;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("callback-service").chain(args.iter().copied()))
            .expect("flags parse")
    }

    #[test]
    fn defaults_match_the_contract() {
        Jail::expect_with(|_| {
            let config = Config::load(&Flags::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.http.listen.to_string(), "0.0.0.0:9090");
            assert_eq!(config.http.max_body_bytes, 1_048_576);
            assert_eq!(config.http.max_ids, 10_000);
            assert_eq!(config.admin.listen.to_string(), "127.0.0.1:6060");
            assert_eq!(config.database.url, "sqlite://data/callback-service.db");
            assert_eq!(config.upstream.base_url, "http://127.0.0.1:9010");
            assert_eq!(config.expiry.ttl_ms, 30_000);
            assert_eq!(config.telemetry.zipkin_endpoint, "");
            assert_eq!(config.telemetry.otlp_endpoint, "");
            assert!(config.telemetry.heap_profiling);
            Ok(())
        });
    }

    #[test]
    fn later_sources_win_defaults_file_config_env_flags() {
        Jail::expect_with(|jail| {
            std::fs::create_dir_all("config").map_err(|e| e.to_string())?;
            jail.create_file(
                DEFAULT_FILE,
                "[expiry]\nttl_ms = 1000\n[http]\nmax_ids = 5\n",
            )?;
            jail.create_file(
                "extra.toml",
                "[expiry]\nttl_ms = 2000\n[database]\nurl = \"sqlite://x.db\"\n",
            )?;
            jail.set_env("CALLBACK_EXPIRY__TTL_MS", "3000");
            jail.set_env("CALLBACK_UPSTREAM__BASE_URL", "http://10.0.0.1:1");
            jail.set_env("CALLBACK_HTTP__MAX_BODY_BYTES", "2048");
            let config = Config::load(&flags(&[
                "--config",
                "extra.toml",
                "--ttl-ms",
                "4000",
                "--listen",
                "127.0.0.1:1234",
            ]))
            .map_err(|e| e.to_string())?;
            assert_eq!(config.http.max_ids, 5, "from config/default.toml");
            assert_eq!(config.database.url, "sqlite://x.db", "from --config");
            assert_eq!(config.upstream.base_url, "http://10.0.0.1:1", "from env");
            assert_eq!(config.http.max_body_bytes, 2048, "from env");
            assert_eq!(config.expiry.ttl_ms, 4000, "flag beats env beats files");
            assert_eq!(config.http.listen.to_string(), "127.0.0.1:1234");
            Ok(())
        });
    }

    #[test]
    fn every_contract_flag_and_env_name_is_honoured() {
        Jail::expect_with(|jail| {
            jail.set_env("CALLBACK_HTTP__LISTEN", "127.0.0.1:1");
            jail.set_env("CALLBACK_HTTP__MAX_IDS", "7");
            jail.set_env("CALLBACK_ADMIN__LISTEN", "127.0.0.1:2");
            jail.set_env("CALLBACK_DATABASE__URL", "postgres://u:p4ssw0rd@db/x");
            jail.set_env(
                "CALLBACK_TELEMETRY__ZIPKIN_ENDPOINT",
                "http://127.0.0.1:9411/api/v2/spans",
            );
            jail.set_env(
                "CALLBACK_TELEMETRY__OTLP_ENDPOINT",
                "http://127.0.0.1:4318/v1/traces",
            );
            let config = Config::load(&Flags::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.http.listen.to_string(), "127.0.0.1:1");
            assert_eq!(config.http.max_ids, 7);
            assert_eq!(config.admin.listen.to_string(), "127.0.0.1:2");
            assert_eq!(
                config.telemetry.zipkin_endpoint,
                "http://127.0.0.1:9411/api/v2/spans"
            );
            assert_eq!(
                config.telemetry.common().otlp_endpoint,
                "http://127.0.0.1:4318/v1/traces"
            );
            // (not "secret": `auth.webhook_secrets` is a key of the log line)
            assert!(!config.redacted_json().contains("p4ssw0rd"));

            let config = Config::load(&flags(&[
                "--admin-listen",
                "127.0.0.1:3",
                "--database-url",
                "sqlite:///tmp/y.db",
                "--upstream-url",
                "http://127.0.0.1:4",
            ]))
            .map_err(|e| e.to_string())?;
            assert_eq!(config.admin.listen.to_string(), "127.0.0.1:3");
            assert_eq!(config.database.url, "sqlite:///tmp/y.db");
            assert_eq!(config.upstream.base_url, "http://127.0.0.1:4");
            Ok(())
        });
    }

    #[test]
    fn heap_profiling_is_a_telemetry_key_beside_the_shared_ones() {
        Jail::expect_with(|jail| {
            jail.set_env("CALLBACK_TELEMETRY__HEAP_PROFILING", "false");
            jail.set_env("CALLBACK_TELEMETRY__LOG_FORMAT", "json");
            jail.set_env("CALLBACK_TELEMETRY__SAMPLE_RATIO", "0.25");
            let config = Config::load(&Flags::default()).map_err(|e| e.to_string())?;
            assert!(!config.telemetry.heap_profiling);
            let common = config.telemetry.common();
            assert_eq!(common.log_format, LogFormat::Json);
            assert_eq!(common.sample_ratio, 0.25);
            assert_eq!(common.log_filter, "info");
            Ok(())
        });
        // The shared keys have the shared defaults.
        assert_eq!(
            serde_json::to_value(TelemetrySection::default().common()).unwrap(),
            serde_json::to_value(TelemetryConfig::default()).unwrap()
        );
        Jail::expect_with(|jail| {
            jail.set_env("CALLBACK_TELEMETRY__HEAP_PROFILNG", "false");
            let err = Config::load(&Flags::default()).unwrap_err().to_string();
            assert!(err.contains("heap_profilng"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_configuration_names_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("CALLBACK_EXPIRY__TTL_MS", "soon", "expiry.ttl_ms"),
            ("CALLBACK_EXPIRY__TTL_MS", "0", "expiry.ttl_ms"),
            ("CALLBACK_HTTP__LISTEN", "nowhere", "http.listen"),
            (
                "CALLBACK_UPSTREAM__BASE_URL",
                "ftp://x",
                "upstream.base_url",
            ),
            ("CALLBACK_DATABASE__URL", "mysql://u:pw@x/y", "database.url"),
            ("CALLBACK_HTTP__MAX_IDZ", "3", "max_idz"),
            ("CALLBACK_PIPELINE__LEASE_MS", "299", "pipeline.lease_ms"),
            (
                "CALLBACK_UPSTREAM__BREAKER_COOL_DOWN_MS",
                "0",
                "upstream.breaker_cool_down_ms",
            ),
        ];
        for &(var, value, key) in cases {
            Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let err = Config::load(&Flags::default()).unwrap_err().to_string();
                assert!(
                    err.contains(key),
                    "{var}={value}: {err:?} does not name {key}"
                );
                assert!(!err.contains("pw@"), "password leaked: {err}");
                Ok(())
            });
        }
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const OTHER_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

    #[test]
    fn auth_is_off_by_default_and_incoming_traces_are_trusted_only_then() {
        Jail::expect_with(|jail| {
            let config = Config::load(&Flags::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.auth.mode, AuthMode::None);
            assert_eq!(config.auth.tolerance_ms, 300_000);
            assert!(config.auth.protect_reads);
            assert_eq!(config.telemetry.trust_incoming_trace, None);
            assert!(config.trust_incoming_trace());
            let transport = config.auth.transport().map_err(|e| e.to_string())?;
            assert_eq!(transport.mode, http_transport::AuthMode::None);

            jail.set_env("CALLBACK_AUTH__MODE", "bearer");
            jail.set_env("CALLBACK_AUTH__API_KEYS", "key-one");
            let config = Config::load(&Flags::default()).map_err(|e| e.to_string())?;
            assert!(
                !config.trust_incoming_trace(),
                "auth on: a caller's trace is not trusted"
            );
            jail.set_env("CALLBACK_TELEMETRY__TRUST_INCOMING_TRACE", "true");
            let config = Config::load(&Flags::default()).map_err(|e| e.to_string())?;
            assert!(config.trust_incoming_trace(), "unless configured");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("CALLBACK_TELEMETRY__TRUST_INCOMING_TRACE", "false");
            let config = Config::load(&Flags::default()).map_err(|e| e.to_string())?;
            assert!(!config.trust_incoming_trace());
            Ok(())
        });
    }

    #[test]
    fn auth_lists_are_toml_arrays_or_comma_separated_in_the_environment() {
        Jail::expect_with(|jail| {
            jail.set_env("CALLBACK_AUTH__MODE", "standard-webhooks");
            jail.set_env("CALLBACK_AUTH__API_KEYS", " key-one, key-two ,");
            jail.set_env(
                "CALLBACK_AUTH__WEBHOOK_SECRETS",
                format!("{SECRET},{OTHER_SECRET}"),
            );
            jail.set_env("CALLBACK_AUTH__TOLERANCE_MS", "60000");
            jail.set_env("CALLBACK_AUTH__PROTECT_READS", "false");
            let config = Config::load(&Flags::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.auth.mode, AuthMode::StandardWebhooks);
            assert_eq!(config.auth.api_keys, ["key-one", "key-two"]);
            assert_eq!(config.auth.webhook_secrets, [SECRET, OTHER_SECRET]);
            let transport = config.auth.transport().map_err(|e| e.to_string())?;
            assert_eq!(transport.mode, http_transport::AuthMode::StandardWebhooks);
            assert_eq!(transport.api_keys.len(), 2);
            assert_eq!(transport.webhook_secrets.len(), 2);
            assert_eq!(transport.tolerance, Duration::from_secs(60));
            assert!(!transport.protect_reads);

            jail.set_env("CALLBACK_AUTH__API_KEYS", "[key-three,\"1234\"]");
            let config = Config::load(&Flags::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.auth.api_keys, ["key-three", "1234"]);
            Ok(())
        });
        Jail::expect_with(|jail| {
            std::fs::create_dir_all("config").map_err(|e| e.to_string())?;
            jail.create_file(
                DEFAULT_FILE,
                &format!(
                    "[auth]\nmode = \"bearer\"\napi_keys = [\"a\", \"b\"]\nwebhook_secrets = [\"{SECRET}\"]\n"
                ),
            )?;
            let config = Config::load(&Flags::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.auth.mode, AuthMode::Bearer);
            assert_eq!(config.auth.api_keys, ["a", "b"]);
            assert_eq!(config.auth.webhook_secrets, [SECRET]);
            Ok(())
        });
    }

    #[test]
    fn bad_auth_configuration_names_the_key_and_never_shows_a_secret() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("CALLBACK_AUTH__MODE", "oauth")], "auth.mode"),
            (
                &[("CALLBACK_AUTH__MODE", "bearer")],
                "auth.api_keys must list",
            ),
            (
                &[
                    ("CALLBACK_AUTH__MODE", "standard-webhooks"),
                    ("CALLBACK_AUTH__API_KEYS", "k"),
                ],
                "auth.webhook_secrets must list",
            ),
            (
                &[
                    ("CALLBACK_AUTH__MODE", "standard-webhooks"),
                    ("CALLBACK_AUTH__WEBHOOK_SECRETS", SECRET),
                ],
                "auth.api_keys must list at least one key when auth.mode is \"standard-webhooks\" and auth.protect_reads is true",
            ),
            (
                &[(
                    "CALLBACK_AUTH__WEBHOOK_SECRETS",
                    "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                )],
                "auth.webhook_secrets[0] must start with whsec_",
            ),
            (
                &[(
                    "CALLBACK_AUTH__WEBHOOK_SECRETS",
                    &format!("{SECRET},whsec_MfKQ9r8GKY!!"),
                )],
                "auth.webhook_secrets[1] must be base64",
            ),
            (
                &[("CALLBACK_AUTH__WEBHOOK_SECRETS", "whsec_c2hvcnQ=")],
                "auth.webhook_secrets[0] decodes to 5 bytes",
            ),
            (
                &[("CALLBACK_AUTH__API_KEYS", "[\"a key\"]")],
                "auth.api_keys[0] must be visible ascii",
            ),
            (&[("CALLBACK_AUTH__API_KEYS", "987654321")], "auth.api_keys"),
            (
                &[("CALLBACK_AUTH__API_KEYS", "[\"k\",987654321]")],
                "auth.api_keys",
            ),
            (
                &[("CALLBACK_AUTH__TOLERANCE_MS", "999")],
                "auth.tolerance_ms",
            ),
            (&[("CALLBACK_AUTH__TOLERANT_MS", "1")], "tolerant_ms"),
        ];
        for &(vars, key) in cases {
            Jail::expect_with(|jail| {
                for (var, value) in vars {
                    jail.set_env(var, value);
                }
                let err = format!("{:#}", Config::load(&Flags::default()).unwrap_err());
                assert!(err.contains(key), "{vars:?}: {err:?} does not name {key}");
                for secret in ["MfKQ9r8GKY", "987654321", "a key"] {
                    assert!(!err.contains(secret), "{vars:?}: a secret in {err:?}");
                }
                Ok(())
            });
        }
    }

    #[test]
    fn auth_secrets_are_hidden_from_debug_and_the_start_up_log() {
        let mut config = Config::default();
        config.auth.mode = AuthMode::StandardWebhooks;
        config.auth.api_keys = vec!["top-secret-key".to_owned()];
        config.auth.webhook_secrets = vec![SECRET.to_owned(), OTHER_SECRET.to_owned()];
        let shown = format!("{config:?}\n{}", config.redacted_json());
        for secret in ["top-secret-key", SECRET, OTHER_SECRET] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        let logged: serde_json::Value = serde_json::from_str(&config.redacted_json()).unwrap();
        assert_eq!(
            logged["auth"]["webhook_secrets"],
            serde_json::json!(["***", "***"])
        );
        assert_eq!(logged["auth"]["mode"], "standard-webhooks");
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        Jail::expect_with(|_| {
            let err = Config::load(&flags(&["--config", "nope.toml"])).unwrap_err();
            assert!(err.to_string().contains("--config"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_shipped_default_file_parses_and_matches_the_built_in_defaults() {
        let shipped = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/default.toml"
        ))
        .expect("config/default.toml is shipped");
        let from_file: Config = Figment::from(Toml::string(&shipped))
            .extract()
            .expect("config/default.toml parses with every key known");
        let built_in = Config::default();
        assert_eq!(
            serde_json::to_value(&from_file).unwrap(),
            serde_json::to_value(&built_in).unwrap(),
            "config/default.toml and the built-in defaults disagree"
        );
    }

    #[test]
    fn redaction_hides_passwords_only() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
    }
}
