//! CPU and heap profiles for an admin listener (feature `profiling`).
//!
//! [`cpu`] samples the stacks of every thread [`CPU_FREQUENCY`] times per second of CPU
//! time for a while (pprof-rs, `SIGPROF`) and returns a gzipped pprof protobuf or a
//! flamegraph SVG; one CPU profile runs at a time in the process. [`heap`] dumps
//! jemalloc's sampled heap profile (what is allocated now, by allocation stack) as a
//! gzipped pprof protobuf, symbolized.
//!
//! Heap profiles need three things: jemalloc as the global allocator ([`Jemalloc`]),
//! profiling enabled when jemalloc starts (a binary exports `malloc_conf` with
//! `prof:true`; callback-service also sets `prof_active:false`, so nothing is sampled until
//! told), and sampling switched on with [`set_heap_profiling`]. CPU profiles need Unix,
//! heap profiles Linux; elsewhere both answer [`ProfileError::Unsupported`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often, per second of CPU time, a CPU profile samples the stacks: 99 rather than 100
/// so sampling does not run in lockstep with periodic work.
pub const CPU_FREQUENCY: i32 = 99;

/// The content type of a pprof profile (gzipped protobuf), as Go's `net/http/pprof` serves it.
pub const PPROF_CONTENT_TYPE: &str = "application/octet-stream";

/// The content type of a flamegraph.
pub const SVG_CONTENT_TYPE: &str = "image/svg+xml";

/// How a CPU profile is returned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuFormat {
    /// A gzipped pprof protobuf, for `go tool pprof` and friends.
    #[default]
    Pprof,
    /// A flamegraph SVG, for a browser.
    Flamegraph,
}

/// A profile ready to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Its media type: [`PPROF_CONTENT_TYPE`] or [`SVG_CONTENT_TYPE`].
    pub content_type: &'static str,
    /// The profile itself.
    pub body: Vec<u8>,
}

/// Why no profile was taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// Another CPU profile is being taken; there is one profiler per process.
    #[error("a cpu profile is already being taken; try again when it is done")]
    CpuInProgress,
    /// Heap profiling is possible but switched off (see [`set_heap_profiling`]).
    #[error("heap profiling is off")]
    HeapInactive,
    /// This platform or process cannot take the profile.
    #[error("{0}")]
    Unsupported(&'static str),
    /// Taking or encoding the profile failed.
    #[error("{0}")]
    Failed(String),
}

/// Set while a CPU profile runs: pprof-rs has one profiler per process.
static CPU_PROFILE_RUNNING: AtomicBool = AtomicBool::new(false);

/// The right to run the process's one CPU profile; given back when dropped, also when the
/// request that holds it is abandoned.
#[derive(Debug)]
struct CpuSlot(());

impl CpuSlot {
    fn take() -> Result<Self, ProfileError> {
        CPU_PROFILE_RUNNING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| Self(()))
            .map_err(|_| ProfileError::CpuInProgress)
    }
}

impl Drop for CpuSlot {
    fn drop(&mut self) {
        CPU_PROFILE_RUNNING.store(false, Ordering::Release);
    }
}

/// Profiles the CPU time of the whole process for `duration` and returns it as `format`.
///
/// A second call while one runs fails at once with [`ProfileError::CpuInProgress`].
/// Dropping the future stops the profile. Starting the profiler and symbolizing the
/// samples run on the blocking pool.
pub async fn cpu(duration: Duration, format: CpuFormat) -> Result<Profile, ProfileError> {
    let slot = CpuSlot::take()?;
    cpu::take(slot, duration, format).await
}

#[cfg(unix)]
mod cpu {
    use std::io::Write as _;
    use std::time::Duration;

    use pprof::protos::Message as _;

    use super::{CPU_FREQUENCY, CpuFormat, CpuSlot, Profile, ProfileError};

    /// Samples taken while the innermost frame is in one of these libraries are dropped:
    /// unwinding from there in a signal handler can deadlock (`libgcc`, `libc`, `pthread`),
    /// and `vdso` has bad unwind tables on some systems (pprof-rs's advice).
    const BLOCKLIST: &[&str] = &["libc", "libgcc", "pthread", "vdso"];

    /// What a flamegraph without samples shows instead of an empty body.
    const EMPTY_FLAMEGRAPH: &str = concat!(
        r#"<?xml version="1.0" standalone="no"?>"#,
        r#"<svg version="1.1" width="1200" height="60" xmlns="http://www.w3.org/2000/svg">"#,
        r#"<text x="600" y="34" text-anchor="middle" font-family="Verdana" font-size="14">"#,
        "no samples: the process used (almost) no CPU time during the profile",
        "</text></svg>"
    );

    pub(super) async fn take(
        slot: CpuSlot,
        duration: Duration,
        format: CpuFormat,
    ) -> Result<Profile, ProfileError> {
        // The profiler's first start loads the binary's debug information: blocking work.
        let guard = tokio::task::spawn_blocking(|| {
            pprof::ProfilerGuardBuilder::default()
                .frequency(CPU_FREQUENCY)
                .blocklist(BLOCKLIST)
                .build()
        })
        .await
        .map_err(|err| ProfileError::Failed(format!("cannot start the cpu profiler: {err}")))?
        .map_err(|err| match err {
            pprof::Error::Running => ProfileError::CpuInProgress,
            other => ProfileError::Failed(format!("cannot start the cpu profiler: {other}")),
        })?;
        tokio::time::sleep(duration).await;
        let profile = tokio::task::spawn_blocking(move || {
            let report = guard
                .report()
                .build()
                .map_err(|err| ProfileError::Failed(format!("cannot read the cpu samples: {err}")));
            // Sampling stops here, before the encoding.
            drop(guard);
            drop(slot);
            encode(&report?, duration, format)
        })
        .await
        .map_err(|err| ProfileError::Failed(format!("encoding the cpu profile failed: {err}")))?;
        if let Ok(profile) = &profile {
            tracing::info!(
                seconds = duration.as_secs_f64(),
                ?format,
                bytes = profile.body.len(),
                "cpu profile taken"
            );
        }
        profile
    }

    /// The samples of `report` as `format`.
    fn encode(
        report: &pprof::Report,
        duration: Duration,
        format: CpuFormat,
    ) -> Result<Profile, ProfileError> {
        match format {
            CpuFormat::Pprof => {
                let profile = report.pprof().map_err(|err| {
                    ProfileError::Failed(format!("cannot build the pprof profile: {err}"))
                })?;
                Ok(Profile {
                    content_type: super::PPROF_CONTENT_TYPE,
                    body: gzip(&profile.encode_to_vec())?,
                })
            }
            CpuFormat::Flamegraph => {
                let mut svg = Vec::new();
                if report.data.is_empty() {
                    svg.extend_from_slice(EMPTY_FLAMEGRAPH.as_bytes());
                } else {
                    let mut options = pprof::flamegraph::Options::default();
                    options.title = format!(
                        "CPU profile, {:.0} s at {CPU_FREQUENCY} Hz",
                        duration.as_secs_f64()
                    );
                    report
                        .flamegraph_with_options(&mut svg, &mut options)
                        .map_err(|err| {
                            ProfileError::Failed(format!("cannot draw the flamegraph: {err}"))
                        })?;
                }
                Ok(Profile {
                    content_type: super::SVG_CONTENT_TYPE,
                    body: svg,
                })
            }
        }
    }

    /// `bytes` gzipped, as pprof tools expect profiles.
    fn gzip(bytes: &[u8]) -> Result<Vec<u8>, ProfileError> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder
            .write_all(bytes)
            .and_then(|()| encoder.finish())
            .map_err(|err| ProfileError::Failed(format!("cannot compress the profile: {err}")))
    }
}

#[cfg(not(unix))]
mod cpu {
    use std::time::Duration;

    use super::{CpuFormat, CpuSlot, Profile, ProfileError};

    pub(super) async fn take(
        _slot: CpuSlot,
        _duration: Duration,
        _format: CpuFormat,
    ) -> Result<Profile, ProfileError> {
        Err(ProfileError::Unsupported(
            "cpu profiles are only supported on unix",
        ))
    }
}

/// What heap profiling does after [`set_heap_profiling`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeapProfiling {
    /// Allocations are sampled; [`heap`] answers.
    Active {
        /// The average number of bytes allocated between two samples.
        sample_bytes: u64,
    },
    /// Sampling is off; [`heap`] answers [`ProfileError::HeapInactive`].
    Inactive,
    /// This process cannot profile its heap, for the reason given.
    Unavailable(&'static str),
}

/// The allocator heap profiles need: a binary that serves them makes it its
/// `#[global_allocator]` and exports jemalloc's `malloc_conf` with `prof:true`.
///
/// It is built with profiling support and unprefixed, so it also serves the C code's
/// `malloc` (the bundled SQLite) and that memory shows up in heap profiles too.
#[cfg(target_os = "linux")]
pub use tikv_jemallocator::Jemalloc;

/// Switches jemalloc's allocation sampling on or off, logs the outcome and returns it.
///
/// Turning it off also forgets the samples taken so far.
pub async fn set_heap_profiling(enabled: bool) -> HeapProfiling {
    let state = heap::set_active(enabled).await;
    match state {
        HeapProfiling::Active { sample_bytes } => {
            tracing::info!(sample_bytes, "heap profiling on");
        }
        HeapProfiling::Inactive => tracing::info!("heap profiling off"),
        HeapProfiling::Unavailable(why) if enabled => {
            tracing::warn!(reason = why, "heap profiling unavailable");
        }
        HeapProfiling::Unavailable(_) => {}
    }
    state
}

/// The memory allocated now, by allocation stack, as jemalloc sampled it: a gzipped pprof
/// protobuf with sample type `inuse_space` in bytes.
///
/// The dump is written to a temporary file and parsed on the blocking pool.
pub async fn heap() -> Result<Profile, ProfileError> {
    let body = heap::dump().await?;
    tracing::info!(bytes = body.len(), "heap profile taken");
    Ok(Profile {
        content_type: PPROF_CONTENT_TYPE,
        body,
    })
}

#[cfg(target_os = "linux")]
mod heap {
    use std::sync::Arc;

    use super::{HeapProfiling, ProfileError};

    /// Why [`jemalloc_pprof::PROF_CTL`] is missing.
    const NOT_PROFILING: &str = "the allocator was not started with jemalloc profiling (jemalloc as the global allocator and prof:true in its malloc_conf)";

    pub(super) async fn set_active(enabled: bool) -> HeapProfiling {
        let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
            return HeapProfiling::Unavailable(NOT_PROFILING);
        };
        let mut ctl = ctl.lock().await;
        let outcome = match (enabled, ctl.activated()) {
            (true, false) => ctl.activate(),
            (false, true) => ctl.deactivate(),
            _ => Ok(()),
        };
        match outcome {
            Err(_) => HeapProfiling::Unavailable("jemalloc refused to switch heap sampling"),
            Ok(()) if ctl.activated() => HeapProfiling::Active {
                sample_bytes: u32::try_from(ctl.lg_sample())
                    .ok()
                    .and_then(|lg| 1u64.checked_shl(lg))
                    .unwrap_or(u64::MAX),
            },
            Ok(()) => HeapProfiling::Inactive,
        }
    }

    pub(super) async fn dump() -> Result<Vec<u8>, ProfileError> {
        let ctl = jemalloc_pprof::PROF_CTL
            .as_ref()
            .ok_or(ProfileError::Unsupported(NOT_PROFILING))?;
        let mut ctl = Arc::clone(ctl).lock_owned().await;
        if !ctl.activated() {
            return Err(ProfileError::HeapInactive);
        }
        tokio::task::spawn_blocking(move || ctl.dump_pprof())
            .await
            .map_err(|err| ProfileError::Failed(format!("the heap dump failed: {err}")))?
            .map_err(|err| ProfileError::Failed(format!("the heap dump failed: {err:#}")))
    }
}

#[cfg(not(target_os = "linux"))]
mod heap {
    use super::{HeapProfiling, ProfileError};

    const NOT_LINUX: &str = "heap profiles are only supported on linux";

    pub(super) async fn set_active(_enabled: bool) -> HeapProfiling {
        HeapProfiling::Unavailable(NOT_LINUX)
    }

    pub(super) async fn dump() -> Result<Vec<u8>, ProfileError> {
        Err(ProfileError::Unsupported(NOT_LINUX))
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::io::Read as _;

    use pprof::protos::Message as _;

    use super::*;

    /// One CPU profile runs per process: the tests that take one take turns.
    static CPU_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        assert_eq!(bytes.get(..2), Some(&[0x1f, 0x8b][..]), "gzip magic");
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .expect("a complete gzip stream");
        raw
    }

    /// Waits until a spawned profile holds the profiler.
    async fn until_a_cpu_profile_runs() {
        while !CPU_PROFILE_RUNNING.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cpu_profile_is_a_gzipped_pprof_protobuf_of_cpu_time() {
        let _turn = CPU_TESTS.lock().await;
        let profile = cpu(Duration::from_secs(30), CpuFormat::Pprof)
            .await
            .expect("a profile");
        assert_eq!(profile.content_type, "application/octet-stream");
        let decoded = pprof::protos::Profile::decode(gunzip(&profile.body).as_slice())
            .expect("a pprof Profile message");
        let name = |index: i64| {
            usize::try_from(index)
                .ok()
                .and_then(|i| decoded.string_table.get(i))
                .map(String::as_str)
        };
        assert_eq!(name(0), Some(""), "the string table starts empty");
        let period_type = decoded.period_type.as_ref().expect("a period type");
        assert_eq!(name(period_type.ty), Some("cpu"));
        assert_eq!(name(period_type.unit), Some("nanoseconds"));
        assert_eq!(decoded.period, 1_000_000_000 / i64::from(CPU_FREQUENCY));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flamegraph_is_an_svg_document_even_without_samples() {
        let _turn = CPU_TESTS.lock().await;
        let profile = cpu(Duration::from_secs(1), CpuFormat::Flamegraph)
            .await
            .expect("a flamegraph");
        assert_eq!(profile.content_type, "image/svg+xml");
        let svg = String::from_utf8(profile.body).expect("utf-8");
        assert!(svg.starts_with("<?xml"), "{svg}");
        assert!(svg.contains("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_cpu_profile_is_refused_while_one_runs() {
        let _turn = CPU_TESTS.lock().await;
        let first = tokio::spawn(cpu(Duration::from_secs(30), CpuFormat::Pprof));
        until_a_cpu_profile_runs().await;
        assert_eq!(
            cpu(Duration::from_secs(1), CpuFormat::Flamegraph).await,
            Err(ProfileError::CpuInProgress)
        );
        first.await.expect("no panic").expect("the first profile");
        cpu(Duration::from_secs(1), CpuFormat::Pprof)
            .await
            .expect("the profiler is free again");
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_cpu_profile_frees_the_profiler() {
        let _turn = CPU_TESTS.lock().await;
        let abandoned = tokio::spawn(cpu(Duration::from_secs(300), CpuFormat::Pprof));
        until_a_cpu_profile_runs().await;
        abandoned.abort();
        assert!(abandoned.await.unwrap_err().is_cancelled());
        cpu(Duration::from_secs(1), CpuFormat::Pprof)
            .await
            .expect("the profiler is free again");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn heap_profiles_need_jemalloc_started_with_profiling() {
        // This test binary runs on the system allocator without `prof:true`.
        assert!(matches!(
            heap().await,
            Err(ProfileError::Unsupported(why)) if why.contains("prof:true")
        ));
        assert!(matches!(
            set_heap_profiling(true).await,
            HeapProfiling::Unavailable(_)
        ));
    }
}
