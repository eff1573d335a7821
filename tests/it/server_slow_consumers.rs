//! Subscribers that stop reading cost the server bounded memory and do not slow anyone
//! else down: a real server process, 100 subscribers that never read, one that keeps up,
//! and the server's resident memory read from /proc.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

use crate::common::cli::{free_port, Background};

const SLOW: usize = 100;
const EVENTS: usize = 30_000;
const BATCH: usize = 100;
const PAYLOAD: usize = 1000;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_never_read_cost_bounded_memory_and_slow_nobody() {
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let path = data.path().display().to_string();
    let mut server = Background::start(&[
        "server",
        "--addr",
        &addr,
        "--path",
        &path,
        "--namespaces",
        "app",
    ]);
    server.wait_for_stderr("listening");
    let pid = server.child.id();
    let url = format!("http://{addr}/");

    // Subscribers that open a stream and never read a byte of it (with small receive
    // buffers, so that the server feels it soon).
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
        stream
            .write_all(b"GET /?subject=app.> HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    let client = reqwest::Client::new();
    let fast = client
        .get(format!("{url}?subject=app.>"))
        .send()
        .await
        .unwrap();
    assert_eq!(fast.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);

    let counting = tokio::spawn(async move {
        let mut body = fast.bytes_stream();
        let (mut seen, mut carry) = (0usize, Vec::new());
        while seen < EVENTS {
            let chunk = body.next().await.expect("the stream goes on").unwrap();
            carry.extend_from_slice(&chunk);
            seen += carry.windows(7).filter(|w| w == b"\ndata: ").count();
            let keep = carry.len().saturating_sub(6);
            carry.drain(..keep);
        }
        seen
    });

    let started = Instant::now();
    let payload = "x".repeat(PAYLOAD);
    for batch in 0..EVENTS / BATCH {
        let events: Vec<serde_json::Value> = (0..BATCH)
            .map(|i| serde_json::json!({"subject": "app.load", "payload": [batch * BATCH + i, payload]}))
            .collect();
        let response = client
            .post(&url)
            .body(serde_json::to_vec(&events).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    let seen = tokio::time::timeout(Duration::from_secs(120), counting)
        .await
        .expect("the reading subscriber got every event")
        .unwrap();
    assert_eq!(seen, EVENTS);
    let took = started.elapsed();

    // The slow streams were sent ~30 MB each; what the server holds for them is bounded
    // by one read chunk and the connection's buffer each, plus the shared in-memory tail.
    let grown_mib = rss_kib(pid).saturating_sub(before) / 1024;
    eprintln!(
        "{EVENTS} events to the reading subscriber in {took:?}; server grew by {grown_mib} MiB"
    );
    assert!(
        grown_mib < 100,
        "the server grew by {grown_mib} MiB with {SLOW} subscribers that do not read"
    );

    let health = client.get(format!("{url}health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    drop(slow);
}
