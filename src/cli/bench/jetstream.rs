//! `bus bench jetstream`: JetStream's own publish rate, measured from Rust on this machine
//! without `bus` in between — the ceiling for a node on the JetStream store. Concurrent
//! tasks publish single messages of an event's size to a stream of its own (created for
//! the run with the store's settings, deleted after) over one connection, as a node does,
//! each waiting for JetStream's acknowledgement before its next publish, as an HTTP client
//! waits for its `202`. Every acknowledgement is checked (stream and a sequence never seen
//! twice), so the figure is for stored messages.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use clap::Args;
use serde_json::json;

use super::measure::{ms, percentile, print_report};

#[derive(Debug, Args)]
pub struct JetStreamBench {
    /// The NATS server (with JetStream enabled) to measure.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Messages to publish in all.
    #[arg(long, default_value_t = 50_000)]
    pub events: u64,
    /// Concurrent publishing tasks (each waits for its acknowledgement).
    #[arg(long, default_value_t = 32)]
    pub connections: u64,
    /// Payload bytes of each event; the message is an event's JSON around it.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// Copies of the stream JetStream keeps (1, 3 or 5).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: JetStreamBench) -> anyhow::Result<()> {
    if args.events == 0 || args.connections == 0 {
        bail!("--events and --connections must be at least 1");
    }
    let client = async_nats::connect(args.nats_url.as_str())
        .await
        .with_context(|| format!("connecting to {}", args.nats_url))?;
    let context = jetstream::new(client);
    let name = format!("BUS_BENCH_{}", std::process::id());
    let subject = format!("bus_bench_{}", std::process::id());
    context
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{subject}.>")],
            storage: stream::StorageType::File,
            num_replicas: args.replicas,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {name}"))?;
    let result = measure(&args, &context, &name, &subject).await;
    let deleted = context.delete_stream(&name).await;
    let (elapsed, mut latencies) = result?;
    deleted.with_context(|| format!("deleting stream {name}"))?;
    latencies.sort_unstable();
    let fields = json!({
        "events": args.events,
        "connections": args.connections,
        "seconds": elapsed.as_secs_f64(),
        "events_per_sec": args.events as f64 / elapsed.as_secs_f64(),
        "p50_ms": ms(percentile(&latencies, 0.50)),
        "p99_ms": ms(percentile(&latencies, 0.99)),
    });
    print_report(args.json, "jetstream", fields);
    Ok(())
}

/// Publishes the messages from concurrent tasks: the time it took, and each publish's.
async fn measure(
    args: &JetStreamBench,
    context: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    // The size of a stored event of `bus` with this payload.
    let body = Bytes::from(format!(
        r#"{{"id":"e_00000000000000000000","subject":"{subject}.created","created_at":"2026-12-01T00:00:00.000000000Z","payload":"{}","index":0}}"#,
        "x".repeat(args.payload.saturating_sub(2))
    ));
    let publishing = format!("{subject}.created");
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.connections)
        .map(|task| {
            let count =
                args.events / args.connections + u64::from(task < args.events % args.connections);
            let context = context.clone();
            let body = body.clone();
            let subject = publishing.clone();
            let stream = Arc::<str>::from(stream);
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(count as usize);
                let mut sequences = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let sent = Instant::now();
                    let ack = context
                        .publish(subject.clone(), body.clone())
                        .await
                        .context("publishing")?
                        .await
                        .context("waiting for the acknowledgement")?;
                    latencies.push(sent.elapsed());
                    if *ack.stream != *stream {
                        bail!("acknowledged by stream {} instead of {stream}", ack.stream);
                    }
                    sequences.push(ack.sequence);
                }
                anyhow::Ok((latencies, sequences))
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(args.events as usize);
    let mut sequences = HashSet::with_capacity(args.events as usize);
    for task in tasks {
        let (times, acked) = task.await.context("a publishing task failed")??;
        latencies.extend(times);
        for sequence in acked {
            if !sequences.insert(sequence) {
                bail!("sequence {sequence} was acknowledged twice");
            }
        }
    }
    Ok((started.elapsed(), latencies))
}
