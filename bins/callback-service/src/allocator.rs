//! The process's allocator: jemalloc with heap profiling compiled in (Linux only).
//!
//! jemalloc reads `malloc_conf` once, when it starts (before `main`): profiling enabled
//! (`prof:true`, without which it can never be switched on), sampling off
//! (`prof_active:false`) until `telemetry.heap_profiling` switches it on at start, and one
//! sample per 2^19 bytes = 512 KiB allocated on average (`lg_prof_sample:19`, jemalloc's
//! default, written out so the cost is visible). While sampling is off, profiling costs
//! next to nothing.
//!
//! Freed pages go back to the system in the background: one jemalloc thread
//! (`background_thread:true`) purges what has been free for about 5 s
//! (`dirty_decay_ms:5000`, jemalloc's default being 10 s). Without it jemalloc purges only
//! while the process allocates, so an idle service kept what a burst had freed.
//! `cargo xtask bench ingress` (SQLite): RSS 26.3 MB ten seconds after the load against
//! 20.4 MB before it with jemalloc's defaults; 22.6 MB against 19.8 MB 4.8 s after it with
//! these, at the same throughput (16 571 and 15 430 callbacks/s). Purging inline instead
//! (`dirty_decay_ms:1000`, no thread) also brought RSS back but cost `bench real` about
//! 0.4 % of a core in `madvise` calls (2.05 % and 2.17 % against 1.67 %); with the thread,
//! `bench real` measured 1.63 % and 1.70 %.

/// jemalloc serves every allocation, Rust's and C's (it is built unprefixed).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: telemetry::profiling::Jemalloc = telemetry::profiling::Jemalloc;

/// jemalloc's options, as the NUL-terminated C string its `malloc_conf` symbol points to
/// (`&[u8; N]` is a thin pointer, the layout of `const char *`).
#[cfg(target_os = "linux")]
#[expect(
    unsafe_code,
    reason = "jemalloc reads its options from the C symbol `malloc_conf`, and exporting a symbol is unsafe: nothing else may define it (jemalloc's own definition is weak)"
)]
#[unsafe(export_name = "malloc_conf")]
static MALLOC_CONF: &[u8; 89] =
    b"prof:true,prof_active:false,lg_prof_sample:19,background_thread:true,dirty_decay_ms:5000\0";

#[cfg(test)]
mod tests {
    use figment::Figment;
    use figment::providers::{Format, Toml};
    use serde_json::Value;

    fn lints(manifest: &str, key: &str) -> Value {
        let text = std::fs::read_to_string(manifest).expect("manifest");
        Figment::from(Toml::string(&text))
            .extract_inner(key)
            .unwrap_or_else(|err| panic!("{manifest}: {key}: {err}"))
    }

    #[test]
    fn the_lints_are_the_workspace_lints_but_unsafe_code_is_deny() {
        let mut expected = lints(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml"),
            "workspace.lints",
        );
        assert_eq!(expected["rust"]["unsafe_code"], "forbid");
        expected["rust"]["unsafe_code"] = Value::from("deny");
        assert_eq!(
            lints(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"), "lints"),
            expected,
            "bins/callback-service/Cargo.toml [lints] drifted from [workspace.lints]"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn malloc_conf_is_one_c_string() {
        let conf = super::MALLOC_CONF;
        assert_eq!(conf.iter().position(|&b| b == 0), Some(conf.len() - 1));
    }
}
