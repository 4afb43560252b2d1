//! client-service: plays the other side of callback-service.
//!
//! Two parts, each switchable: the [`simulator`] of the upstream API
//! (`GET /objects/{id}`, online when the id is even, after a random latency) and the
//! [`emitter`] of callbacks, which POSTs random ids to the service every interval and
//! prints one [`report`] line per round on stdout. Logs go to stderr.

pub mod config;
pub mod emitter;
pub mod report;
pub mod signing;
pub mod simulator;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// Runs the enabled parts until `shutdown` is cancelled.
///
/// When the emitter has played its configured number of rounds and printed their reports,
/// it cancels `shutdown` itself, so the whole program stops. Report lines are written to
/// stdout as they come.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let simulator = match settings.simulator {
        Some(simulator) => {
            let listener = TcpListener::bind(simulator.listen).await.with_context(|| {
                format!("upstream.listen: cannot listen on {}", simulator.listen)
            })?;
            Some(tokio::spawn(simulator::serve(
                listener,
                simulator,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let emitter = settings.emitter.map(|emitter| {
        let (reports, mut received) = mpsc::unbounded_channel();
        let printer = tokio::spawn(async move {
            while let Some(report) = received.recv().await {
                println!("{report}");
            }
        });
        let shutdown = shutdown.clone();
        let emitter = tokio::spawn(async move {
            let result = emitter::run(emitter, reports, shutdown.clone()).await;
            shutdown.cancel();
            result
        });
        (emitter, printer)
    });

    let mut result = Ok(());
    if let Some((emitter, printer)) = emitter {
        result = emitter
            .await
            .context("the emitter panicked")
            .and_then(|r| r);
        // Every sender is gone once the emitter's rounds are: this ends with the last line.
        printer.await.context("the report printer panicked")?;
    }
    if let Some(simulator) = simulator {
        simulator.await.context("the upstream simulator panicked")?;
    }
    result
}
