//! `bus bench resume`: time to the first event when a subscription resumes in the middle
//! of a large namespace (from an id, from Last-Event-ID) or starts at the newest event.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use serde_json::json;

use super::load::{event_body, fill, Poster};
use super::measure::{ms, percentile, report};
use super::target::Target;
use crate::wire::HEADER_EVENT_ID;

#[derive(Debug, Args)]
pub struct ResumeBench {
    #[command(flatten)]
    pub target: Target,
    /// Events in the namespace before resuming.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
    /// Measurements of each kind (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
}

pub async fn run(args: ResumeBench) -> anyhow::Result<()> {
    let server = args.target.start().await?;
    let subject = args.target.subject("resume");
    let base = server.host.trim_end_matches('/').to_owned();
    let http = reqwest::Client::new();
    // Resume from an event in the middle of the log: its id comes from its publish.
    let half = args.events / 2;
    fill(&server.host, &subject, half, 64).await?;
    let head = Poster::connect(&server.host)
        .await?
        .post(event_body(&subject, 64, 0).as_bytes())
        .await?;
    let middle_id = head
        .lines()
        .find_map(|l| l.strip_prefix(HEADER_EVENT_ID)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .context("the publish answer has no event id")?;
    fill(&server.host, &subject, args.events - half, 64).await?;
    let mut by_kind = Vec::new();
    for kind in ["start=<id>", "Last-Event-ID", "start=newest"] {
        let mut times = Vec::with_capacity(args.rounds);
        for _ in 0..args.rounds {
            let started = Instant::now();
            let request = match kind {
                "start=<id>" => http.get(format!("{base}/?subject={subject}&start={middle_id}")),
                "Last-Event-ID" => http
                    .get(format!("{base}/?subject={subject}&start=oldest"))
                    .header("Last-Event-ID", &middle_id),
                _ => http.get(format!("{base}/?subject={subject}&start=newest")),
            };
            let response = request.send().await?;
            if kind == "start=newest" {
                // Nothing to deliver yet: the subscription is live once it answers, and
                // the next event published reaches it.
                let mut body = response.bytes_stream();
                let mut poster = Poster::connect(&server.host).await?;
                poster.post(event_body(&subject, 64, 0).as_bytes()).await?;
                let _ = body.next().await;
            } else {
                let mut body = response.bytes_stream();
                let _ = body.next().await.context("no event came")??;
            }
            times.push(started.elapsed());
        }
        times.sort_unstable();
        by_kind.push((kind, percentile(&times, 0.5), percentile(&times, 1.0)));
    }
    let mut fields = serde_json::Map::new();
    fields.insert("events_in_namespace".into(), json!(args.events + 1));
    fields.insert("resumed_after_position".into(), json!(half));
    for (kind, median, max) in by_kind {
        fields.insert(format!("{kind} first event median ms"), json!(ms(median)));
        fields.insert(format!("{kind} first event max ms"), json!(ms(max)));
    }
    report(&args.target, "resume", serde_json::Value::Object(fields));
    Ok(())
}
