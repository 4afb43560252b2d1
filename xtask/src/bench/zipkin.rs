//! A Zipkin collector that accepts and discards spans, so a benchmark can measure what
//! exporting traces costs the service (`--trace-sample`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The collector; it stops when dropped.
#[derive(Debug)]
pub struct Sink {
    addr: SocketAddr,
    batches: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Sink {
    /// Listens on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the zipkin sink")?;
        let addr = listener.local_addr()?;
        let batches = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&batches);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, Arc::clone(&counted)));
            }
        });
        Ok(Self {
            addr,
            batches,
            task,
        })
    }

    /// The endpoint to give the service (`telemetry.zipkin_endpoint`).
    pub fn endpoint(&self) -> String {
        format!("http://{}/api/v2/spans", self.addr)
    }

    /// How many span batches arrived.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers `202` to every request of one keep-alive connection, reading and dropping the
/// body (`content-length` framing, as the exporter sends it).
async fn serve(stream: TcpStream, batches: Arc<AtomicU64>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        let mut length = 0_usize;
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let header = line.trim_end();
            if header.is_empty() && !first {
                break;
            }
            first = false;
            if let Some((name, value)) = header.split_once(':')
                && name.trim().eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        batches.fetch_add(1, Ordering::Relaxed);
        let answer = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n";
        if write.write_all(answer).await.is_err() {
            return;
        }
    }
}
