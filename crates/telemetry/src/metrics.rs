//! Prometheus metrics: the recorder behind the `metrics` facade and the text it renders.
//!
//! Every crate records through the `metrics` facade and describes its own series next to
//! where it records them; this module only installs the process-wide Prometheus recorder
//! (without the exporter's own HTTP listener: the admin listener serves `GET /metrics`)
//! and keeps its histograms drained.

use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Bucket bounds, in seconds, of every histogram whose name ends in `_seconds`.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bucket bounds of every histogram whose name ends in `_size` (counts of items) or
/// `_attempts` (fetches an id took).
pub const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Why the metrics recorder could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The recorder could not be built, or another one is already installed.
    #[error("cannot install the prometheus recorder: {0}")]
    Install(#[from] BuildError),
    /// The upkeep thread could not be spawned.
    #[error("cannot start the metrics upkeep thread: {0}")]
    Upkeep(#[source] std::io::Error),
}

/// Renders the installed recorder's series in the Prometheus text format; cheap to clone.
///
/// A thread folds histogram samples into their buckets every few seconds, so memory stays
/// bounded when nobody scrapes; it stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct MetricsHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    handle: PrometheusHandle,
    /// Dropping the sender wakes the upkeep thread and ends it.
    stop: Option<mpsc::Sender<()>>,
    upkeep: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(upkeep) = self.upkeep.take() {
            // The thread only waits on the channel and runs upkeep: it ends at once.
            let _ = upkeep.join();
        }
    }
}

impl MetricsHandle {
    /// Every series recorded so far, in the Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        // Upkeep publishes descriptions registered since the last run, as well as
        // folding histogram samples.
        self.inner.handle.run_upkeep();
        self.inner.handle.render()
    }
}

/// The builder with this service's histogram buckets.
fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_size".to_owned()), SIZE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_attempts".to_owned()), SIZE_BUCKETS)
}

/// Installs the Prometheus recorder as the process-wide `metrics` recorder.
///
/// Call it once, before the components whose series should be recorded start: handles
/// registered earlier record nothing. Fails when another recorder is installed.
pub fn install() -> Result<MetricsHandle, MetricsError> {
    let handle = builder()?.install_recorder()?;
    let (stop, stopped) = mpsc::channel::<()>();
    let upkeep = {
        let handle = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".to_owned())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(UPKEEP_INTERVAL)
                {
                    handle.run_upkeep();
                }
            })
            .map_err(MetricsError::Upkeep)?
    };
    Ok(MetricsHandle {
        inner: Arc::new(Inner {
            handle,
            stop: Some(stop),
            upkeep: Some(upkeep),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_size_histograms_get_buckets_and_descriptions_render() {
        let recorder = builder().unwrap().build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            ::metrics::describe_histogram!(
                "work_duration_seconds",
                ::metrics::Unit::Seconds,
                "how long work took"
            );
            ::metrics::histogram!("work_duration_seconds").record(0.003);
            ::metrics::histogram!("batch_size").record(7.0);
            ::metrics::counter!("things_total", "kind" => "a").increment(2);
        });
        handle.run_upkeep();
        let text = handle.render();
        assert!(
            text.contains("# HELP work_duration_seconds how long work took"),
            "{text}"
        );
        assert!(
            text.contains("work_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("work_duration_seconds_bucket{le=\"0.0025\"} 0"),
            "{text}"
        );
        assert!(text.contains("batch_size_bucket{le=\"10\"} 1"), "{text}");
        assert!(text.contains("things_total{kind=\"a\"} 2"), "{text}");
    }
}
