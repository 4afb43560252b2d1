//! Logging, tracing and metrics setup shared by both binaries.
//!
//! [`init`] installs a `tracing` subscriber with an `EnvFilter` and human or JSON log lines
//! on stderr and, when `telemetry.zipkin_endpoint` or `telemetry.otlp_endpoint` is set,
//! exports spans through OpenTelemetry to Zipkin, to an OTLP collector, or to both;
//! [`metrics::install`] installs the Prometheus recorder the admin listener
//! renders; [`propagation`] carries trace context over HTTP (W3C `traceparent` and B3);
//! `profiling` (feature `profiling`) takes CPU and heap profiles for the admin listener.

pub mod metrics;
#[cfg(feature = "profiling")]
pub mod profiling;
mod traces;

/// Trace context over HTTP, re-exported for the binaries (the adapters use `trace-context`
/// directly, without this crate's exporter).
pub use trace_context as propagation;

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
    /// Where spans are sent as Zipkin v2 JSON; empty turns this export off.
    pub zipkin_endpoint: String,
    /// Where spans are sent as OTLP over HTTP/protobuf: the full traces url, e.g.
    /// `http://127.0.0.1:4318/v1/traces`; empty turns this export off.
    pub otlp_endpoint: String,
    /// The share of new traces recorded and exported, from 0.0 to 1.0; a trace continued
    /// from a caller follows the caller's decision.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_filter: "info".to_owned(),
            log_format: LogFormat::Human,
            zipkin_endpoint: String::new(),
            otlp_endpoint: String::new(),
            sample_ratio: 1.0,
        }
    }
}

/// Who is emitting the telemetry: the `service.name` and `service.version` of every span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    /// The binary's name, e.g. `callback-service`.
    pub name: &'static str,
    /// The binary's version.
    pub version: &'static str,
}

/// Keeps telemetry running; dropping it flushes the spans still buffered and stops the
/// exporter, waiting at most [`traces::SHUTDOWN_BOUND`].
#[derive(Debug)]
#[must_use = "telemetry stops when the guard is dropped"]
pub struct Guard {
    traces: Option<traces::Exporter>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(traces) = self.traces.take() {
            traces.shutdown();
        }
    }
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
    /// `sample_ratio` is not between 0 and 1.
    #[error("telemetry.sample_ratio: must be between 0.0 and 1.0, got {0}")]
    SampleRatio(f64),
    /// The Zipkin exporter could not be built.
    #[error("telemetry.zipkin_endpoint: {0}")]
    Zipkin(String),
    /// `otlp_endpoint` is not a usable url, or the OTLP exporter could not be built.
    #[error("telemetry.otlp_endpoint: {0}")]
    Otlp(String),
    /// The HTTP client the exporters share could not be built.
    #[error("telemetry: cannot build the span exporters' http client: {0}")]
    HttpClient(String),
}

/// Installs the global subscriber; `RUST_LOG` overrides `config.log_filter`.
///
/// With a non-empty `config.zipkin_endpoint` or `config.otlp_endpoint` (or both), spans that
/// pass the filter are also exported to those collectors as `service`, sampled at
/// `config.sample_ratio`, and the W3C trace context and B3 propagators are installed for
/// [`propagation`].
pub fn init(config: &TelemetryConfig, service: Service) -> Result<Guard, InitError> {
    let filter = build_filter(config, std::env::var("RUST_LOG").ok())?;
    if !(0.0..=1.0).contains(&config.sample_ratio) {
        return Err(InitError::SampleRatio(config.sample_ratio));
    }
    let exporter = traces::Exporter::build(config, service)?;
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(exporter.as_ref().map(traces::Exporter::layer));
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
    if let Some(exporter) = &exporter {
        exporter.install_propagators();
        for (collector, endpoint) in [
            ("zipkin", &config.zipkin_endpoint),
            ("otlp", &config.otlp_endpoint),
        ] {
            if !endpoint.is_empty() {
                tracing::info!(
                    endpoint = %endpoint,
                    sample_ratio = config.sample_ratio,
                    "exporting spans to {collector}"
                );
            }
        }
    }
    Ok(Guard { traces: exporter })
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

    const TEST_SERVICE: Service = Service {
        name: "test",
        version: "0",
    };

    #[test]
    fn a_sample_ratio_outside_zero_to_one_is_refused() {
        for bad in [-0.1, 1.5, f64::NAN] {
            let config = TelemetryConfig {
                sample_ratio: bad,
                ..TelemetryConfig::default()
            };
            let err = init(&config, TEST_SERVICE).unwrap_err();
            assert!(
                err.to_string().starts_with("telemetry.sample_ratio"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_bad_otlp_endpoint_is_refused_naming_the_key() {
        let config = TelemetryConfig {
            otlp_endpoint: "localhost:4318".to_owned(),
            ..TelemetryConfig::default()
        };
        let err = init(&config, TEST_SERVICE).unwrap_err();
        assert!(
            err.to_string().starts_with("telemetry.otlp_endpoint: "),
            "{err}"
        );
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
