//! The Rust SDK (`bus::client`) against a real server in this process: replay from a log
//! position or a time, and a windowed manual-ack subscription that survives a server
//! restart without losing the event it had not acknowledged. (Each public item's own
//! behaviour is covered by the runnable examples in its rustdoc.)

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use bus::client::{Client, Event, NewEvent, Received, Start, SubscribeOptions, Subscription};
use common::http::TestServer;
use futures_util::StreamExt;

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
