//! client-service's configuration: built-in defaults, then `config/client-service.toml`
//! when it exists, then the file named by `--config`, then `CLIENT_…` environment
//! variables (`__` between section and key), then command-line flags. Later wins.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use telemetry::TelemetryConfig;

use crate::signing::{Credentials, WebhookKey};

/// The file read after the built-in defaults, relative to the working directory.
pub const DEFAULT_FILE: &str = "config/client-service.toml";

/// The prefix of the environment variables that configure client-service.
pub const ENV_PREFIX: &str = "CLIENT_";

/// Command-line flags for the common keys; each overrides every other source.
#[derive(Debug, Default, Parser)]
#[command(
    name = "client-service",
    version,
    about = "Upstream simulator and callback emitter: plays the other side of callback-service"
)]
pub struct Flags {
    /// A TOML file read after config/client-service.toml
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// upstream.listen: where the upstream simulator listens
    #[arg(long, value_name = "ADDR")]
    pub upstream_listen: Option<String>,
    /// upstream.min_latency_ms: the shortest simulated answer time
    #[arg(long, value_name = "MS")]
    pub min_latency_ms: Option<u64>,
    /// upstream.max_latency_ms: the longest simulated answer time
    #[arg(long, value_name = "MS")]
    pub max_latency_ms: Option<u64>,
    /// upstream.enabled = false: do not run the upstream simulator
    #[arg(long)]
    pub no_upstream: bool,
    /// emitter.target: where callbacks are POSTed
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,
    /// emitter.interval_ms: time between two callbacks
    #[arg(long, value_name = "MS")]
    pub interval_ms: Option<u64>,
    /// emitter.enabled = false: do not send callbacks
    #[arg(long)]
    pub no_emitter: bool,
    /// emitter.rounds: stop after this many callbacks (0 = never)
    #[arg(long, value_name = "N")]
    pub rounds: Option<u64>,
    /// emitter.api_key: sent as Authorization: Bearer on every request (prefer CLIENT_EMITTER__API_KEY: flags show in ps)
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// emitter.webhook_secret: whsec_… secret; every callback is signed as a Standard Webhook (prefer CLIENT_EMITTER__WEBHOOK_SECRET)
    #[arg(long, value_name = "SECRET")]
    pub webhook_secret: Option<String>,
}

impl Flags {
    /// The flags that were given, as a nested map figment can merge last.
    fn as_provider(&self) -> Serialized<serde_json::Value> {
        let mut upstream = serde_json::Map::new();
        let mut emitter = serde_json::Map::new();
        if let Some(v) = &self.upstream_listen {
            upstream.insert("listen".into(), v.clone().into());
        }
        if let Some(v) = self.min_latency_ms {
            upstream.insert("min_latency_ms".into(), v.into());
        }
        if let Some(v) = self.max_latency_ms {
            upstream.insert("max_latency_ms".into(), v.into());
        }
        if self.no_upstream {
            upstream.insert("enabled".into(), false.into());
        }
        if let Some(v) = &self.target {
            emitter.insert("target".into(), v.clone().into());
        }
        if let Some(v) = self.interval_ms {
            emitter.insert("interval_ms".into(), v.into());
        }
        if self.no_emitter {
            emitter.insert("enabled".into(), false.into());
        }
        if let Some(v) = self.rounds {
            emitter.insert("rounds".into(), v.into());
        }
        if let Some(v) = &self.api_key {
            emitter.insert("api_key".into(), v.clone().into());
        }
        if let Some(v) = &self.webhook_secret {
            emitter.insert("webhook_secret".into(), v.clone().into());
        }
        Serialized::defaults(serde_json::json!({ "upstream": upstream, "emitter": emitter }))
    }
}

/// Everything client-service can be told, as written in files and variables.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The upstream simulator.
    pub upstream: UpstreamSection,
    /// The callback emitter.
    pub emitter: EmitterSection,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
}

/// `[upstream]`: the simulator of `GET /objects/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    /// Whether the simulator runs.
    pub enabled: bool,
    /// The address it listens on.
    pub listen: String,
    /// The shortest answer time, in milliseconds.
    pub min_latency_ms: u64,
    /// The longest answer time, in milliseconds.
    pub max_latency_ms: u64,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:9010".to_owned(),
            min_latency_ms: 300,
            max_latency_ms: 4000,
        }
    }
}

/// `[emitter]`: the callbacks sent to callback-service, and the check of what it stored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmitterSection {
    /// Whether the emitter runs.
    pub enabled: bool,
    /// The URL callbacks are POSTed to; its `/objects` is read for the report.
    pub target: String,
    /// Time between two callbacks, in milliseconds.
    pub interval_ms: u64,
    /// The most ids in one callback (each callback names 1..=max_ids).
    pub max_ids: usize,
    /// Ids are drawn from 0..=id_max.
    pub id_max: u64,
    /// How long a POST may take, in milliseconds.
    pub timeout_ms: u64,
    /// How long after sending a callback its report checks what the service stored.
    pub report_delay_ms: u64,
    /// Stop after this many callbacks; 0 sends forever.
    pub rounds: u64,
    /// A bearer API key for every request; empty sends none.
    pub api_key: Secret,
    /// A Standard Webhooks secret (`whsec_…`) signing every callback; empty signs nothing.
    pub webhook_secret: Secret,
}

/// A key or secret from the configuration: shown as `***` by `Debug` (and in the start-up
/// log line), never as itself.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The value, unless empty.
    fn given(&self) -> Option<&str> {
        Some(self.0.as_str()).filter(|v| !v.is_empty())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

impl Default for EmitterSection {
    fn default() -> Self {
        Self {
            enabled: true,
            target: "http://127.0.0.1:9090/callback".to_owned(),
            interval_ms: 5000,
            max_ids: 200,
            id_max: 99,
            timeout_ms: 1000,
            report_delay_ms: 4500,
            rounds: 0,
            api_key: Secret::default(),
            webhook_secret: Secret::default(),
        }
    }
}

/// What to run, checked and in the types the code uses.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The simulator's settings, when it is enabled.
    pub simulator: Option<SimulatorSettings>,
    /// The emitter's settings, when it is enabled.
    pub emitter: Option<EmitterSettings>,
}

/// The upstream simulator's checked settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatorSettings {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The shortest answer time.
    pub min_latency: Duration,
    /// The longest answer time, at least `min_latency`.
    pub max_latency: Duration,
}

/// The emitter's checked settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmitterSettings {
    /// Where callbacks are POSTed.
    pub target: Url,
    /// The service's `GET /objects`, on the target's scheme, host and port.
    pub objects_url: Url,
    /// Time between two callbacks; above zero.
    pub interval: Duration,
    /// The most ids in one callback; at least 1.
    pub max_ids: usize,
    /// Ids are drawn from `0..=id_max`; at most `i64::MAX`.
    pub id_max: u64,
    /// How long a POST may take; above zero.
    pub timeout: Duration,
    /// How long after sending a callback the store is checked.
    pub report_delay: Duration,
    /// Stop after this many rounds; 0 never stops.
    pub rounds: u64,
    /// What every request proves itself with.
    pub credentials: Credentials,
}

impl Config {
    /// Reads every source in order; fails with a message naming the bad key.
    pub fn load(flags: &Flags) -> anyhow::Result<Self> {
        if let Some(path) = &flags.config
            && !path.is_file()
        {
            bail!("--config: {} is not a readable file", path.display());
        }
        Self::figment(flags)
            .extract::<Config>()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }

    /// The sources, later wins.
    fn figment(flags: &Flags) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if Path::new(DEFAULT_FILE).is_file() {
            figment = figment.merge(Toml::file_exact(DEFAULT_FILE));
        }
        if let Some(path) = &flags.config {
            // `file_exact` reports a missing file instead of skipping it.
            figment = figment.merge(Toml::file_exact(path));
        }
        figment
            .merge(
                Env::prefixed(ENV_PREFIX)
                    .split("__")
                    // CLIENT_ is a common prefix: only our sections are read, so an
                    // unrelated CLIENT_ID in the environment is no unknown key.
                    .filter(|key| {
                        ["upstream.", "emitter.", "telemetry."]
                            .iter()
                            .any(|section| key.starts_with(section))
                    }),
            )
            .merge(flags.as_provider())
    }

    /// Checks every value and converts it into [`Settings`].
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let upstream = &self.upstream;
        let listen: SocketAddr = upstream.listen.parse().map_err(|_| {
            anyhow::anyhow!(
                "upstream.listen: {:?} is not a socket address such as 0.0.0.0:9010",
                upstream.listen
            )
        })?;
        if upstream.min_latency_ms > upstream.max_latency_ms {
            bail!(
                "upstream.min_latency_ms ({}) must not exceed upstream.max_latency_ms ({})",
                upstream.min_latency_ms,
                upstream.max_latency_ms
            );
        }
        let simulator = SimulatorSettings {
            listen,
            min_latency: Duration::from_millis(upstream.min_latency_ms),
            max_latency: Duration::from_millis(upstream.max_latency_ms),
        };

        let emitter = &self.emitter;
        let target = parse_target(&emitter.target)?;
        let mut objects_url = target.clone();
        objects_url.set_path("/objects");
        objects_url.set_query(None);
        for (key, value) in [
            ("emitter.interval_ms", emitter.interval_ms),
            ("emitter.timeout_ms", emitter.timeout_ms),
            ("emitter.max_ids", emitter.max_ids as u64),
        ] {
            if value == 0 {
                bail!("{key} must be greater than 0");
            }
        }
        let api_key = emitter.api_key.given().map(str::to_owned);
        if api_key
            .as_deref()
            .is_some_and(|key| !key.bytes().all(|b| b.is_ascii_graphic()))
        {
            bail!("emitter.api_key must be visible ascii characters without spaces");
        }
        let webhook_key = emitter
            .webhook_secret
            .given()
            .map(|secret| {
                WebhookKey::parse(secret)
                    .map_err(|err| anyhow::anyhow!("emitter.webhook_secret {err}"))
            })
            .transpose()?;
        if i64::try_from(emitter.id_max).is_err() {
            bail!(
                "emitter.id_max ({}) must fit in a signed 64-bit integer",
                emitter.id_max
            );
        }
        let emitter_settings = EmitterSettings {
            target,
            objects_url,
            interval: Duration::from_millis(emitter.interval_ms),
            max_ids: emitter.max_ids,
            id_max: emitter.id_max,
            timeout: Duration::from_millis(emitter.timeout_ms),
            report_delay: Duration::from_millis(emitter.report_delay_ms),
            rounds: emitter.rounds,
            credentials: Credentials {
                api_key,
                webhook_key,
            },
        };

        if !upstream.enabled && !emitter.enabled {
            bail!(
                "nothing to run: upstream.enabled and emitter.enabled are both false \
                 (--no-upstream and --no-emitter)"
            );
        }
        Ok(Settings {
            simulator: upstream.enabled.then_some(simulator),
            emitter: emitter.enabled.then_some(emitter_settings),
        })
    }

    /// The configuration as one JSON line, for the start-up log, the key and the secret
    /// replaced by `***`.
    pub fn to_json(&self) -> String {
        let mut shown = self.clone();
        for secret in [
            &mut shown.emitter.api_key,
            &mut shown.emitter.webhook_secret,
        ] {
            if !secret.0.is_empty() {
                "***".clone_into(&mut secret.0);
            }
        }
        serde_json::to_string(&shown).unwrap_or_else(|e| format!("<unprintable: {e}>"))
    }
}

/// Checks `emitter.target`: an absolute `http://` URL with a host.
fn parse_target(raw: &str) -> anyhow::Result<Url> {
    let url = Url::parse(raw)
        .with_context(|| format!("emitter.target: {raw:?} is not an absolute url"))?;
    match url.scheme() {
        "http" => {}
        "https" => bail!(
            "emitter.target: {raw:?} uses https, which this build does not support (no tls); use http"
        ),
        other => bail!("emitter.target: {raw:?} must be an http url, not {other}"),
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("emitter.target: {raw:?} has no host");
    }
    Ok(url)
}

#[cfg(test)]
#[expect(
    clippy::result_large_err,
    reason = "figment::Jail's closures must return figment's large error type"
)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;
    use figment::Jail;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("client-service").chain(args.iter().copied()))
            .unwrap()
    }

    /// Loads and checks, turning the error into text so `Jail` can carry it.
    fn load(args: &[&str]) -> Result<(Config, Settings), String> {
        let config = Config::load(&flags(args)).map_err(|e| format!("{e:#}"))?;
        let settings = config.settings().map_err(|e| format!("{e:#}"))?;
        Ok((config, settings))
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        Jail::expect_with(|_jail| {
            let (config, settings) = load(&[])?;
            assert_eq!(config.upstream, UpstreamSection::default());
            assert_eq!(config.emitter, EmitterSection::default());
            let simulator = settings.simulator.expect("simulator on by default");
            assert_eq!(simulator.listen, "0.0.0.0:9010".parse().unwrap());
            assert_eq!(simulator.min_latency, Duration::from_millis(300));
            assert_eq!(simulator.max_latency, Duration::from_millis(4000));
            let emitter = settings.emitter.expect("emitter on by default");
            assert_eq!(emitter.target.as_str(), "http://127.0.0.1:9090/callback");
            assert_eq!(
                emitter.objects_url.as_str(),
                "http://127.0.0.1:9090/objects"
            );
            assert_eq!(emitter.interval, Duration::from_secs(5));
            assert_eq!(emitter.max_ids, 200);
            assert_eq!(emitter.id_max, 99);
            assert_eq!(emitter.timeout, Duration::from_secs(1));
            assert_eq!(emitter.report_delay, Duration::from_millis(4500));
            assert_eq!(emitter.rounds, 0);
            Ok(())
        });
    }

    #[test]
    fn the_shipped_file_matches_the_built_in_defaults() {
        let shipped = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/client-service.toml"
        );
        let from_file: Config = Figment::from(Toml::file_exact(shipped))
            .extract()
            .expect("config/client-service.toml parses");
        assert_eq!(from_file.upstream, UpstreamSection::default());
        assert_eq!(from_file.emitter, EmitterSection::default());
        assert_eq!(
            serde_json::to_value(&from_file.telemetry).unwrap(),
            serde_json::to_value(TelemetryConfig::default()).unwrap()
        );
    }

    #[test]
    fn later_sources_win_defaults_file_config_env_flags() {
        Jail::expect_with(|jail| {
            jail.create_dir("config")?;
            jail.create_file(
                DEFAULT_FILE,
                r#"
                [upstream]
                listen = "127.0.0.1:1001"
                min_latency_ms = 1
                max_latency_ms = 10
                [emitter]
                interval_ms = 1001
                max_ids = 11
                "#,
            )?;
            jail.create_file(
                "extra.toml",
                r#"
                [upstream]
                min_latency_ms = 2
                [emitter]
                interval_ms = 1002
                id_max = 12
                "#,
            )?;
            jail.set_env("CLIENT_EMITTER__INTERVAL_MS", "1003");
            jail.set_env("CLIENT_EMITTER__TIMEOUT_MS", "33");
            jail.set_env("CLIENT_UPSTREAM__MIN_LATENCY_MS", "3");
            // Not one of our sections: ignored rather than an unknown key.
            jail.set_env("CLIENT_ID", "someone-else's");

            let (config, _) = load(&["--config", "extra.toml"])?;
            assert_eq!(
                config.upstream.listen, "127.0.0.1:1001",
                "file over defaults"
            );
            assert_eq!(config.emitter.max_ids, 11, "file over defaults");
            assert_eq!(config.emitter.id_max, 12, "--config over file");
            assert_eq!(config.emitter.timeout_ms, 33, "env over defaults");
            assert_eq!(config.upstream.min_latency_ms, 3, "env over --config");
            assert_eq!(config.emitter.interval_ms, 1003, "env over --config");
            assert_eq!(config.emitter.report_delay_ms, 4500, "untouched default");

            let (config, settings) = load(&[
                "--config",
                "extra.toml",
                "--interval-ms",
                "1004",
                "--min-latency-ms",
                "4",
                "--max-latency-ms",
                "40",
                "--upstream-listen",
                "127.0.0.1:0",
                "--target",
                "http://localhost:1/cb",
                "--rounds",
                "3",
                "--no-upstream",
            ])?;
            assert_eq!(config.emitter.interval_ms, 1004, "flags over env");
            assert_eq!(config.upstream.min_latency_ms, 4, "flags over env");
            assert_eq!(config.upstream.max_latency_ms, 40);
            assert_eq!(config.upstream.listen, "127.0.0.1:0");
            assert_eq!(config.emitter.rounds, 3);
            assert!(settings.simulator.is_none(), "--no-upstream");
            let emitter = settings.emitter.expect("emitter still on");
            assert_eq!(emitter.target.as_str(), "http://localhost:1/cb");
            assert_eq!(emitter.objects_url.as_str(), "http://localhost:1/objects");

            let (_, settings) = load(&["--no-emitter"])?;
            assert!(settings.emitter.is_none(), "--no-emitter");
            assert!(settings.simulator.is_some());
            Ok(())
        });
    }

    #[test]
    fn env_can_switch_a_part_off() {
        Jail::expect_with(|jail| {
            jail.set_env("CLIENT_UPSTREAM__ENABLED", "false");
            jail.set_env("CLIENT_EMITTER__TARGET", "http://10.0.0.1:9090/callback");
            jail.set_env("CLIENT_UPSTREAM__LISTEN", "127.0.0.1:9999");
            let (config, settings) = load(&[])?;
            assert_eq!(config.upstream.listen, "127.0.0.1:9999");
            assert!(settings.simulator.is_none());
            assert_eq!(
                settings.emitter.unwrap().target.as_str(),
                "http://10.0.0.1:9090/callback"
            );
            Ok(())
        });
    }

    #[test]
    fn bad_configuration_names_the_key() {
        Jail::expect_with(|jail| {
            let cases: &[(&[&str], &str)] = &[
                (
                    &["--min-latency-ms", "500", "--max-latency-ms", "100"],
                    "upstream.min_latency_ms",
                ),
                (&["--upstream-listen", "nowhere"], "upstream.listen"),
                (&["--target", "ftp://example.com/cb"], "emitter.target"),
                (&["--target", "127.0.0.1:9090/callback"], "emitter.target"),
                (&["--target", "https://example.com/cb"], "emitter.target"),
                (&["--interval-ms", "0"], "emitter.interval_ms"),
                (&["--no-upstream", "--no-emitter"], "both false"),
            ];
            for (args, key) in cases {
                let err = load(args).expect_err(&format!("{args:?} should fail"));
                assert!(err.contains(key), "{args:?}: {err:?} does not name {key}");
            }

            jail.set_env("CLIENT_EMITTER__MAX_IDS", "lots");
            let err = load(&[]).unwrap_err();
            // figment names the key as the variable spells it: "EMITTER.MAX_IDS".
            assert!(err.to_lowercase().contains("emitter.max_ids"), "{err}");
            jail.clear_env();

            jail.set_env("CLIENT_EMITTER__INTERVAL", "5");
            let err = load(&[]).unwrap_err();
            assert!(
                err.contains("unknown field") && err.contains("interval"),
                "{err}"
            );
            jail.clear_env();

            jail.create_file("typo.toml", "[emitter]\ntarget_url = \"http://x\"\n")?;
            let err = load(&["--config", "typo.toml"]).unwrap_err();
            assert!(err.contains("target_url"), "{err}");

            let err = load(&["--config", "missing.toml"]).unwrap_err();
            assert!(err.contains("missing.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn credentials_come_from_env_or_flags_and_are_never_shown() {
        const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        Jail::expect_with(|jail| {
            let (_, settings) = load(&[])?;
            assert_eq!(
                settings.emitter.unwrap().credentials,
                Credentials::default(),
                "no credentials by default"
            );

            jail.set_env("CLIENT_EMITTER__API_KEY", "key-from-env");
            jail.set_env("CLIENT_EMITTER__WEBHOOK_SECRET", SECRET);
            let (config, settings) = load(&[])?;
            let credentials = settings.emitter.unwrap().credentials;
            assert_eq!(credentials.api_key.as_deref(), Some("key-from-env"));
            assert_eq!(credentials.webhook_key, WebhookKey::parse(SECRET).ok());
            let shown = format!("{config:?} {credentials:?} {}", config.to_json());
            assert!(
                !shown.contains("key-from-env")
                    && !shown.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
                "{shown}"
            );

            let (_, settings) = load(&["--api-key", "key-from-flag"])?;
            assert_eq!(
                settings.emitter.unwrap().credentials.api_key.as_deref(),
                Some("key-from-flag")
            );

            jail.set_env(
                "CLIENT_EMITTER__WEBHOOK_SECRET",
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            );
            let err = load(&[]).unwrap_err();
            assert!(
                err.contains("emitter.webhook_secret must start with whsec_"),
                "{err}"
            );
            assert!(!err.contains("MfKQ9r8GKY"), "{err}");
            jail.set_env("CLIENT_EMITTER__WEBHOOK_SECRET", "");
            jail.set_env("CLIENT_EMITTER__API_KEY", "a key");
            let err = load(&[]).unwrap_err();
            assert!(err.contains("emitter.api_key"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn help_lists_every_flag() {
        let help = Flags::command().render_help().to_string();
        for flag in [
            "--config",
            "--upstream-listen",
            "--min-latency-ms",
            "--max-latency-ms",
            "--no-upstream",
            "--target",
            "--interval-ms",
            "--no-emitter",
            "--rounds",
            "--api-key",
            "--webhook-secret",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
        }
    }
}
