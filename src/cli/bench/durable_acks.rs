//! `bus bench durable-acks`: single-event publish latency while durable consumers work
//! through a backlog and ack, so that every consumer's stored progress keeps changing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::load::{event_body, fill, EventStream, Poster};
use super::measure::{ms, percentile, report};
use super::target::Target;
use crate::wire::HEADER_CONSUMER_ID;

#[derive(Debug, Args)]
pub struct DurableAcksBench {
    #[command(flatten)]
    pub target: Target,
    /// Durable consumers acking while the publishers run (0: the publishers alone).
    #[arg(long, default_value_t = 200)]
    pub consumers: usize,
    /// Events stored before the run for the consumers to work through (each consumer
    /// reads all of them; enough that none runs dry while the publishers run).
    #[arg(long, default_value_t = 20_000)]
    pub backlog: u64,
    /// Each consumer's window (`max_inflight`).
    #[arg(long = "window", value_name = "WINDOW", default_value_t = 100)]
    pub max_inflight: usize,
    /// Pause between a consumer's acks, in milliseconds (0: each acks what it has
    /// received as soon as its previous ack is answered).
    #[arg(long, default_value_t = 0)]
    pub ack_interval_ms: u64,
    /// How long the publishers run, in seconds (a time, not a count: with the consumers
    /// taking most of the CPU, a count would take minutes).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Keep-alive connections publishing single events, each as fast as its answers come.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// How long the consumers ack before the publishers start, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub warmup_ms: u64,
}

/// Single-event publish latency while durable consumers ack: every consumer's progress
/// changes all the time, so each one stores it every 50 ms (a write, two fsyncs and a
/// rename) while the publishers run.
pub async fn run(args: DurableAcksBench) -> anyhow::Result<()> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    crate::cli::server::raise_open_file_limit();
    let server = args.target.start().await?;
    let host = server.host.trim_end_matches('/').to_owned();
    let acks_subject = args.target.subject("acks");
    if args.consumers > 0 {
        fill(&host, &acks_subject, args.backlog, 64).await?;
    }
    let http = reqwest::Client::new();
    let acked = Arc::new(AtomicU64::new(0));
    let dry = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::with_capacity(args.consumers);
    for i in 0..args.consumers {
        let url = format!(
            "{host}/?subject={acks_subject}&start=oldest&ack=manual&consumer=acker-{i}&max_inflight={}&redelivery=60s",
            args.max_inflight
        );
        let response = http.get(&url).send().await?;
        if response.status() != 200 {
            bail!("subscribe answered {}", response.status());
        }
        let consumer_id = response
            .headers()
            .get(HEADER_CONSUMER_ID)
            .and_then(|v| v.to_str().ok())
            .context("no consumer id")?
            .to_owned();
        let mut acker = Poster::connect(&host).await?;
        let (acked, dry) = (Arc::clone(&acked), Arc::clone(&dry));
        let (backlog, pause) = (args.backlog, Duration::from_millis(args.ack_interval_ms));
        consumers.push(tokio::spawn(async move {
            let mut stream = EventStream::new(response);
            let mut mine = 0u64;
            while let Some(ids) = stream.next_ids().await? {
                if ids.is_empty() {
                    continue;
                }
                acker.ack(&consumer_id, &ids.join(",")).await?;
                acked.fetch_add(ids.len() as u64, Ordering::Relaxed);
                mine += ids.len() as u64;
                if mine >= backlog {
                    dry.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(args.warmup_ms)).await;

    let subject = args.target.subject("publish");
    let body = Arc::new(event_body(&subject, args.payload, 0).into_bytes());
    let acked_before = acked.load(Ordering::Relaxed);
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let body = Arc::clone(&body);
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let mut poster = Poster::connect(&host).await?;
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let sent = Instant::now();
                poster.post(&body).await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let acks = acked.load(Ordering::Relaxed) - acked_before;
    let dry = dry.load(Ordering::Relaxed);
    for consumer in consumers {
        if consumer.is_finished() {
            // It ran dry (reported below) or failed.
            consumer.await??;
        } else {
            consumer.abort();
        }
    }
    latencies.sort_unstable();
    report(
        &args.target,
        "durable-acks",
        json!({
            "consumers": args.consumers,
            "window": args.max_inflight,
            "ack_interval_ms": args.ack_interval_ms,
            "connections": args.connections,
            "events": latencies.len(),
            "seconds": elapsed.as_secs_f64(),
            "events_per_sec": latencies.len() as f64 / elapsed.as_secs_f64(),
            "latency_p50_ms": ms(percentile(&latencies, 0.50)),
            "latency_p99_ms": ms(percentile(&latencies, 0.99)),
            "latency_p999_ms": ms(percentile(&latencies, 0.999)),
            "acks_while_publishing": acks,
            "acks_per_sec": acks as f64 / elapsed.as_secs_f64(),
            "consumers_run_dry": dry,
        }),
    );
    if dry > 0 {
        bail!("{dry} consumers ran out of events: give a larger --backlog");
    }
    Ok(())
}
