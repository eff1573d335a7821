//! `bus bench reply`: request/reply round trips through the server, one at a time: a
//! request (`POST /?reply=1`) answered by a worker that replies in its ack.

use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::load::{subscribe_manual, EventStream, Poster};
use super::measure::{ms, percentile, report};
use super::target::Target;

#[derive(Debug, Args)]
pub struct ReplyBench {
    #[command(flatten)]
    pub target: Target,
    /// Request/reply round trips, one after the other.
    #[arg(long, default_value_t = 5_000)]
    pub requests: u64,
}

/// Round trips of `POST /?reply=1` answered by a worker that replies in its ack (`PUT` with
/// the reply as body), one request at a time.
pub async fn run(args: ReplyBench) -> anyhow::Result<()> {
    let server = args.target.start().await?;
    let subject = args.target.subject("reply");
    let host = server.host.trim_end_matches('/').to_owned();
    let (consumer_id, response) = subscribe_manual(&format!(
        "{host}/?subject={subject}&ack=manual&redelivery=30s"
    ))
    .await?;
    let mut replier = Poster::connect(&host).await?;
    let worker = tokio::spawn(async move {
        let mut stream = EventStream::new(response);
        while let Some(ids) = stream.next_ids().await? {
            for id in ids {
                let target = format!("/?consumer_id={consumer_id}&event_id={id}");
                replier
                    .call("PUT", &target, b"{\"ok\":true}", "202")
                    .await?;
            }
        }
        anyhow::Ok(())
    });
    let mut requester = Poster::connect(&host).await?;
    let request = format!(r#"{{"subject":"{subject}","payload":{{"question":1}}}}"#);
    let mut latencies = Vec::with_capacity(args.requests as usize);
    let started = Instant::now();
    for _ in 0..args.requests {
        let sent = Instant::now();
        requester
            .call("POST", "/?reply=1&timeout=5s", request.as_bytes(), "200")
            .await?;
        latencies.push(sent.elapsed());
    }
    let elapsed = started.elapsed();
    worker.abort();
    latencies.sort_unstable();
    report(
        &args.target,
        "reply",
        json!({
            "requests": args.requests,
            "seconds": elapsed.as_secs_f64(),
            "round_trips_per_sec": args.requests as f64 / elapsed.as_secs_f64(),
            "latency_p50_ms": ms(percentile(&latencies, 0.50)),
            "latency_p99_ms": ms(percentile(&latencies, 0.99)),
            "latency_p999_ms": ms(percentile(&latencies, 0.999)),
        }),
    );
    Ok(())
}
