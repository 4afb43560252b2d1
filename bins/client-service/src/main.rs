//! client-service: the upstream simulator and callback emitter that play the other side
//! of callback-service. This binary only wires configuration, telemetry and signals.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use client_service::config::{Config, Flags};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    // Before any reqwest client is built: reqwest has no rustls provider of its own.
    tls::install_default_provider();
    match start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Printed plainly, not through anyhow's `Debug`: an operator reading a bad key
            // wants the message, not a backtrace.
            eprintln!("client-service: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn start() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let config = Config::load(&flags)?;
    let settings = config.settings()?;
    let _telemetry = telemetry::init(
        &config.telemetry,
        telemetry::Service {
            name: "client-service",
            version: env!("CARGO_PKG_VERSION"),
        },
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let result = runtime.block_on(async {
        tracing::info!(config = %config.to_json(), "starting client-service {}", env!("CARGO_PKG_VERSION"));
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        client_service::run(settings, shutdown).await
    });
    match &result {
        Ok(()) => tracing::info!("client-service stopped"),
        Err(err) => tracing::error!(error = format!("{err:#}"), "client-service failed"),
    }
    result
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let signal = wait_for_signal().await;
    tracing::info!(signal, "stopping client-service");
    shutdown.cancel();
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGTERM; only SIGINT stops client-service");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "SIGINT"
}
