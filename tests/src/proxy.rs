//! A TCP proxy on a free loopback port that a test can cut and restore, to take a
//! dependency (PostgreSQL, an upstream) away from a running service without root.
//!
//! While cut, every open connection is reset at once and every new one is accepted and
//! reset straight away, so a client sees a broken or refused connection immediately
//! instead of waiting for a timeout. The listener stays bound throughout, so the address
//! never changes and no other process can take the port in between.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Copies bytes both ways between clients and `target`, until cut or dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    /// Whether connections go through; false while cut.
    up: AtomicBool,
    /// Bumped at every cut: each connection watches it and resets itself when it moves.
    cuts: watch::Sender<u64>,
    /// Connections relayed to the target right now.
    open: AtomicUsize,
    /// Connections reset on arrival because the proxy was cut, since start.
    refused: AtomicUsize,
}

impl Proxy {
    /// Starts relaying connections from a free port on 127.0.0.1 to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            up: AtomicBool::new(true),
            cuts: watch::Sender::new(0),
            open: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept(listener, Arc::clone(&shared)));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with its host and port replaced by the proxy's, e.g. a PostgreSQL url that
    /// then reaches the same server through the proxy.
    pub fn url_through(&self, url: &str) -> anyhow::Result<String> {
        let mut parsed = reqwest::Url::parse(url).with_context(|| format!("not a url: {url:?}"))?;
        parsed
            .set_ip_host(self.addr.ip())
            .map_err(|()| anyhow::anyhow!("{url:?} has no host to replace"))?;
        parsed
            .set_port(Some(self.addr.port()))
            .map_err(|()| anyhow::anyhow!("{url:?} cannot take a port"))?;
        Ok(parsed.into())
    }

    /// Resets every open connection at once and resets new ones as they arrive, until
    /// [`Proxy::restore`].
    pub fn cut(&self) {
        // `up` first: a connection accepted from now on either sees it false or is
        // already watching `cuts` and sees the bump.
        self.shared.up.store(false, Ordering::SeqCst);
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    /// Lets new connections through again.
    pub fn restore(&self) {
        self.shared.up.store(true, Ordering::SeqCst);
    }

    /// How many connections arrived while cut (each reset at once), since start: while
    /// the target is away, every request a client makes costs one.
    pub fn refused_connections(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// How many connections are relayed right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // e.g. too many open files: the next accept may work
            tokio::task::yield_now().await;
            continue;
        };
        let cuts = shared.cuts.subscribe();
        if !shared.up.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            reset(client);
            continue;
        }
        tokio::spawn(relay(client, Arc::clone(&shared), cuts));
    }
}

async fn relay(mut client: TcpStream, shared: Arc<Shared>, mut cuts: watch::Receiver<u64>) {
    let mut server = tokio::select! {
        connected = TcpStream::connect(shared.target) => match connected {
            Ok(server) => server,
            Err(_) => return reset(client),
        },
        _ = cuts.changed() => return reset(client),
    };
    shared.open.fetch_add(1, Ordering::SeqCst);
    let cut = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        _ = cuts.changed() => true,
    };
    shared.open.fetch_sub(1, Ordering::SeqCst);
    if cut {
        reset(client);
        reset(server);
    }
}

/// Closes `stream` with a TCP reset, so the peer's next read or write fails at once.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const BOUND: Duration = Duration::from_secs(5);

    /// An echo server on a free loopback port.
    async fn echo() -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        Ok(addr)
    }

    /// Sends `ping` and reads the echo back; an error if the connection is broken.
    async fn round_trip(stream: &mut TcpStream) -> anyhow::Result<()> {
        stream.write_all(b"ping").await?;
        let mut answer = [0; 4];
        tokio::time::timeout(BOUND, stream.read_exact(&mut answer)).await??;
        anyhow::ensure!(&answer == b"ping", "echoed {answer:?}");
        Ok(())
    }

    #[tokio::test]
    async fn cut_breaks_open_and_new_connections_and_restore_lets_them_through()
    -> anyhow::Result<()> {
        let proxy = Proxy::start(echo().await?).await?;
        let mut open = TcpStream::connect(proxy.addr()).await?;
        round_trip(&mut open).await?;

        proxy.cut();
        let mut byte = [0; 1];
        let read = tokio::time::timeout(BOUND, open.read(&mut byte)).await?;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the open connection is broken at once: {read:?}"
        );
        let mut new = TcpStream::connect(proxy.addr()).await?;
        assert!(
            round_trip(&mut new).await.is_err(),
            "a new connection is reset"
        );

        proxy.restore();
        let mut again = TcpStream::connect(proxy.addr()).await?;
        round_trip(&mut again).await?;
        assert_eq!(proxy.open_connections(), 1);
        Ok(())
    }

    #[tokio::test]
    async fn urls_are_rewritten_to_the_proxy() -> anyhow::Result<()> {
        let proxy = Proxy::start("127.0.0.1:5432".parse()?).await?;
        let port = proxy.addr().port();
        assert_eq!(
            proxy.url_through("postgres://postgres@localhost:5432/cbtest_1_2?sslmode=disable")?,
            format!("postgres://postgres@127.0.0.1:{port}/cbtest_1_2?sslmode=disable")
        );
        assert_eq!(
            proxy.url_through("postgres://u:pw@db/x")?,
            format!("postgres://u:pw@127.0.0.1:{port}/x")
        );
        Ok(())
    }
}
