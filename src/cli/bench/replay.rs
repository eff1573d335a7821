//! `bus bench replay`: one subscriber reading a namespace from the oldest event to the
//! newest (`until=now`), after the run has stored them: events/s and MB/s.

use std::time::Instant;

use anyhow::bail;
use clap::Args;
use serde_json::json;

use super::load::{fill, replay_all};
use super::measure::report;
use super::target::Target;

#[derive(Debug, Args)]
pub struct ReplayBench {
    #[command(flatten)]
    pub target: Target,
    /// Events to store and then read back from the oldest.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
}

pub async fn run(args: ReplayBench) -> anyhow::Result<()> {
    let server = args.target.start().await?;
    let subject = args.target.subject("replay");
    fill(&server.host, &subject, args.events, args.payload).await?;
    let started = Instant::now();
    let (events, bytes) = replay_all(server.host.trim_end_matches('/'), &subject).await?;
    let elapsed = started.elapsed();
    if events < args.events {
        bail!("replay returned {events} of {} events", args.events);
    }
    report(
        &args.target,
        "replay",
        json!({
            "events": events,
            "seconds": elapsed.as_secs_f64(),
            "events_per_sec": events as f64 / elapsed.as_secs_f64(),
            "mb_per_sec": bytes as f64 / elapsed.as_secs_f64() / 1e6,
        }),
    );
    Ok(())
}
