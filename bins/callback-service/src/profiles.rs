//! The admin listener's profiles (`/debug/pprof/*`), taken by `telemetry::profiling`.

use std::time::Duration;

use domain::BoxFuture;
use http_transport::{CpuProfileFormat, Profile, ProfileError, Profiler};
use telemetry::profiling;

/// What `GET /debug/pprof/heap` says while heap profiling is off.
const HEAP_PROFILING_OFF: &str = "heap profiling is off: set telemetry.heap_profiling = true (env CALLBACK_TELEMETRY__HEAP_PROFILING=true) and restart";

/// [`Profiler`] over `telemetry::profiling`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TelemetryProfiler;

impl Profiler for TelemetryProfiler {
    fn cpu(
        &self,
        duration: Duration,
        format: CpuProfileFormat,
    ) -> BoxFuture<'static, Result<Profile, ProfileError>> {
        let format = match format {
            CpuProfileFormat::Pprof => profiling::CpuFormat::Pprof,
            CpuProfileFormat::Flamegraph => profiling::CpuFormat::Flamegraph,
        };
        Box::pin(async move {
            profiling::cpu(duration, format)
                .await
                .map(profile)
                .map_err(error)
        })
    }

    fn heap(&self) -> BoxFuture<'static, Result<Profile, ProfileError>> {
        Box::pin(async { profiling::heap().await.map(profile).map_err(error) })
    }
}

fn profile(profile: profiling::Profile) -> Profile {
    Profile {
        content_type: profile.content_type,
        body: profile.body,
    }
}

fn error(err: profiling::ProfileError) -> ProfileError {
    match err {
        profiling::ProfileError::CpuInProgress => ProfileError::InProgress,
        profiling::ProfileError::HeapInactive => {
            ProfileError::HeapProfilingDisabled(HEAP_PROFILING_OFF.to_owned())
        }
        profiling::ProfileError::Unsupported(why) => ProfileError::NotSupported(why.to_owned()),
        profiling::ProfileError::Failed(cause) => ProfileError::Failed(cause),
    }
}
