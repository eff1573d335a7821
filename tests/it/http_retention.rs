//! Retention over real HTTP: old sealed segments are deleted by size and by age in the
//! background, a subscriber reading through them is moved ahead with a notice instead of
//! failing, requests for removed history start at the oldest kept event, a restart keeps
//! the retained range, and `bus debug` shows it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::common::cli::run;
use crate::common::http::*;

const SMALL_SEGMENTS: [&str; 2] = ["--segment-size", "4096"];

/// Publishes events `from..from + count` of about 200 bytes, one by one.
async fn publish_many(server: &TestServer, from: i64, count: i64) {
    let padding = "p".repeat(150);
    for n in from..from + count {
        let response = server
            .post(json!({"subject": "app.r", "payload": {"n": n, "pad": padding}}).to_string())
            .await;
        assert_eq!(response.status(), 202);
    }
}

/// The index of the oldest event a `start=oldest` read delivers.
async fn oldest_index(server: &TestServer) -> u64 {
    let mut sse = server
        .subscribe("subject=app.>&start=oldest&until=now")
        .await;
    let frame = sse.next(Duration::from_secs(5)).await.expect("an event");
    frame.json()["index"].as_u64().unwrap()
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_retention_moves_readers_ahead_and_survives_a_restart() {
    if crate::common::http::skip_unless_file_store() {
        return;
    }
    const EVENTS: i64 = 3000;
    let data = tempfile::tempdir().unwrap();
    let args = [
        "--segment-size",
        "64KiB",
        "--retention-bytes",
        "256KiB",
        "--retention-interval",
        "100ms",
    ];
    let mut server = TestServer::start(data.path(), &args).await;

    // A reader from the very beginning that reads nothing for now, with a small receive
    // buffer: the server soon holds its position, not its events.
    let addr = server.server.as_ref().unwrap().local_addr();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut reader = socket.connect(addr).await.unwrap();
    reader
        .write_all(b"GET /?subject=app.%3E&start_index=0 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();

    // 12 MB are published; retention deletes the segments the reader was to read.
    let padding = "p".repeat(4000);
    for batch in 0..EVENTS / 50 {
        let events: Vec<Value> = (batch * 50..batch * 50 + 50)
            .map(|n| json!({"subject": "app.r", "payload": {"n": n, "pad": padding}}))
            .collect();
        let response = server.post(Value::from(events).to_string()).await;
        assert_eq!(response.status(), 202);
    }
    wait_until("old segments are deleted", async || {
        oldest_index(&server).await > 1000
    })
    .await;

    // The reader carries on: what was already on its way, a notice, then events in
    // order to the last one, and no error.
    let mut received = Vec::new();
    let last = format!("\"index\":{}}}", EVENTS - 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&received).contains(&last) {
        assert!(
            Instant::now() < deadline,
            "the reader did not get to the end"
        );
        let mut chunk = vec![0u8; 1 << 16];
        let n = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut chunk))
            .await
            .expect("the stream goes on")
            .unwrap();
        assert!(n > 0, "the stream ended");
        received.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&received);
    assert!(!text.contains("event: error"), "no error frame");
    assert_eq!(text.matches("removed by retention").count(), 1, "told once");
    // And told as an event a browser's EventSource can listen to.
    assert_eq!(text.matches("event: skipped\n").count(), 1, "{text:.2000}");
    let skipped_line = text
        .split("event: skipped\ndata: ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap();
    let skipped: Value = serde_json::from_str(skipped_line).unwrap();
    assert!(
        skipped["first_index"].as_u64().unwrap() <= skipped["last_index"].as_u64().unwrap(),
        "{skipped}"
    );
    assert_eq!(
        skipped["next_index"].as_u64().unwrap(),
        skipped["last_index"].as_u64().unwrap() + 1,
        "{skipped}"
    );
    let indexes: Vec<u64> = text
        .split("\"index\":")
        .skip(1)
        .map(|rest| rest[..rest.find('}').unwrap()].parse().unwrap())
        .collect();
    assert!(indexes.windows(2).all(|w| w[0] < w[1]), "in order");
    assert!(
        indexes.windows(2).any(|w| w[1] > w[0] + 1),
        "some events were skipped"
    );

    // Asking for removed history: the oldest kept event, with a notice first.
    let kept = oldest_index(&server).await;
    let mut old = server
        .subscribe("subject=app.>&start_index=3&until=now")
        .await;
    let notice = old.next_frame(Duration::from_secs(5)).await.unwrap();
    assert!(
        notice.comments[0].contains(&format!("continuing from position {kept}")),
        "{notice:?}"
    );
    let skipped = old.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(skipped.event.as_deref(), Some("skipped"), "{skipped:?}");
    assert_eq!(
        skipped.json(),
        json!({"first_index": 3, "last_index": kept - 1, "next_index": kept})
    );
    assert_eq!(
        old.next(Duration::from_secs(5)).await.unwrap().json()["index"],
        kept
    );

    // The retained range survives a restart, and the offline tools show it.
    drop(reader);
    server.stop().await;
    let path = data.path().display().to_string();
    let debug = run(&["debug", "--path", &path], None);
    assert!(
        debug
            .ok()
            .contains(&format!("retained:  positions {kept} to {}", EVENTS - 1)),
        "{}",
        debug.stdout
    );
    let dump = run(&["dump", "--path", &path, "--namespace", "app"], None);
    let first_dumped: Value = serde_json::from_str(dump.ok().lines().next().unwrap()).unwrap();
    assert_eq!(first_dumped["index"], kept);
    let mut server = TestServer::start(data.path(), &args).await;
    assert_eq!(oldest_index(&server).await, kept);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_retention_keeps_the_segment_being_written() {
    if crate::common::http::skip_unless_file_store() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(
        data.path(),
        &[
            SMALL_SEGMENTS[0],
            SMALL_SEGMENTS[1],
            "--retention-age",
            "1h,app:700ms",
            "--retention-interval",
            "100ms",
        ],
    )
    .await;
    publish_many(&server, 0, 60).await;
    let last = 59;
    // The sealed segments age out one by one (each with its last event), so wait until
    // none is left, not just the first.
    let segments = || {
        std::fs::read_dir(data.path().join("app"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("log".as_ref()))
            .count()
    };
    assert!(segments() > 1, "the events fill several segments");
    wait_until("aged segments are deleted", async || segments() == 1).await;
    // Only the segment being written is left: its events are all still there.
    let kept = oldest_index(&server).await;
    assert!(kept > 0);
    assert!(kept <= last);
    // The namespace's description says the same.
    let app = server.get_json("namespaces/app").await;
    assert_eq!(app["first_index"], kept, "{app}");
    assert_eq!(app["last_index"], last, "{app}");
    assert_eq!(app["events"], last + 1 - kept, "{app}");
    assert_eq!(app["segments"], 1, "{app}");
    // What retention deleted is counted: every event before the oldest kept.
    let metrics = server.metrics().await;
    let app = ["namespace=\"app\""];
    let deleted = |name| metric(&metrics, name, &app).unwrap_or_else(|| panic!("{metrics}"));
    assert_eq!(deleted("bus_retention_deleted_events_total"), kept as f64);
    assert!(deleted("bus_retention_deleted_segments_total") >= 1.0);
    assert_eq!(
        metric(
            &metrics,
            "bus_retention_deleted_events_total",
            &["namespace=\"orders\""]
        ),
        Some(0.0)
    );
    let mut sse = server
        .subscribe("subject=app.>&start=oldest&until=now")
        .await;
    let mut count = 0;
    while let Some(frame) = sse.next(Duration::from_secs(5)).await {
        if frame.event.as_deref() == Some("done") {
            break;
        }
        count += 1;
    }
    assert_eq!(count, last + 1 - kept);
    server.stop().await;

    // Overrides must name declared namespaces.
    let config = bus::config::ServerConfig::from_args([
        "--namespaces",
        "app",
        "--retention-age",
        "billing:1h",
    ])
    .unwrap();
    assert!(config.retention().unwrap_err().contains("billing"));
}

/// Publishes events `from..from + count` of about 200 bytes to `subject`, one by one,
/// each with the `created_at` the client chose.
async fn publish_dated(server: &TestServer, subject: &str, created_at: &str, count: i64) {
    let padding = "p".repeat(150);
    for n in 0..count {
        let response = server
            .post(
                json!({"subject": subject, "created_at": created_at, "payload": {"n": n, "pad": padding}})
                    .to_string(),
            )
            .await;
        assert_eq!(response.status(), 202);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_retention_goes_by_the_servers_commit_time_not_client_dates() {
    if crate::common::http::skip_unless_file_store() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(
        data.path(),
        &[
            SMALL_SEGMENTS[0],
            SMALL_SEGMENTS[1],
            "--retention-age",
            "app:700ms,orders:1h",
            "--retention-interval",
            "100ms",
        ],
    )
    .await;
    // Events restored from long ago, into a namespace that keeps an hour: every sealed
    // segment ends with an event dated 2001, but all were stored just now.
    publish_dated(&server, "orders.restored", "2001-01-01T00:00:00Z", 60).await;
    // Events dated in the future, into a namespace that keeps 700 ms: their date does not
    // keep them.
    publish_dated(&server, "app.r", "2200-01-01T00:00:00Z", 60).await;

    wait_until("the future-dated segments are deleted", async || {
        oldest_index(&server).await > 0
    })
    .await;
    // Several retention passes have run since: nothing of `orders` was deleted.
    let mut sse = server
        .subscribe("subject=orders.>&start=oldest&until=now")
        .await;
    let first = sse.next(Duration::from_secs(5)).await.expect("an event");
    assert_eq!(first.json()["index"], 0, "{first:?}");
    assert_eq!(first.json()["created_at"], "2001-01-01T00:00:00.000000000Z");
    server.stop().await;
}
