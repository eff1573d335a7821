//! `bus bench fanout`: subscribers on one subject while publishers send to it (as fast as
//! they can, or at a rate): deliveries/s and end-to-end latency, each subscriber checking
//! that it got every event once and in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use serde_json::json;

use super::load::{event_body, EventStream, Poster};
use super::measure::{ms, now_nanos, percentile, report};
use super::target::Target;

#[derive(Debug, Args)]
pub struct FanoutBench {
    #[command(flatten)]
    pub target: Target,
    /// Subscribers on the subject.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Publishing connections.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Events in all.
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    /// Events per second from all publishers together (0: as fast as they can).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Events per publish request (a batch when more than 1).
    #[arg(long, default_value_t = 1)]
    pub batch: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
}

pub async fn run(args: FanoutBench) -> anyhow::Result<()> {
    crate::cli::server::raise_open_file_limit();
    let server = args.target.start().await?;
    let subject = args.target.subject("fanout");
    let http = reqwest::Client::new();
    let mut subscribers = Vec::new();
    for s in 0..args.subscribers {
        let url = format!(
            "{}/?subject={subject}",
            server.node(s).trim_end_matches('/')
        );
        let response = http.get(&url).send().await?;
        if response.status() != 200 {
            bail!("subscribe answered {}", response.status());
        }
        let mut stream = EventStream::new(response);
        let events = args.events;
        subscribers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(events as usize);
            let (mut received, mut duplicates, mut out_of_order) = (0u64, 0u64, 0u64);
            let mut last_index = -1i64;
            while received < events {
                let messages =
                    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                        Ok(Ok(Some(messages))) => messages,
                        Ok(Err(e)) => return Err(e),
                        Ok(Ok(None)) | Err(_) => break,
                    };
                // One clock reading for the chunk: the events in it arrived together.
                let now = now_nanos();
                for message in messages.filter(|m| m.event == "msg") {
                    let delivery: Delivery = serde_json::from_str(&message.data)
                        .context("an event that is not an event's JSON")?;
                    if delivery.index == last_index {
                        duplicates += 1;
                        continue;
                    }
                    if delivery.index < last_index {
                        out_of_order += 1;
                    }
                    last_index = delivery.index;
                    received += 1;
                    let sent = delivery.payload.sent.unwrap_or(now);
                    latencies.push(Duration::from_nanos(now.saturating_sub(sent)));
                }
            }
            anyhow::Ok((received, duplicates, out_of_order, latencies))
        }));
    }
    let published = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let batch = args.batch.max(1);
    let per_publisher = args.events.div_ceil(args.publishers as u64 * batch);
    let interval = (args.rate > 0)
        .then(|| Duration::from_secs_f64(args.publishers as f64 * batch as f64 / args.rate as f64));
    let mut publishers = Vec::new();
    for p in 0..args.publishers as u64 {
        let host = server.node(p as usize).to_owned();
        let subject = subject.clone();
        let published = Arc::clone(&published);
        let total = args.events;
        let payload = args.payload;
        publishers.push(tokio::spawn(async move {
            let mut poster = Poster::connect(&host).await?;
            let mut next = Instant::now();
            for i in 0..per_publisher {
                let first = (p * per_publisher + i) * batch;
                if first >= total {
                    break;
                }
                let n = batch.min(total - first) as usize;
                if let Some(every) = interval {
                    next += every;
                    tokio::time::sleep_until(next.into()).await;
                }
                let one = event_body(&subject, payload, now_nanos());
                let body = if n == 1 {
                    one
                } else {
                    format!("[{}]", vec![one; n].join(","))
                };
                poster.post(body.as_bytes()).await?;
                published.fetch_add(n as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for publisher in publishers {
        publisher.await??;
    }
    let published = published.load(Ordering::Relaxed);
    let (mut delivered, mut duplicates, mut out_of_order, mut missing) = (0u64, 0, 0, 0);
    let mut latencies = Vec::new();
    for subscriber in subscribers {
        let (received, dup, ooo, lat) = subscriber.await??;
        delivered += received;
        duplicates += dup;
        out_of_order += ooo;
        missing += published.saturating_sub(received);
        latencies.extend(lat);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    report(
        &args.target,
        "fanout",
        json!({
            "subscribers": args.subscribers,
            "publishers": args.publishers,
            "batch": batch,
            "rate": args.rate,
            "published": published,
            "deliveries": delivered,
            "seconds": elapsed.as_secs_f64(),
            "deliveries_per_sec": delivered as f64 / elapsed.as_secs_f64(),
            "latency_p50_ms": ms(percentile(&latencies, 0.50)),
            "latency_p99_ms": ms(percentile(&latencies, 0.99)),
            "latency_p999_ms": ms(percentile(&latencies, 0.999)),
            "missing": missing,
            "duplicates": duplicates,
            "out_of_order": out_of_order,
        }),
    );
    if missing + duplicates + out_of_order > 0 {
        bail!("deliveries were wrong: {missing} missing, {duplicates} duplicates, {out_of_order} out of order");
    }
    Ok(())
}

/// What a subscriber reads of each event; serde skips the rest without building it.
#[derive(Deserialize)]
struct Delivery {
    #[serde(default)]
    index: i64,
    #[serde(default)]
    payload: Sent,
}

/// The payload of the events the publishers send ([`event_body`]).
#[derive(Default, Deserialize)]
struct Sent {
    /// When it was published, in nanoseconds ([`now_nanos`]).
    sent: Option<u64>,
}
