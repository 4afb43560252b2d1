//! callback-service: accepts callbacks, fetches each object's status upstream, stores the
//! online ones and deletes them when their TTL has passed.
//!
//! This binary only wires: configuration → adapters → pipeline, sweeper and servers →
//! graceful shutdown.

mod allocator;
mod config;
mod profiles;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use domain::{
    Application, Clock, ExpiryConfig, ExpiryWaker, ObjectSource, ObjectStore, Pipeline,
    PipelineConfig, Sweeper, SystemClock,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Flags, ms, redact_url};

fn main() -> ExitCode {
    // Before any reqwest client is built: reqwest has no rustls provider of its own, and
    // PostgreSQL, the upstream and the exporter share this one (ring).
    tls::install_default_provider();
    let flags = Flags::parse();
    let config = match Config::load(&flags) {
        Ok(config) => config,
        Err(err) => {
            // Plain text, no backtrace: a configuration mistake is not a bug.
            eprintln!("callback-service: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let _telemetry = match telemetry::init(
        &config.telemetry.common(),
        telemetry::Service {
            name: "callback-service",
            version: env!("CARGO_PKG_VERSION"),
        },
    ) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("callback-service: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Before anything records: handles registered earlier would record nothing.
    let metrics = match telemetry::metrics::install() {
        Ok(metrics) => metrics,
        Err(err) => {
            eprintln!("callback-service: {err}");
            return ExitCode::FAILURE;
        }
    };
    domain::metrics::describe();
    http_transport::metrics::describe();
    upstream_client::metrics::describe();
    storage::metrics::describe();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
        .and_then(|runtime| runtime.block_on(run(config, metrics)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "callback-service failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, metrics: telemetry::metrics::MetricsHandle) -> anyhow::Result<()> {
    tracing::info!(config = %config.redacted_json(), "starting callback-service {}", env!("CARGO_PKG_VERSION"));
    // Early, so the heap profile also shows what start-up allocates and keeps.
    telemetry::profiling::set_heap_profiling(config.telemetry.heap_profiling).await;
    #[cfg(unix)]
    survive_file_size_limit()?;
    // Before the database: a certificate that cannot be used is a setting to fix now.
    let reload_every = ms(config.http.tls_reload_interval_ms);
    let api_tls = listener_tls(
        "http",
        &config.http.tls_cert_file,
        &config.http.tls_key_file,
        reload_every,
    )?;
    let admin_tls = listener_tls(
        "admin",
        &config.admin.tls_cert_file,
        &config.admin.tls_key_file,
        reload_every,
    )?;
    #[cfg(unix)]
    reload_certificates_on_sighup(api_tls.iter().chain(&admin_tls).cloned().collect())?;

    let database = storage::open(
        &config.database.url,
        &storage::StoreOptions {
            max_connections: config.database.max_connections,
            wait_timeout: ms(config.database.wait_timeout_ms),
            connect_timeout: ms(config.database.connect_timeout_ms),
            statement_timeout: ms(config.database.statement_timeout_ms),
            tls: storage::PgTlsOptions {
                ca_file: path_setting(&config.database.tls_ca_file),
                cert_file: path_setting(&config.database.tls_cert_file),
                key_file: path_setting(&config.database.tls_key_file),
            },
        },
    )
    .await
    .with_context(|| {
        format!(
            "database.url: cannot open {}",
            redact_url(&config.database.url)
        )
    })?;
    let source: Arc<dyn ObjectSource> = Arc::new(
        upstream_client::HttpObjectSource::new(upstream_client::UpstreamConfig {
            base_url: config.upstream.base_url.clone(),
            request_timeout: ms(config.upstream.request_timeout_ms),
            connect_timeout: ms(config.upstream.connect_timeout_ms),
            retry_deadline: ms(config.upstream.retry_deadline_ms),
            max_requests_per_second: config.upstream.max_requests_per_second,
            // Every fetch in flight may hold a connection; keeping as many idle ones means
            // a burst never closes connections only to open them again for the next one.
            max_idle_per_host: config.upstream.max_in_flight,
            tls_ca_file: path_setting(&config.upstream.tls_ca_file),
            tls_identity: identity(
                "upstream",
                &config.upstream.tls_cert_file,
                &config.upstream.tls_key_file,
            )?,
            ..upstream_client::UpstreamConfig::default()
        })
        .context("upstream.base_url")?,
    );
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store: Arc<dyn ObjectStore> = database.clone();
    if storage::is_single_instance(&config.database.url) {
        // Nobody else can hold leases on an embedded database: a previous run's are stale.
        let freed = database
            .release(None)
            .await
            .context("database.url: cannot release stale leases")?;
        if freed > 0 {
            tracing::info!(freed, "took back work claimed by a previous run");
        }
    }
    // Stable across restarts: the pipeline takes back this instance's own stale leases
    // (left by a kill) as soon as the database answers.
    let owner = instance_id(&config.pipeline.instance_id);
    tracing::info!(instance_id = %owner, "leases are taken under this instance id");

    let api = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("http.listen: cannot listen on {}", config.http.listen))?;
    let admin = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot listen on {}", config.admin.listen))?;

    let expiry = ExpiryWaker::new();
    let pipeline = Pipeline::start(
        source,
        database,
        Arc::clone(&clock),
        expiry.clone(),
        Arc::new(telemetry::propagation::Propagation),
        PipelineConfig {
            ttl: ms(config.expiry.ttl_ms),
            max_in_flight: config.upstream.max_in_flight,
            max_batch: config.pipeline.max_batch,
            max_pending_ids: config.pipeline.max_pending_ids,
            max_group: config.pipeline.max_group,
            lease: ms(config.pipeline.lease_ms),
            poll_interval: ms(config.pipeline.poll_interval_ms),
            refetch_delay: ms(config.pipeline.refetch_delay_ms),
            store_linger: ms(config.pipeline.store_linger_ms),
            owner,
            retry: domain::retry::RetryPolicy {
                first_delay: ms(config.upstream.retry_first_delay_ms),
                max_delay: ms(config.upstream.retry_max_delay_ms),
                horizon: ms(config.upstream.retry_horizon_ms),
            },
            // Instances that start together do not retry in step.
            jitter_seed: u64::from(std::process::id())
                ^ clock.now().as_unix_micros().cast_unsigned(),
            failure_retention: ms(config.failures.retention_ms),
            breaker: domain::BreakerConfig {
                failures: config.upstream.breaker_failures,
                cool_down: ms(config.upstream.breaker_cool_down_ms),
            },
            ..PipelineConfig::default()
        },
    );
    let app = Application::new(pipeline.handle(), Arc::clone(&store), Arc::clone(&clock));
    let shutdown = CancellationToken::new();
    let readiness = tokio::spawn(app.readiness_monitor().run(
        ms(config.pipeline.poll_interval_ms),
        READINESS_PING_TIMEOUT,
        shutdown.child_token(),
    ));
    let probes = app.clone();
    let sweeper = tokio::spawn(
        Sweeper::new(
            store,
            clock,
            expiry,
            ExpiryConfig {
                batch_limit: config.expiry.delete_batch,
                ..ExpiryConfig::default()
            },
        )
        .run(shutdown.child_token()),
    );

    tracing::info!(addr = %api.local_addr()?, tls = api_tls.is_some(), "api listening");
    tracing::info!(addr = %admin.local_addr()?, tls = admin_tls.is_some(), "admin listening");
    let http_config = http_transport::HttpConfig {
        max_body_bytes: config.http.max_body_bytes,
        max_ids: config.http.max_ids,
        header_read_timeout: ms(config.http.header_read_timeout_ms),
        body_read_timeout: ms(config.http.body_read_timeout_ms),
        max_connections: config.http.max_connections,
        max_body_memory_bytes: config.http.max_body_memory_bytes,
        shutdown_grace: ms(config.http.shutdown_grace_ms),
        auth: config.auth.transport()?,
        trust_incoming_trace: config.trust_incoming_trace(),
        tls: api_tls,
        ..http_transport::HttpConfig::default()
    };
    log_auth(&config);
    let api_server = tokio::spawn(http_transport::serve(
        api,
        app.clone(),
        http_config,
        shutdown.child_token(),
    ));
    let mut admin_services = http_transport::AdminServices::new(Arc::new(move || metrics.render()))
        .with_profiler(Arc::new(profiles::TelemetryProfiler));
    if let Some(tls) = admin_tls {
        admin_services = admin_services.with_tls(tls);
    }
    let admin_server = tokio::spawn(http_transport::serve_admin(
        admin,
        app,
        admin_services,
        shutdown.child_token(),
    ));

    let signal = wait_for_signal().await?;
    probes.begin_shutdown();
    let delay = ms(config.http.shutdown_delay_ms);
    if signal == "SIGTERM" && !delay.is_zero() {
        tracing::info!(
            signal,
            delay_ms = config.http.shutdown_delay_ms,
            "shutting down: GET /readyz answers 503 from now on; still serving for \
             http.shutdown_delay_ms so load balancers stop sending (a second signal skips it)"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            again = wait_for_signal() => {
                tracing::info!(signal = again?, "second signal: not waiting any longer");
            }
        }
    }
    tracing::info!(
        signal,
        "shutting down: no new connections, draining requests in flight"
    );
    shutdown.cancel();
    for (name, server) in [("api", api_server), ("admin", admin_server)] {
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::error!(server = name, error = %err, "server failed while stopping")
            }
            Err(err) => tracing::error!(server = name, error = %err, "server task panicked"),
        }
    }
    // Both hold pipeline handles: gone before the pipeline drains, or its writer waits.
    drop(probes);
    if let Err(err) = readiness.await {
        tracing::error!(error = %err, "readiness monitor panicked");
    }
    let left = pipeline.shutdown(ms(config.pipeline.drain_grace_ms)).await;
    if let Err(err) = sweeper.await {
        tracing::error!(error = %err, "expiry sweeper panicked");
    }
    tracing::info!(handed_back_ids = left, "callback-service stopped");
    Ok(())
}

/// A write past the file size limit (`ulimit -f`, systemd's `LimitFSIZE=`) would kill the
/// process with SIGXFSZ. Caught, the write fails with EFBIG instead, as on a full disk: its
/// callbacks are answered 503, health names the database, and work resumes once the limit
/// is raised. (PostgreSQL ignores the signal for the same reason.) The failed write itself
/// is logged where it happens; this adds the cause, once per [`FILE_SIZE_LIMIT_LOG_EVERY`]
/// window at most.
#[cfg(unix)]
fn survive_file_size_limit() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut xfsz = signal(SignalKind::from_raw(libc::SIGXFSZ)).context("cannot catch SIGXFSZ")?;
    let budget = domain::log_budget::LogBudget::per_window(1, FILE_SIZE_LIMIT_LOG_EVERY);
    tokio::spawn(async move {
        while xfsz.recv().await.is_some() {
            if let Some(suppressed) = budget.admit(SystemClock.now()) {
                tracing::warn!(
                    suppressed_since_last = suppressed,
                    "a write reached the file size limit (RLIMIT_FSIZE) and failed; \
                     raise the limit or free the database's files"
                );
            }
        }
    });
    Ok(())
}

/// `SIGHUP` reads the listeners' certificate files again at once (they are also read every
/// few seconds); what each reload did is logged by the listener. Caught even when no
/// listener has TLS, so that a stray hang-up never stops the service.
#[cfg(unix)]
fn reload_certificates_on_sighup(
    listeners: Vec<http_transport::ListenerTls>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("cannot catch SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if listeners.is_empty() {
                tracing::info!("SIGHUP: no listener has TLS; nothing to reload");
            }
            for listener in &listeners {
                listener.reload_now();
            }
        }
    });
    Ok(())
}

/// How long the readiness monitor's database ping may take before the instance counts as
/// not ready; well under a probe's usual period, so one slow ping shows within one probe.
const READINESS_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How often at most the file size limit is logged while writes keep reaching it.
#[cfg(unix)]
const FILE_SIZE_LIMIT_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Says at start who may call the public API (counts only, never a key or a secret).
fn log_auth(config: &Config) {
    let auth = &config.auth;
    let trust_incoming_trace = config.trust_incoming_trace();
    match auth.mode {
        config::AuthMode::None => {
            tracing::info!(
                trust_incoming_trace,
                "auth.mode = none: every caller is let in"
            );
        }
        mode => tracing::info!(
            ?mode,
            api_keys = auth.api_keys.len(),
            webhook_secrets = auth.webhook_secrets.len(),
            tolerance_ms = auth.tolerance_ms,
            protect_reads = auth.protect_reads,
            trust_incoming_trace,
            "callers are authenticated"
        ),
    }
}

/// Waits for SIGINT or SIGTERM and names the one that came.
async fn wait_for_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("cannot listen for Ctrl-C")?;
        Ok("Ctrl-C")
    }
}

/// A certificate and key from `{section}.tls_cert_file` and `{section}.tls_key_file`:
/// both or neither.
fn identity(section: &str, cert: &str, key: &str) -> anyhow::Result<Option<tls::Identity>> {
    match (path_setting(cert), path_setting(key)) {
        (Some(cert_file), Some(key_file)) => Ok(Some(tls::Identity {
            cert_file,
            key_file,
        })),
        (None, None) => Ok(None),
        _ => anyhow::bail!(
            "invalid configuration: {section}.tls_cert_file and {section}.tls_key_file go together; set both or neither"
        ),
    }
}

/// A listener's TLS from `{section}.tls_cert_file` and `{section}.tls_key_file`, read and
/// checked now; `None` when neither is set.
fn listener_tls(
    section: &str,
    cert: &str,
    key: &str,
    reload_every: std::time::Duration,
) -> anyhow::Result<Option<http_transport::ListenerTls>> {
    identity(section, cert, key)?
        .map(|identity| {
            http_transport::ListenerTls::load(identity)
                .map(|tls| tls.with_reload_interval(reload_every))
                .with_context(|| {
                    format!("{section}.tls_cert_file / {section}.tls_key_file: unusable")
                })
        })
        .transpose()
}

/// A file setting: empty means not set.
fn path_setting(value: &str) -> Option<std::path::PathBuf> {
    (!value.is_empty()).then(|| std::path::PathBuf::from(value))
}

/// The name this instance takes leases under: `pipeline.instance_id`, else the host name
/// (unique per machine or container, and the same across restarts), else a fixed name.
fn instance_id(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let from_kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    from_kernel
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "callback-service".to_owned())
}
