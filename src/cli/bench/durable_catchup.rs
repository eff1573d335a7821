//! `bus bench durable-catchup`: a new durable consumer reading a whole log from the oldest
//! event while acking everything, against a replay of the same log; with the disk reads
//! each made, so that a consumer's reads can be compared with a replay's.

use std::time::Instant;

use anyhow::bail;
use clap::Args;
use serde_json::json;

use super::load::{fill, replay_all, subscribe_manual, EventStream, Poster};
use super::measure::report;
use super::target::Target;

#[derive(Debug, Args)]
pub struct DurableCatchupBench {
    #[command(flatten)]
    pub target: Target,
    /// Events in the namespace. For the reads to go to the segment files, their frames
    /// must take more than the server's in-memory tail (`--tail-size`, 16 MiB by
    /// default): 1,000,000 events of 128-byte payloads take ~250 MB.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// The durable consumer's window (`max_inflight`).
    #[arg(long = "window", value_name = "WINDOW", default_value_t = 100)]
    pub max_inflight: usize,
}

/// A durable consumer catching up a whole log while acking everything, against a replay
/// (`start=oldest`, no acks) of the same log. With --embedded, each runs on a server of
/// its own, filled the same way, so that the disk reads each server reports at shutdown
/// are that reader's.
pub async fn run(args: DurableCatchupBench) -> anyhow::Result<()> {
    let subject = args.target.subject("catchup");
    let mut fields = serde_json::Map::new();
    fields.insert("events".into(), json!(args.events));
    fields.insert("window".into(), json!(args.max_inflight));
    let mut rates = Vec::new();
    for reader in ["replay", "durable_consumer"] {
        let server = args.target.start().await?;
        let host = server.host.trim_end_matches('/').to_owned();
        fill(&host, &subject, args.events, args.payload).await?;
        let started = Instant::now();
        let read = if reader == "replay" {
            replay_all(&host, &subject).await?.0
        } else {
            let (acked, requests) =
                catch_up(&host, &subject, args.max_inflight, args.events).await?;
            fields.insert("ack_requests".into(), json!(requests));
            acked
        };
        let elapsed = started.elapsed();
        if read < args.events {
            bail!("{reader} read {read} of {} events", args.events);
        }
        let rate = read as f64 / elapsed.as_secs_f64();
        rates.push(rate);
        fields.insert(format!("{reader}_seconds"), json!(elapsed.as_secs_f64()));
        fields.insert(format!("{reader}_events_per_sec"), json!(rate));
        if let Some(reads) = server.stop(&args.target.namespace) {
            fields.insert(format!("{reader}_disk_reads"), json!(reads));
        }
    }
    fields.insert("replay_over_consumer".into(), json!(rates[0] / rates[1]));
    report(
        &args.target,
        "durable-catchup",
        serde_json::Value::Object(fields),
    );
    Ok(())
}

/// A new durable consumer reads `subject` from the oldest event and acks every event,
/// until `events` are acked; the events acked and the ack requests. Acks are pipelined:
/// the stream is read on while the previous ack is on its way, and each ack carries every
/// event received since.
async fn catch_up(
    host: &str,
    subject: &str,
    max_inflight: usize,
    events: u64,
) -> anyhow::Result<(u64, u64)> {
    let (consumer_id, response) = subscribe_manual(&format!(
        "{host}/?subject={subject}&start=oldest&ack=manual&consumer=catchup&max_inflight={max_inflight}&redelivery=60s"
    ))
    .await?;
    let (ids_tx, mut ids_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
    let mut acker = Poster::connect(host).await?;
    let acking = tokio::spawn(async move {
        let (mut acked, mut requests) = (0u64, 0u64);
        while let Some(mut ids) = ids_rx.recv().await {
            // Everything received meanwhile goes in the same request (an ack's line is
            // limited, hence at most 500 ids).
            while ids.len() < 500 {
                match ids_rx.try_recv() {
                    Ok(more) => ids.extend(more),
                    Err(_) => break,
                }
            }
            acker.ack(&consumer_id, &ids.join(",")).await?;
            acked += ids.len() as u64;
            requests += 1;
            if acked >= events {
                break;
            }
        }
        anyhow::Ok((acked, requests))
    });
    let mut stream = EventStream::new(response);
    let mut received = 0u64;
    while received < events {
        let Some(ids) = stream.next_ids().await? else {
            bail!("the stream ended after {received} events");
        };
        received += ids.len() as u64;
        if !ids.is_empty() && ids_tx.send(ids).is_err() {
            break;
        }
    }
    drop(ids_tx);
    acking.await?
}
