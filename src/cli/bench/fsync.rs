//! `bus bench fsync`: what one durable append costs this disk, without `bus`: a write of
//! one event's size at the end of what was written, then `fdatasync`, over and over, into
//! a file whose space was written ahead (as the log's active segment is). A lone
//! publisher's latency with `--fsync always` is this time plus what the server adds; this
//! benchmark gives the first part.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::measure::{ms, percentile, print_report};

#[derive(Debug, Args)]
pub struct FsyncBench {
    /// Appends (each followed by one fdatasync).
    #[arg(long, default_value_t = 5000)]
    pub syncs: usize,
    /// Bytes written before each sync (one stored event with its index entries is about
    /// 250 bytes).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Directory to write the file in: the disk to measure (default: the system's
    /// temporary directory). The file is removed afterwards.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(bench: FsyncBench) -> anyhow::Result<()> {
    if bench.syncs == 0 || bench.size == 0 {
        bail!("--syncs and --size must be at least 1");
    }
    let dir = bench.dir.clone().unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("bus-bench-fsync-{}", std::process::id()));
    let (syncs, size) = (bench.syncs, bench.size);
    let measured = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || measure(&path, syncs, size)).await?
    };
    let _ = std::fs::remove_file(&path);
    let (mut times, elapsed) = measured?;
    times.sort_unstable();
    print_report(
        bench.json,
        "fsync",
        json!({
            "syncs": syncs,
            "bytes_per_sync": size,
            "syncs_per_sec": syncs as f64 / elapsed.as_secs_f64(),
            "sync_p50_ms": ms(percentile(&times, 0.50)),
            "sync_p99_ms": ms(percentile(&times, 0.99)),
            "sync_p999_ms": ms(percentile(&times, 0.999)),
        }),
    );
    Ok(())
}

/// Appends and syncs `syncs` times; the time of each write + sync, and of them all.
fn measure(path: &PathBuf, syncs: usize, size: usize) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // The space is written (and synced) first, so that each sync flushes data, not the
    // file's growing size.
    let total = syncs.saturating_mul(size);
    let zeros = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < total {
        let n = zeros.len().min(total - written);
        file.write_all(&zeros[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        written += n;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    let record = vec![b'e'; size];
    let mut times = Vec::with_capacity(syncs);
    let started = Instant::now();
    for n in 0..syncs {
        let one = Instant::now();
        file.write_all_at(&record, (n * size) as u64)
            .with_context(|| format!("writing {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("syncing {}", path.display()))?;
        times.push(one.elapsed());
    }
    Ok((times, started.elapsed()))
}
