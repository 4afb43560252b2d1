//! The process's allocator: jemalloc with heap profiling compiled in (Linux only).
//!
//! jemalloc reads `malloc_conf` once, when it starts (before `main`): profiling enabled
//! (`prof:true`, without which it can never be switched on), sampling off
//! (`prof_active:false`) until `telemetry.heap_profiling` switches it on at start, and one
//! sample per 2^19 bytes = 512 KiB allocated on average (`lg_prof_sample:19`, jemalloc's
//! default, written out so the cost is visible). While sampling is off, profiling costs
//! next to nothing.
//!
//! Freed pages go back to the system within about a second (`dirty_decay_ms:1000`, not
//! jemalloc's 10 s) and skip the intermediate "muzzy" state (`muzzy_decay_ms:0`): without
//! background threads jemalloc purges only while the process allocates, so with its
//! defaults an idle service kept what a burst had freed. `cargo xtask bench ingress`
//! (SQLite): RSS 26.3 MB ten seconds after the load against 20.4 MB before it, and 23.1 MB
//! against 19.9 MB with these settings, at the same throughput (16 571 and 16 552
//! callbacks/s). The price is more `madvise` calls at low load: `bench real`, alternating
//! runs, measured 2.15 % and 2.32 % of a core with jemalloc's defaults (`MALLOC_CONF`
//! overrides this) against 2.82 % and 2.77 % with these, on a noisy machine.

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
static MALLOC_CONF: &[u8; 83] = b"prof:true,prof_active:false,lg_prof_sample:19,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

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
