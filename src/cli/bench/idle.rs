//! `bus bench idle`: what idle subscriptions cost the server, read from its resident
//! memory before, while and after they are open.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::measure::{report, resident_kib};
use super::target::Target;

#[derive(Debug, Args)]
pub struct IdleBench {
    #[command(flatten)]
    pub target: Target,
    /// Idle subscriptions to hold open.
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// The server's process id, to read its memory (known with --embedded).
    #[arg(long)]
    pub pid: Option<u32>,
}

pub async fn run(args: IdleBench) -> anyhow::Result<()> {
    crate::cli::server::raise_open_file_limit();
    // The server notices a closed idle stream when it next writes to it: pings every
    // second let the memory measured after closing be that of a server without them.
    let server = args.target.start_with(&["--ping-interval", "1s"]).await?;
    let pid = args.pid.or(server.pid);
    let rss = || pid.and_then(resident_kib);
    let before = rss();
    let subject = args.target.subject("idle");
    let authority = server
        .host
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    // Raw connections: a subscription costs this process a socket and a few bytes.
    let request = format!(
        "GET /?subject={subject} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/event-stream\r\n\r\n"
    );
    let mut streams = Vec::with_capacity(args.subscribers);
    let started = Instant::now();
    for _ in 0..args.subscribers {
        let mut stream = TcpStream::connect(&authority).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 512];
        let n = stream.read(&mut head).await?;
        if !head[..n].starts_with(b"HTTP/1.1 200") {
            bail!(
                "subscribe answered {}",
                String::from_utf8_lossy(&head[..n.min(40)])
            );
        }
        streams.push(stream);
    }
    let opened = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = rss();
    drop(streams);
    // The server trims freed memory every 5 s after many streams closed.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = rss();
    let mib = |kib: Option<u64>| kib.map(|k| k as f64 / 1024.0);
    report(
        &args.target,
        "idle",
        json!({
            "subscriptions": args.subscribers,
            "open_seconds": opened.as_secs_f64(),
            "server_rss_before_mib": mib(before),
            "server_rss_open_mib": mib(during),
            "server_rss_after_close_mib": mib(after),
            "kib_per_subscription": match (before, during) {
                (Some(b), Some(d)) => Some(d.saturating_sub(b) as f64 / args.subscribers as f64),
                _ => None,
            },
        }),
    );
    Ok(())
}
