//! The HTTP face of callback-service: a hyper 1 server with routing, handlers, one error
//! envelope, limits and a bounded graceful shutdown.
//!
//! Two listeners share the same machinery (the `server` module): the public API ([`serve`]) and the
//! admin listener ([`serve_admin`]). Routes are declared in one place per listener
//! (`api::router`, `admin::router`); every rejection goes through `error::ApiError`, which
//! alone decides the status code and the `{"error","message"}` envelope.

mod admin;
mod api;
mod auth;
mod callback;
mod error;
mod failures;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod json;
pub mod metrics;
mod router;
mod server;
mod tls_listener;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use admin::{CpuProfileFormat, Profile, ProfileError, Profiler};
pub use auth::{ApiKey, AuthConfig, AuthMode, CredentialError, WebhookSecret};
pub use tls::{Identity as TlsIdentity, TlsError};
pub use tls_listener::{DEFAULT_RELOAD_INTERVAL, ListenerTls};

/// Limits and timeouts of the public HTTP listener.
///
/// Every limit is enforced by the server itself; none is left to a library default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// The largest request body accepted, in bytes; larger bodies get `413`.
    pub max_body_bytes: usize,
    /// The most elements `object_ids` may have; more get `413`.
    pub max_ids: usize,
    /// How long a client may take to send a request's headers (HTTP/1) or its first
    /// request (any protocol) before the connection is closed.
    ///
    /// hyper restarts this timer whenever an HTTP/1 connection waits for the next request,
    /// so it also bounds how long an idle keep-alive connection is kept open.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request body once its headers arrived;
    /// slower clients get `408`.
    pub body_read_timeout: Duration,
    /// The most connections open at once; accepting waits while the limit is reached.
    pub max_connections: usize,
    /// How many bytes the callbacks being read and submitted at once may hold together
    /// (each counts its body, at least 4 KiB); past it, callbacks get a fast `503` with
    /// `Retry-After` instead of growing memory.
    pub max_body_memory_bytes: usize,
    /// How long shutdown waits for in-flight requests before closing their connections.
    pub shutdown_grace: Duration,
    /// How often an idle HTTP/2 connection is pinged to find dead peers; `None` disables it.
    pub http2_keep_alive_interval: Option<Duration>,
    /// Who may call the API; nobody is checked by default. `GET /` (health) never is.
    pub auth: AuthConfig,
    /// Whether a request's `traceparent` (or B3 headers) continues the caller's trace, and
    /// so decides whether it is sampled; when `false` every request starts a trace of its
    /// own, sampled at the configured ratio.
    pub trust_incoming_trace: bool,
    /// TLS on the listener; plain HTTP when `None`.
    pub tls: Option<ListenerTls>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_ids: 10_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_body_memory_bytes: 64 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            http2_keep_alive_interval: Some(Duration::from_secs(30)),
            auth: AuthConfig::default(),
            trust_incoming_trace: true,
            tls: None,
        }
    }
}

/// Serves the public API on `listener` until `shutdown` is cancelled, then drains.
///
/// Accept errors (for example running out of file descriptors) are logged and retried
/// after a short pause; they never end the server. On shutdown the listener is closed at
/// once, requests in flight get up to [`HttpConfig::shutdown_grace`] to finish, and the
/// outcome is logged.
pub async fn serve(
    listener: TcpListener,
    app: domain::Application,
    config: HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let settings = server::Settings::from(&config);
    metrics::register_auth_rejections();
    let state = Arc::new(api::ApiState::new(app, &config));
    let router = api::router().trusting_incoming_trace(config.trust_incoming_trace);
    server::run(
        "api", listener, router, state, settings, config.tls, shutdown,
    )
    .await
}

/// Renders every metric in the Prometheus text exposition format for `GET /metrics`.
///
/// The binary passes its recorder's renderer in, so this crate needs no exporter.
pub type MetricsRenderer = Arc<dyn Fn() -> String + Send + Sync>;

/// What the binary plugs into the admin listener: the metrics renderer and, optionally, a
/// [`Profiler`] for the `/debug/pprof/*` routes.
///
/// A bare renderer (`Arc<impl Fn() -> String>`) converts into one without a profiler; the
/// profile routes then answer `501 not_supported`.
#[derive(Clone)]
pub struct AdminServices {
    metrics: MetricsRenderer,
    profiler: Option<Arc<dyn Profiler>>,
    tls: Option<ListenerTls>,
}

impl AdminServices {
    /// `GET /metrics` answers what `metrics` renders; no profiler.
    pub fn new(metrics: MetricsRenderer) -> Self {
        Self {
            metrics,
            profiler: None,
            tls: None,
        }
    }

    /// `GET /debug/pprof/profile` and `GET /debug/pprof/heap` are taken by `profiler`.
    pub fn with_profiler(mut self, profiler: Arc<dyn Profiler>) -> Self {
        self.profiler = Some(profiler);
        self
    }

    /// The admin listener speaks TLS with this certificate.
    pub fn with_tls(mut self, tls: ListenerTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

impl std::fmt::Debug for AdminServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServices")
            .field("profiler", &self.profiler.is_some())
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl<F> From<Arc<F>> for AdminServices
where
    F: Fn() -> String + Send + Sync + ?Sized + 'static,
{
    fn from(render: Arc<F>) -> Self {
        Self::new(Arc::new(move || render()))
    }
}

/// Serves the admin routes (`/failures`, `/stats`, `/metrics`, `/debug/pprof/profile`,
/// `/debug/pprof/heap`) on `listener` until `shutdown` is cancelled.
///
/// Meant for a loopback address; it uses the same server machinery as [`serve`] with
/// smaller limits. `services` renders `GET /metrics` and takes the profiles; a bare
/// [`MetricsRenderer`] is enough when there is no profiler.
pub async fn serve_admin(
    listener: TcpListener,
    app: domain::Application,
    services: impl Into<AdminServices>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let settings = server::Settings {
        max_connections: 256,
        shutdown_grace: Duration::from_secs(5),
        ..server::Settings::from(&HttpConfig::default())
    };
    let mut services = services.into();
    let tls = services.tls.take();
    let state = Arc::new(admin::AdminState::new(app, services));
    server::run(
        "admin",
        listener,
        admin::router(),
        state,
        settings,
        tls,
        shutdown,
    )
    .await
}
