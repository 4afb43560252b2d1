//! Logging, tracing and metrics setup shared by both binaries.
//!
//! [`init`] installs a `tracing` subscriber with an `EnvFilter` and human or JSON log lines
//! on stderr; [`metrics::install`] installs the Prometheus recorder the admin listener
//! renders. Trace export (OpenTelemetry → Zipkin) plugs in here later, behind the same
//! [`init`] and [`Guard`].

pub mod metrics;

use std::io::IsTerminal;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per event, for log shippers.
    Json,
}

/// The telemetry section of a binary's configuration.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The log filter when `RUST_LOG` is not set, in `EnvFilter` syntax.
    pub log_filter: String,
    /// Human or JSON log lines.
    pub log_format: LogFormat,
    /// Where spans are sent (Zipkin v2 JSON API); empty turns export off.
    pub zipkin_endpoint: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_filter: "info".to_owned(),
            log_format: LogFormat::Human,
            zipkin_endpoint: String::new(),
        }
    }
}

/// Keeps telemetry running; dropping it flushes what is buffered.
#[derive(Debug)]
#[must_use = "telemetry stops when the guard is dropped"]
pub struct Guard {
    _private: (),
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The log filter does not parse.
    #[error("telemetry.log_filter: {0}")]
    Filter(String),
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Installs the global subscriber; `RUST_LOG` overrides `config.log_filter`.
pub fn init(config: &TelemetryConfig) -> Result<Guard, InitError> {
    let filter = build_filter(config, std::env::var("RUST_LOG").ok())?;
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match config.log_format {
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    installed.map_err(|_| InitError::AlreadyInstalled)?;
    if !config.zipkin_endpoint.is_empty() {
        tracing::warn!(
            endpoint = %config.zipkin_endpoint,
            "telemetry.zipkin_endpoint is set but span export is not built yet; spans stay local"
        );
    }
    Ok(Guard { _private: () })
}

/// The filter from `RUST_LOG` when set, else from the configuration.
fn build_filter(
    config: &TelemetryConfig,
    rust_log: Option<String>,
) -> Result<EnvFilter, InitError> {
    match rust_log {
        Some(from_env) if !from_env.trim().is_empty() => {
            EnvFilter::try_new(from_env).map_err(|e| InitError::Filter(format!("RUST_LOG: {e}")))
        }
        _ => EnvFilter::try_new(&config.log_filter).map_err(|e| InitError::Filter(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_names_its_source() {
        let bad = TelemetryConfig {
            log_filter: "info,[".to_owned(),
            ..TelemetryConfig::default()
        };
        let err = build_filter(&bad, None).unwrap_err();
        assert!(err.to_string().starts_with("telemetry.log_filter"), "{err}");
        let err = build_filter(&TelemetryConfig::default(), Some("=[".into())).unwrap_err();
        assert!(err.to_string().contains("RUST_LOG"), "{err}");
    }

    #[test]
    fn rust_log_wins_over_the_configuration() {
        let config = TelemetryConfig::default();
        let filter = build_filter(&config, Some("debug".into())).unwrap();
        assert_eq!(filter.to_string(), "debug");
        let filter = build_filter(&config, Some("  ".into())).unwrap();
        assert_eq!(filter.to_string(), "info");
    }
}
