//! The server's limits over real HTTP: each is a clear answer with a plain-text reason
//! (413, 400, 431, 408, 503 with Retry-After), slow and idle connections are closed, and
//! the server keeps serving everyone else afterwards.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::http::*;

/// Sends raw bytes on a new connection and returns everything the server sends back
/// until it closes the connection (or `wait` passes).
async fn raw_exchange(server: &TestServer, request: &[u8], wait: Duration) -> String {
    let addr = server
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Whether the server still publishes and answers normally.
async fn assert_healthy(server: &TestServer) {
    server
        .publish(&json!({"subject": "app.still", "payload": 1}))
        .await;
    let health = reqwest::get(format!("{}health", server.url)).await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_subjects_and_heads_are_refused_with_reasons() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(
        data.path(),
        &["--max-body", "64KiB", "--max-subject-len", "40"],
    )
    .await;

    let big = json!({"subject": "app.big", "payload": "x".repeat(70 << 10)}).to_string();
    let response = server.post(big).await;
    assert_eq!(response.status(), 413);
    assert_eq!(
        header(&response, "content-type"),
        "text/plain; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    assert!(
        text.contains("64 KiB") && text.contains("--max-body"),
        "{text}"
    );
    // Just under the limit is fine.
    let fits = json!({"subject": "app.big", "payload": "x".repeat(60 << 10)}).to_string();
    assert_eq!(server.post(fits).await.status(), 202);

    let long = format!("app.{}", "s".repeat(40));
    let response = server.post(json!({"subject": long}).to_string()).await;
    assert_eq!(response.status(), 400);
    let text = response.text().await.unwrap();
    assert!(
        text.contains("at most 40") && text.contains("--max-subject-len"),
        "{text}"
    );
    let response = server
        .request(reqwest::Method::GET, &format!("subject={long}"))
        .await;
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("at most 40"));

    let deep = format!(
        r#"{{"subject":"app.deep","payload":{}0{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let response = server.post(deep).await;
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("levels deep"));

    // A request head over 64 KiB (a huge query or header) is 431.
    let head = format!(
        "GET /?subject=app.a&x={} HTTP/1.1\r\nHost: t\r\n\r\n",
        "q".repeat(70 << 10)
    );
    let answer = raw_exchange(&server, head.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");

    assert_healthy(&server).await;
    server.stop().await;
}

#[test]
fn limits_the_stored_format_cannot_hold_are_refused_at_start_up() {
    use bus::config::ServerConfig;

    let parse = |flag: &str, value: &str| {
        ServerConfig::from_args(["--namespaces", "app", flag, value]).map(|_| ())
    };
    // A subject's length is kept in 16 bits with each stored event.
    let err = parse("--max-subject-len", "65536").unwrap_err().to_string();
    assert!(
        err.contains("--max-subject-len") && err.contains("65535"),
        "{err}"
    );
    parse("--max-subject-len", "65535").unwrap();
    // An event is stored as one record, whose length field has 31 bits.
    for too_big in ["2GiB", "2147483648", "4G"] {
        let err = parse("--max-body", too_big).unwrap_err().to_string();
        assert!(
            err.contains("--max-body") && err.contains("2147483647"),
            "{err}"
        );
    }
    parse("--max-body", "2147483647").unwrap();
    parse("--max-body", "1GiB").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_streams_over_their_limits_get_503_with_retry_after() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(
        data.path(),
        &["--max-connections", "4", "--max-subscriptions", "2"],
    )
    .await;

    let first = server.subscribe("subject=app.>").await;
    let second = server.subscribe("subject=app.>").await;
    let response = server.request(reqwest::Method::GET, "subject=app.>").await;
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "retry-after"), "1");
    let text = response.text().await.unwrap();
    assert!(text.contains("--max-subscriptions"), "{text}");
    // A stream that closes gives its place back.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    let third = loop {
        let response = server.request(reqwest::Method::GET, "subject=app.>").await;
        if response.status() == 200 {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "the closed stream's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Two streams and the test client's pooled connection are open; fill up to four.
    let addr = server
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..4 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        if answer.starts_with("HTTP/1.1 503") {
            refused = Some(answer);
            break;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(stream);
    }
    let refused = refused.expect("a connection over --max-connections is refused");
    assert!(refused.contains("Retry-After: 1"), "{refused}");
    assert!(refused.contains("--max-connections"), "{refused}");

    // Once connections close, new ones are served again.
    drop(held);
    drop(second);
    drop(third);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = raw_exchange(
            &server,
            b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slow_and_stalled_clients_are_cut_off() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(
        data.path(),
        &["--idle-timeout", "500ms", "--body-timeout", "500ms"],
    )
    .await;
    let addr = server
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();

    // Idle keep-alive: served once, then closed after the idle timeout.
    let started = Instant::now();
    let answer = raw_exchange(
        &server,
        b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "idle connection kept for {took:?}"
    );

    // Slowloris: a head trickling in a byte at a time never completes in time.
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let head =
        b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    for byte in head {
        if stream.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => panic!("answered a head that took too long"),
            Err(_) => {}
        }
    }
    assert!(closed, "the trickling client was never cut off");
    assert!(started.elapsed() < Duration::from_secs(4));

    // A body that stalls halfway: 408.
    let answer = raw_exchange(
        &server,
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"subject\":",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-timeout"), "{answer}");

    // Streams are not idle connections: a subscriber outlives the idle timeout.
    let mut sse = server.subscribe("subject=app.>").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server
        .publish(&json!({"subject": "app.late", "payload": 1}))
        .await;
    let frame = sse
        .next(Duration::from_secs(5))
        .await
        .expect("still streaming");
    assert_eq!(frame.json()["subject"], "app.late");

    assert_healthy(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_keys_and_large_batches_are_refused_before_they_cost_memory() {
    let data = tempfile::tempdir().unwrap();
    let mut server =
        TestServer::start(data.path(), &["--max-key-len", "64", "--max-batch", "1000"]).await;
    let long_key = "k".repeat(65);
    let response = server
        .post(serde_json::json!({"subject": "app.a", "key": long_key}).to_string())
        .await;
    assert_eq!(response.status(), 400);
    let text = response.text().await.unwrap();
    assert!(
        text.contains("--max-key-len") && text.contains("65"),
        "{text}"
    );
    server
        .publish(&serde_json::json!({"subject": "app.a", "key": "k".repeat(64)}))
        .await;

    let batch = |n: usize| {
        let event = r#"{"subject":"app.b"}"#;
        format!("[{}]", vec![event; n].join(","))
    };
    let response = server.post(batch(1001)).await;
    assert_eq!(response.status(), 413);
    let text = response.text().await.unwrap();
    assert!(
        text.contains("--max-batch") && text.contains("1000"),
        "{text}"
    );
    let response = server.post(batch(1000)).await;
    assert_eq!(response.status(), 202);
    assert_eq!(header(&response, "x-bus-event-index"), "1000");
    server.stop().await;
}
