//! TLS on a listener: the handshake of every connection, and a certificate that follows its
//! files, so a renewal needs no restart.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use tls::{Identity, Reloaded, ServerCertificate, TlsError};

use crate::metrics;

/// How often the certificate files are read again, by default.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// A listener's TLS: the certificate it presents and how it is kept fresh.
///
/// While the listener runs, the certificate and key files are read again every
/// [`reload_interval`](Self::with_reload_interval) and whenever [`reload_now`](Self::reload_now)
/// is called (the binary calls it on `SIGHUP`). Changed files are presented from the next
/// handshake on; connections already open keep the certificate they were made with. Files
/// that cannot be used (half written, a key that does not match) leave the previous
/// certificate in place: the failure is logged once per cause and counted in
/// `tls_reloads_total{outcome="failed"}`.
#[derive(Clone)]
pub struct ListenerTls {
    certificate: Arc<ServerCertificate>,
    acceptor: TlsAcceptor,
    reload_now: Arc<Notify>,
    /// `None`: only on [`ListenerTls::reload_now`].
    reload_interval: Option<Duration>,
}

impl ListenerTls {
    /// Reads the certificate chain and key `identity` names; an error names the file and
    /// what is wrong with it.
    pub fn load(identity: Identity) -> Result<Self, TlsError> {
        let certificate = Arc::new(ServerCertificate::load(identity)?);
        let config = certificate.server_config(&tls::HTTP_ALPN)?;
        Ok(Self {
            certificate,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            reload_now: Arc::new(Notify::new()),
            reload_interval: Some(DEFAULT_RELOAD_INTERVAL),
        })
    }

    /// Reads the files again every `interval` instead of [`DEFAULT_RELOAD_INTERVAL`];
    /// zero: only when [`reload_now`](Self::reload_now) asks.
    #[must_use]
    pub fn with_reload_interval(mut self, interval: Duration) -> Self {
        self.reload_interval = (!interval.is_zero()).then_some(interval);
        self
    }

    /// Asks the running listener to read the files again now (what `SIGHUP` does).
    pub fn reload_now(&self) {
        self.reload_now.notify_one();
    }

    /// The files the certificate is read from.
    pub fn identity(&self) -> &Identity {
        self.certificate.identity()
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("identity", self.identity())
            .field("reload_interval", &self.reload_interval)
            .finish_non_exhaustive()
    }
}

/// Two are equal when they are the same certificate (clones of one [`ListenerTls::load`]).
impl PartialEq for ListenerTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.certificate, &other.certificate)
    }
}

impl Eq for ListenerTls {}

/// Why the files are read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Interval,
    Asked,
}

/// Reads the certificate files again on every interval and every [`ListenerTls::reload_now`]
/// until `shutdown`; runs beside the accept loop.
pub(crate) async fn keep_fresh(
    listener: &'static str,
    tls: ListenerTls,
    shutdown: CancellationToken,
) {
    metrics::register_tls_reloads(listener);
    let mut failing: Option<String> = None;
    loop {
        let trigger = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = tls.reload_now.notified() => Trigger::Asked,
            () = interval_elapsed(tls.reload_interval) => Trigger::Interval,
        };
        let certificate = Arc::clone(&tls.certificate);
        let outcome =
            match tokio::task::spawn_blocking(move || certificate.reload_if_changed()).await {
                Ok(outcome) => outcome,
                Err(err) => {
                    tracing::error!(listener, error = %err, "the certificate reload task failed");
                    metrics::tls_reload(listener, "failed");
                    continue;
                }
            };
        let files = tls.identity();
        match outcome {
            Ok(Reloaded::Replaced) => {
                failing = None;
                metrics::tls_reload(listener, "replaced");
                tracing::info!(
                    listener,
                    cert_file = %files.cert_file.display(),
                    "certificate reloaded; new connections get the new one"
                );
            }
            Ok(Reloaded::Unchanged) => {
                if failing.take().is_some() {
                    tracing::info!(
                        listener,
                        "certificate files usable again, and unchanged; still presenting the same certificate"
                    );
                } else if trigger == Trigger::Asked {
                    tracing::info!(
                        listener,
                        cert_file = %files.cert_file.display(),
                        "reload asked for; the certificate files are unchanged"
                    );
                }
            }
            Err(err) => {
                metrics::tls_reload(listener, "failed");
                let cause = err.to_string();
                if failing.as_deref() != Some(cause.as_str()) || trigger == Trigger::Asked {
                    tracing::warn!(
                        listener,
                        error = %cause,
                        "certificate reload failed; still presenting the previous certificate"
                    );
                }
                failing = Some(cause);
            }
        }
    }
}

/// Waits `interval`, or forever when there is none.
async fn interval_elapsed(interval: Option<Duration>) {
    match interval {
        Some(interval) => tokio::time::sleep(interval).await,
        None => std::future::pending().await,
    }
}

/// Makes the TLS handshake of an accepted connection within `timeout`; `None` (logged at
/// debug, counted) when it fails or takes too long: scanners and clients that distrust the
/// certificate are routine on a public port.
pub(crate) async fn handshake(
    listener: &'static str,
    acceptor: &TlsAcceptor,
    stream: tokio::net::TcpStream,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(err)) => {
            metrics::tls_handshake_failed(listener, "refused");
            tracing::debug!(error = %err, "TLS handshake failed");
            None
        }
        Err(_elapsed) => {
            metrics::tls_handshake_failed(listener, "timeout");
            tracing::debug!("no TLS handshake within the header read timeout; closing");
            None
        }
    }
}
