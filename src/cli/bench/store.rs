//! `bus bench store` drives the storage engine directly (no HTTP): concurrent tasks append
//! events to a fresh log under the chosen fsync policy, then the log is reopened and read
//! back in order, which is what a subscriber starting from the oldest event does. Every
//! event read is checked (position and order), so the figures are for correct work.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use super::measure::percentile;
use crate::event::{EventDraft, PendingEvent};
use crate::store::cipher::DEFAULT_BLOCK_SIZE;
use crate::store::{
    Cipher, FsyncPolicy, Log, StoreConfig, DEFAULT_SEGMENT_SIZE, DEFAULT_TAIL_BYTES,
};
use crate::units::parse_size;

#[derive(Debug, Args)]
pub struct StoreBench {
    /// Events to append in all.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Approximate size of each stored event (its JSON), in bytes.
    #[arg(long, default_value_t = 200)]
    pub event_size: usize,
    /// Concurrent appending tasks.
    #[arg(long, default_value_t = 32)]
    pub tasks: u64,
    /// Events per append call (one atomic batch).
    #[arg(long, default_value_t = 1)]
    pub batch: u64,
    /// fsync policy of the log: always, interval=<duration> or never.
    #[arg(long, default_value = "always")]
    pub fsync: FsyncPolicy,
    /// Segment size.
    #[arg(long, default_value_t = DEFAULT_SEGMENT_SIZE, value_parser = parse_size)]
    pub segment_size: u64,
    /// Directory to create the log in (default: a new directory under the system's
    /// temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Encrypt the log with this secret (measures encryption at rest).
    #[arg(long)]
    pub secret_key: Option<String>,
    /// Plaintext bytes sealed together when encrypting.
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
}

pub async fn run(bench: StoreBench) -> anyhow::Result<()> {
    if bench.tasks == 0 || bench.batch == 0 || bench.events == 0 {
        bail!("--events, --tasks and --batch must be at least 1");
    }
    let (dir, remove_after) = match &bench.dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("bus-bench-{}", std::process::id())),
            true,
        ),
    };
    if dir.join("bench").exists() {
        bail!("{} already holds a log; pass an empty --dir", dir.display());
    }
    let config = StoreConfig {
        path: dir.clone(),
        segment_size: bench.segment_size,
        fsync: bench.fsync,
        tail_bytes: DEFAULT_TAIL_BYTES,
        cipher: match &bench.secret_key {
            Some(secret) => {
                Some(Cipher::new(secret, bench.block_size).map_err(anyhow::Error::msg)?)
            }
            None => None,
        },
    };
    let result = run_store_bench(&bench, &config).await;
    if remove_after {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_store_bench(bench: &StoreBench, config: &StoreConfig) -> anyhow::Result<()> {
    let log_dir = config.path.join("bench");
    let log = Arc::new(Log::open(&log_dir, "bench", config).context("opening the bench log")?);

    // The stored JSON around the payload takes about 110 bytes.
    let fill = "x".repeat(bench.event_size.saturating_sub(120));
    let calls_per_task = bench.events.div_ceil(bench.tasks * bench.batch);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..bench.tasks {
        let log = Arc::clone(&log);
        let payload = format!(r#"{{"task":{task},"fill":"{fill}"}}"#);
        let event = PendingEvent::new(&EventDraft {
            subject: "bench.store",
            payload: Some(payload.as_bytes()),
            ..EventDraft::default()
        })?;
        let batch = bench.batch as usize;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(calls_per_task as usize);
            for _ in 0..calls_per_task {
                let sent = Instant::now();
                log.append(vec![event.clone(); batch]).await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let append_time = started.elapsed();
    let stats = log.stats();
    let appended = stats.events;
    let bytes = std::fs::read_dir(&log_dir)?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum::<u64>();
    let segments = log.segment_count();
    drop(log);

    // Reopen so that reads come from the files, not from the writer's in-memory tail.
    let log = Log::open(&log_dir, "bench", config).context("reopening the bench log")?;
    let started = Instant::now();
    let mut next = 0u64;
    while next < appended {
        let events = log.read(next, 4096).await?;
        if events.is_empty() {
            bail!("read stopped at position {next} of {appended}");
        }
        for event in &events {
            if event.position() != next {
                bail!(
                    "read position {} where {next} was expected",
                    event.position()
                );
            }
            next += 1;
        }
    }
    let read_time = started.elapsed();
    drop(log);

    latencies.sort_unstable();
    let per_sec = |n: u64, t: Duration| n as f64 / t.as_secs_f64();
    let mib_per_sec = |t: Duration| bytes as f64 / t.as_secs_f64() / f64::from(1 << 20);
    println!("bus bench store");
    println!(
        "  {appended} events of ~{} bytes, {} tasks x {} events per append, fsync {}, {segments} segments of {} bytes, {}",
        bench.event_size,
        bench.tasks,
        bench.batch,
        config.fsync,
        config.segment_size,
        match &config.cipher {
            Some(cipher) => format!("encrypted in blocks of {} bytes", cipher.block_size()),
            None => "not encrypted".to_owned(),
        }
    );
    println!(
        "  append  {:>12.0} events/s  {:>8.1} MiB/s  {:>8.3} s   append latency p50 {:?}  p99 {:?}  max {:?}",
        per_sec(appended, append_time),
        mib_per_sec(append_time),
        append_time.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
    );
    println!(
        "  group commit: {} writes, {} fdatasyncs, {:.1} events per write",
        stats.groups,
        stats.syncs,
        appended as f64 / stats.groups.max(1) as f64
    );
    println!(
        "  read    {:>12.0} events/s  {:>8.1} MiB/s  {:>8.3} s   (sequential, from the files, OS page cache warm)",
        per_sec(appended, read_time),
        mib_per_sec(read_time),
        read_time.as_secs_f64(),
    );
    Ok(())
}
