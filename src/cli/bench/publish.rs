//! `bus bench publish`: events/s and publish latency over keep-alive connections, each
//! publishing (one event or a batch per request) as fast as its answers come.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use serde_json::json;

use super::load::{event_body, Poster};
use super::measure::{ms, percentile, report};
use super::target::Target;

#[derive(Debug, Args)]
pub struct PublishBench {
    #[command(flatten)]
    pub target: Target,
    /// Keep-alive connections, each publishing as fast as its answers come.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Events in all.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Events per request (1: one event object; more: a JSON array).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// Give every event a deduplication key of its own (what deduplication costs).
    #[arg(long)]
    pub keyed: bool,
}

/// An event of about `size` bytes of payload with deduplication key `key`.
fn keyed_event_body(subject: &str, size: usize, key: &str) -> String {
    let event = event_body(subject, size, 0);
    format!(r#"{{"key":"{key}",{}"#, &event[1..])
}

pub async fn run(args: PublishBench) -> anyhow::Result<()> {
    if args.connections == 0 || args.batch == 0 {
        bail!("--connections and --batch must be at least 1");
    }
    let server = args.target.start().await?;
    let subject = args.target.subject("publish");
    let requests = args.events.div_ceil(args.batch as u64);
    let per_connection = requests.div_ceil(args.connections as u64);
    let body = if args.batch == 1 {
        event_body(&subject, args.payload, 0)
    } else {
        let one = event_body(&subject, args.payload, 0);
        format!("[{}]", vec![one; args.batch].join(","))
    };
    let body = Arc::new(body.into_bytes());
    let (keyed, batch, payload) = (args.keyed, args.batch, args.payload);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for connection in 0..args.connections {
        let body = Arc::clone(&body);
        let host = server.node(connection).to_owned();
        let subject = subject.clone();
        tasks.push(tokio::spawn(async move {
            let mut poster = Poster::connect(&host).await?;
            let mut latencies = Vec::with_capacity(per_connection as usize);
            for request in 0..per_connection {
                // Keyed: a body of its own per request, its keys unique across the run.
                let keyed_body = keyed.then(|| {
                    let events: Vec<String> = (0..batch)
                        .map(|n| {
                            keyed_event_body(
                                &subject,
                                payload,
                                &format!("{connection}-{request}-{n}"),
                            )
                        })
                        .collect();
                    if batch == 1 {
                        events.concat()
                    } else {
                        format!("[{}]", events.join(","))
                    }
                });
                let sent = Instant::now();
                poster
                    .post(
                        keyed_body
                            .as_ref()
                            .map_or(body.as_slice(), String::as_bytes),
                    )
                    .await?;
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
    latencies.sort_unstable();
    let events = latencies.len() as u64 * args.batch as u64;
    report(
        &args.target,
        "publish",
        json!({
            "connections": args.connections,
            "batch": args.batch,
            "payload_bytes": args.payload,
            "keyed": args.keyed,
            "events": events,
            "seconds": elapsed.as_secs_f64(),
            "events_per_sec": events as f64 / elapsed.as_secs_f64(),
            "requests_per_sec": latencies.len() as f64 / elapsed.as_secs_f64(),
            "latency_p50_ms": ms(percentile(&latencies, 0.50)),
            "latency_p99_ms": ms(percentile(&latencies, 0.99)),
            "latency_p999_ms": ms(percentile(&latencies, 0.999)),
        }),
    );
    Ok(())
}
