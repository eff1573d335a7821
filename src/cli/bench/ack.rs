//! `bus bench ack`: a manual-ack consumer working through a stored backlog, acking what
//! it has received in one request each time; stop-and-wait (`max_inflight=1`, the
//! reference's only mode) or with more events out at once.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::load::{fill, subscribe_manual, EventStream, Poster};
use super::measure::report;
use super::target::Target;

#[derive(Debug, Args)]
pub struct AckBench {
    #[command(flatten)]
    pub target: Target,
    /// Events to store and then consume with manual acks.
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    /// Unacknowledged events the server may have out at once (`max_inflight`); 1 is the
    /// reference's stop-and-wait. The consumer acks what it has received in one request.
    #[arg(long = "window", value_name = "WINDOW", default_value_t = 1)]
    pub max_inflight: usize,
}

pub async fn run(args: AckBench) -> anyhow::Result<()> {
    let server = args.target.start().await?;
    let subject = args.target.subject("ack");
    fill(&server.host, &subject, args.events, 64).await?;
    let url = format!(
        "{}/?subject={subject}&start=oldest&ack=manual&redelivery=30s&max_inflight={}",
        server.host.trim_end_matches('/'),
        args.max_inflight
    );
    let (consumer_id, response) = subscribe_manual(&url).await?;
    let mut stream = EventStream::new(response);
    let mut acker = Poster::connect(&server.host).await?;
    let started = Instant::now();
    let mut acked = 0u64;
    while acked < args.events {
        // Everything received so far is acked in one request (with a max_inflight of 1,
        // that is one event: stop-and-wait).
        let ids = stream.next_ids().await?.context("the stream ended")?;
        if !ids.is_empty() {
            acker.ack(&consumer_id, &ids.join(",")).await?;
            acked += ids.len() as u64;
        }
    }
    let elapsed = started.elapsed();
    report(
        &args.target,
        "ack",
        json!({
            "events": acked,
            "window": args.max_inflight,
            "seconds": elapsed.as_secs_f64(),
            "acked_events_per_sec": acked as f64 / elapsed.as_secs_f64(),
        }),
    );
    Ok(())
}
