//! The Rust SDK (`bus::client`) against a real server in this process: replay from a log
//! position or a time, and a windowed manual-ack subscription that survives a server
//! restart without losing the event it had not acknowledged; and against a fake server
//! whose event stream never ends a line, which must not make the client buffer without
//! end. (Each public item's own behaviour is covered by the runnable examples in its
//! rustdoc.)

use std::path::Path;
use std::time::{Duration, SystemTime};

use bus::client::{
    Client, ClientError, Event, NewEvent, Received, Start, SubscribeOptions, Subscription,
};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common;
use crate::common::http::TestServer;

/// A server with the namespace `app` on `addr`.
async fn start_server(data: &Path, addr: &str) -> TestServer {
    TestServer::start(data, &["--addr", addr, "--namespaces", "app"]).await
}

/// The payloads (numbers) of a subscription that ends by itself.
async fn numbers(client: &Client, options: SubscribeOptions) -> Vec<u64> {
    let subscription = client.subscribe(options).await.expect("subscribe");
    tokio::time::timeout(
        Duration::from_secs(10),
        subscription
            .filter_map(|received| async move {
                match received.expect("no error") {
                    Received::Event(event) => Some(event.payload_as::<u64>().expect("a number")),
                    _ => None,
                }
            })
            .collect(),
    )
    .await
    .expect("the subscription ends at the end of the log")
}

/// The next event, skipping connection changes, which are collected in `changes`.
async fn next_event(subscription: &mut Subscription, changes: &mut Vec<String>) -> Event {
    loop {
        let received = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("an event within 10 s")
            .expect("the subscription goes on")
            .expect("no error");
        match received {
            Received::Event(event) => return event,
            Received::Disconnected(_) => changes.push("disconnected".into()),
            Received::Reconnected { .. } => changes.push("reconnected".into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_start_at_a_position_or_a_time() {
    let data = tempfile::tempdir().unwrap();
    let mut server = start_server(data.path(), "127.0.0.1:0").await;
    let client = Client::new(&server.url).unwrap();

    let batch: Vec<NewEvent> = (0..3)
        .map(|n| NewEvent::new("app.n").with_payload(&n).unwrap())
        .collect();
    let published = client.publish_batch(&batch).await.unwrap();
    assert_eq!(published.first_index(), Some(0));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for n in 3..5 {
        let event = NewEvent::new("app.n").with_payload(&n).unwrap();
        client.publish(&event).await.unwrap();
    }

    let from = |start| {
        SubscribeOptions::new("app.n")
            .with_start(start)
            .with_until_now()
    };
    assert_eq!(numbers(&client, from(Start::Oldest)).await, [0, 1, 2, 3, 4]);
    assert_eq!(
        numbers(&client, from(Start::Position(1))).await,
        [1, 2, 3, 4]
    );
    assert_eq!(numbers(&client, from(Start::Time(between))).await, [3, 4]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_subscription_resumes_at_its_first_unacknowledged_event() {
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", common::cli::free_port());
    let mut server = start_server(data.path(), &addr).await;
    let client = Client::new(&addr).unwrap();
    let batch: Vec<NewEvent> = (0..3)
        .map(|n| NewEvent::new("app.w").with_payload(&n).unwrap())
        .collect();
    client.publish_batch(&batch).await.unwrap();

    let options = SubscribeOptions::new("app.w")
        .with_start(Start::Oldest)
        .with_max_inflight(3);
    let mut subscription = client.subscribe(options).await.unwrap();
    let mut changes = Vec::new();
    let mut window = Vec::new();
    for _ in 0..3 {
        window.push(next_event(&mut subscription, &mut changes).await);
    }
    let numbers: Vec<u64> = window.iter().map(|e| e.payload_as().unwrap()).collect();
    assert_eq!(numbers, [0, 1, 2]);
    // Event 1 stays unacknowledged; the one after it is acknowledged.
    window[0].ack().await.unwrap();
    subscription.ack(&window[2]).await.unwrap();

    server.stop().await;
    let mut server = start_server(data.path(), &addr).await;

    let again = next_event(&mut subscription, &mut changes).await;
    assert_eq!(changes, ["disconnected", "reconnected"]);
    assert_eq!(
        again.payload_as::<u64>().unwrap(),
        1,
        "the unacknowledged event comes again first"
    );
    assert_ne!(again.consumer_id, window[1].consumer_id, "a new connection");
    again.ack().await.unwrap();
    server.stop().await;
}

/// A server (broken, or not a bus server) that sends a stream line without end: the
/// subscription reads up to the client's size limit, then fails with an error naming it
/// and hangs up, instead of buffering whatever comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_stream_line_fails_the_subscription_at_the_size_limit() {
    const LIMIT: usize = 1 << 20;
    /// What the fake server sends at most: far more than the limit and the sockets'
    /// buffers, so that reaching it means that the client kept reading.
    const CAP: usize = 256 << 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let go_on = std::sync::Arc::new(tokio::sync::Notify::new());
    let server = tokio::spawn({
        let go_on = std::sync::Arc::clone(&go_on);
        async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed before its request head");
                head.extend_from_slice(&buf[..n]);
            }
            socket
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                      x-bus-consumer-id: c_fake\r\n\r\n: ping\n\nevent: msg\ndata: ",
                )
                .await
                .unwrap();
            // First a line just under the limit, then (once the test has seen that it is
            // accepted) more of it without end.
            let mut sent = 0;
            let under = LIMIT - 100;
            socket.write_all(&vec![b'x'; under]).await.unwrap();
            sent += under;
            go_on.notified().await;
            let chunk = vec![b'x'; 64 << 10];
            while sent < CAP && socket.write_all(&chunk).await.is_ok() {
                sent += chunk.len();
            }
            // The connection stays open: a client that read everything waits on.
            (sent, socket)
        }
    });

    let client = Client::new(&addr.to_string())
        .unwrap()
        .with_max_event_size(LIMIT);
    let mut subscription = client
        .subscribe(SubscribeOptions::new("app.>"))
        .await
        .unwrap();
    // Under the limit: still waiting for the line to end.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), subscription.next())
            .await
            .is_err(),
        "the subscription gave up under its limit"
    );
    go_on.notify_one();
    let ended = tokio::time::timeout(Duration::from_secs(30), subscription.next())
        .await
        .expect("the subscription fails instead of buffering the endless line");
    match ended {
        Some(Err(error @ ClientError::EventTooLarge { limit })) => {
            assert_eq!(limit, LIMIT);
            let message = error.to_string();
            assert!(
                message.contains("1048576 bytes") && message.contains("with_max_event_size"),
                "{message}"
            );
        }
        other => panic!("expected EventTooLarge, got {other:?}"),
    }
    // It ends there: reconnecting would only bring the same line again.
    let after = tokio::time::timeout(Duration::from_secs(10), subscription.next()).await;
    assert!(matches!(after, Ok(None)), "{after:?}");
    // And it hung up: the server could not send on anywhere near its cap (what it did
    // send beyond the limit sat in the sockets' buffers).
    let (sent, _socket) = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the fake server's writes fail once the client has hung up")
        .unwrap();
    assert!(sent < CAP, "the client read all {sent} bytes sent");
    eprintln!("the fake server sent {sent} bytes of the line before the client hung up");
}
