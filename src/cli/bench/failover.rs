//! `bus bench failover`: how long the subscribers of a `bus` node that dies go without
//! events. Two nodes on one JetStream (`--nats-url`) are started for the run; a publisher
//! publishes through node B at a steady rate while a subscriber follows through node A.
//! Node A is killed (SIGKILL), the subscriber reconnects to node B at once with
//! `Last-Event-ID` (as a load balancer and a resuming client do, without a client's retry
//! delay), and node A is started again for the next round. Measured: from the kill to the
//! subscriber's first event from node B. A missed or repeated event fails the run.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::load::{EventStream, Poster};
use super::measure::{ms, percentile, print_report};
use super::target::{Server, Target};

#[derive(Debug, Args)]
pub struct FailoverBench {
    /// The NATS servers (with JetStream) both nodes use, comma-separated.
    #[arg(long, env = "BUS_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Nodes killed, one per round.
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// Publishes per second through node B.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// The namespace to use.
    #[arg(long, default_value = "bench")]
    pub namespace: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: FailoverBench) -> anyhow::Result<()> {
    if args.rounds == 0 || args.rate == 0 {
        bail!("--rounds and --rate must be at least 1");
    }
    let node = Target {
        host: String::new(),
        embedded: true,
        fsync: "always".to_owned(),
        server_args: format!("--store jetstream --nats-url {}", args.nats_url),
        namespace: args.namespace.clone(),
        json: args.json,
    };
    let subject = node.subject("failover");
    let node_b = node.start().await?;
    let publishing = tokio::spawn(publish(
        node_b.host.clone(),
        subject.clone(),
        Duration::from_secs_f64(1.0 / args.rate as f64),
    ));
    let http = reqwest::Client::new();
    let mut failovers = Vec::with_capacity(args.rounds);
    let mut last_seen: Option<(u64, String)> = None;
    for _ in 0..args.rounds {
        let node_a = node.start().await?;
        let mut stream = follow(&http, &node_a.host, &subject, last_seen.as_ref()).await?;
        // Follow through node A for a while, then kill it.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            read(&mut stream, &mut last_seen, Duration::from_secs(5)).await?;
        }
        let killed = Instant::now();
        kill(node_a).await;
        // What node A had sent before it died, then its end.
        while read(&mut stream, &mut last_seen, Duration::from_secs(5)).await? {}
        let mut stream = follow(&http, &node_b.host, &subject, last_seen.as_ref()).await?;
        let before = last_seen.as_ref().map(|(n, _)| *n);
        while last_seen.as_ref().map(|(n, _)| *n) == before {
            if !read(&mut stream, &mut last_seen, Duration::from_secs(10)).await? {
                bail!("node b ended the stream");
            }
        }
        failovers.push(killed.elapsed());
    }
    publishing.abort();
    failovers.sort();
    print_report(
        args.json,
        "failover",
        json!({
            "rounds": args.rounds,
            "publish_rate": args.rate,
            "kill_to_first_event_ms_p50": ms(percentile(&failovers, 0.5)),
            "kill_to_first_event_ms_max": ms(percentile(&failovers, 1.0)),
        }),
    );
    node_b.stop(&args.namespace);
    Ok(())
}

/// Publishes `{"n": 0}`, `{"n": 1}`, … on `subject` through `host`, one every `every`.
async fn publish(host: String, subject: String, every: Duration) -> anyhow::Result<()> {
    let mut poster = Poster::connect(&host).await?;
    let mut next = Instant::now();
    for n in 0u64.. {
        next += every;
        tokio::time::sleep_until(next.into()).await;
        poster
            .post(format!(r#"{{"subject":"{subject}","payload":{{"n":{n}}}}}"#).as_bytes())
            .await?;
    }
    Ok(())
}

/// Subscribes to `subject` through `host`: after `last` (its `n` and id), or from the
/// newest event.
async fn follow(
    http: &reqwest::Client,
    host: &str,
    subject: &str,
    last: Option<&(u64, String)>,
) -> anyhow::Result<EventStream> {
    let url = format!("{}/?subject={subject}", host.trim_end_matches('/'));
    let request = match last {
        Some((_, id)) => http.get(&url).header("Last-Event-ID", id),
        None => http.get(format!("{url}&start=newest")),
    };
    let response = request.send().await.context("subscribing")?;
    if response.status() != 200 {
        bail!("subscribe answered {}", response.status());
    }
    Ok(EventStream::new(response))
}

/// Reads the events of the stream's next chunk into `last`, checking that each is the
/// next number; false when the stream ended (or broke, as a killed node's does).
async fn read(
    stream: &mut EventStream,
    last: &mut Option<(u64, String)>,
    wait: Duration,
) -> anyhow::Result<bool> {
    let messages = match tokio::time::timeout(wait, stream.next()).await {
        Ok(Ok(Some(messages))) => messages,
        Ok(Ok(None)) | Ok(Err(_)) => return Ok(false),
        Err(_) => bail!("no event within {wait:?}"),
    };
    for message in messages.filter(|m| m.event == "msg") {
        let event: serde_json::Value =
            serde_json::from_str(&message.data).context("an event that is not JSON")?;
        let n = event["payload"]["n"]
            .as_u64()
            .context("an event without n")?;
        if let Some((previous, _)) = last {
            if n != *previous + 1 {
                bail!("event {n} came after {previous}: missed or repeated");
            }
        }
        *last = Some((n, message.id.context("an event without an id")?));
    }
    Ok(true)
}

/// Kills a node (SIGKILL), off the async workers (it waits for the process to exit).
async fn kill(node: Server) {
    let _ = tokio::task::spawn_blocking(move || node.kill()).await;
}
