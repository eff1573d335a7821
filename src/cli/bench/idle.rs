//! `bus bench idle`: what idle subscriptions cost the server, read from its resident
//! memory before, while and after they are open: one HTTP/1.1 connection each, or with
//! `--http2` as many streams per HTTP/2 connection (clear text, prior knowledge) as the
//! server allows.

use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
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
    /// Subscribe over HTTP/2 (h2c), many streams to a connection.
    #[arg(long)]
    pub http2: bool,
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
    let started = Instant::now();
    let open = if args.http2 {
        Open::Http2(open_http2(&authority, &subject, args.subscribers).await?)
    } else {
        Open::Http1(open_http1(&authority, &subject, args.subscribers).await?)
    };
    let opened = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = rss();
    let connections = match &open {
        Open::Http1(streams) => streams.len(),
        Open::Http2(http2) => http2.connections,
    };
    drop(open);
    // The server trims freed memory every 5 s after many streams closed.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = rss();
    let mib = |kib: Option<u64>| kib.map(|k| k as f64 / 1024.0);
    report(
        &args.target,
        "idle",
        json!({
            "subscriptions": args.subscribers,
            "protocol": if args.http2 { "h2c" } else { "http/1.1" },
            "connections": connections,
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

/// The subscriptions held open, and what holds them.
enum Open {
    Http1(Vec<TcpStream>),
    Http2(Http2Streams),
}

/// Raw connections: a subscription costs this process a socket and a few bytes.
async fn open_http1(
    authority: &str,
    subject: &str,
    subscribers: usize,
) -> anyhow::Result<Vec<TcpStream>> {
    let request = format!(
        "GET /?subject={subject} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/event-stream\r\n\r\n"
    );
    let mut streams = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let mut stream = TcpStream::connect(authority).await?;
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
    Ok(streams)
}

/// HTTP/2 streams, and the connections they share (each driven by a task of its own,
/// which ends when the last handle to its connection is dropped).
struct Http2Streams {
    _streams: Vec<h2::RecvStream>,
    _senders: Vec<h2::client::SendRequest<Bytes>>,
    connections: usize,
}

async fn open_http2(
    authority: &str,
    subject: &str,
    subscribers: usize,
) -> anyhow::Result<Http2Streams> {
    let mut streams = Vec::with_capacity(subscribers);
    let mut senders = Vec::new();
    while streams.len() < subscribers {
        let tcp = TcpStream::connect(authority).await?;
        let (send, connection) = h2::client::handshake(tcp).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP/2 connection ended");
            }
        });
        // Streams are opened on this connection until the server's limit (known from its
        // settings once the first answer is in).
        let mut on_connection = 0;
        while streams.len() < subscribers && on_connection < send.current_max_send_streams() {
            let request =
                axum::http::Request::get(format!("http://{authority}/?subject={subject}"))
                    .header("accept", "text/event-stream")
                    .body(())?;
            let (answer, _) = send.clone().ready().await?.send_request(request, true)?;
            let answer = answer.await?;
            if answer.status() != axum::http::StatusCode::OK {
                bail!("subscribe answered {}", answer.status());
            }
            streams.push(answer.into_body());
            on_connection += 1;
        }
        senders.push(send);
    }
    Ok(Http2Streams {
        _streams: streams,
        connections: senders.len(),
        _senders: senders,
    })
}
