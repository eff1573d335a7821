use clap::Parser;

// musl's malloc is slow for a server; glibc's stays (see Cargo.toml).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, as glibc's are set in `memory::tune_allocator`: freed memory goes
/// back to the system within about a second, by jemalloc's own background thread, even
/// when no thread allocates (10,000 closed streams: 13 MiB resident again, not 55–59;
/// BENCHMARKS.md). `_RJEM_MALLOC_CONF` in the environment overrides it: the operator's
/// choice wins.
#[cfg(target_env = "musl")]
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    bus::cli::main(bus::cli::Cli::parse())
}
