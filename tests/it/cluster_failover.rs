//! Losing a machine, with real processes on 127.0.0.1: `bus server` nodes on one JetStream
//! behind a load balancer, one of them killed with SIGKILL while clients stream through it;
//! and a three-node nats-server cluster (replicas 3) losing the leader of the stream while
//! publishers and subscribers run. (The browser's side, EventSource through a killed node,
//! is `examples/chat/failover.mjs`.)

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::client::{Client, ClientError, Event, NewEvent, Received, Start, SubscribeOptions};
use serde_json::json;

use crate::common::balancer::Balancer;
use crate::common::jetstream::{JetStreamCluster, JetStreamServer};
use crate::common::process::ServerProcess;

/// A `bus server` process on JetStream at `nats_urls`, serving namespace `app`.
fn bus_node(data: &std::path::Path, nats_urls: &str, replicas: &str) -> ServerProcess {
    ServerProcess::start_on(
        data,
        &[
            "--namespaces",
            "app",
            "--store",
            "jetstream",
            "--nats-url",
            nats_urls,
            "--jetstream-replicas",
            replicas,
        ],
    )
}

fn addr(node: &ServerProcess) -> SocketAddr {
    node.url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("a node's address")
}

/// Publishes `{"publisher": p, "n": n}` on `subject` through `url` for n = 0, 1, … until
/// stopped, one request at a time, never retrying a number (a request whose answer was
/// lost may or may not have been stored); keeps the numbers answered `202`, and the
/// failures other than a `503`.
struct Publisher {
    acknowledged: Arc<Mutex<Vec<u64>>>,
    attempts: Arc<Mutex<u64>>,
    not_503: Arc<Mutex<Vec<String>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn start(url: &str, subject: &str, publisher: usize, pause: Duration) -> Publisher {
        let client = Client::new(url)
            .expect("client")
            .with_timeout(Duration::from_secs(30));
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let attempts = Arc::new(Mutex::new(0));
        let not_503 = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (subject, kept, tried, failed) = (
            subject.to_owned(),
            Arc::clone(&acknowledged),
            Arc::clone(&attempts),
            Arc::clone(&not_503),
        );
        let task = tokio::spawn(async move {
            for n in 0.. {
                if *stopped.borrow() {
                    return;
                }
                *tried.lock().unwrap() += 1;
                let event = NewEvent::new(subject.as_str())
                    .with_payload(&json!({"publisher": publisher, "n": n}))
                    .expect("a payload");
                match client.publish(&event).await {
                    Ok(_) => kept.lock().unwrap().push(n),
                    Err(ClientError::Server { status: 503, .. }) => {}
                    Err(e) => failed.lock().unwrap().push(format!("{n}: {e}")),
                }
                tokio::time::sleep(pause).await;
            }
        });
        Publisher {
            acknowledged,
            attempts,
            not_503,
            stop,
            task,
        }
    }

    fn acknowledged(&self) -> Vec<u64> {
        self.acknowledged.lock().unwrap().clone()
    }

    /// Stops publishing: the numbers acknowledged, and the failures other than a 503.
    async fn stop(self) -> (Vec<u64>, Vec<String>) {
        let Publisher {
            acknowledged,
            attempts,
            not_503,
            stop,
            task,
        } = self;
        let _ = stop.send(true);
        task.await.expect("the publisher");
        let acknowledged = acknowledged.lock().unwrap().clone();
        let not_503 = not_503.lock().unwrap().clone();
        eprintln!(
            "publisher: {} of {} publishes acknowledged; failures other than 503: {not_503:?}",
            acknowledged.len(),
            attempts.lock().unwrap()
        );
        (acknowledged, not_503)
    }
}

/// What a resuming subscriber received: (publisher, n, index) of each event, in order.
type Delivered = Vec<(usize, u64, i64)>;

/// A resuming subscriber: follows `pattern` through `url` from the oldest event into a
/// shared list (with the time of each event); the client reconnects by itself when the
/// connection drops, and when the server ends the stream with an error (its storage was
/// unavailable) it subscribes again after the last event it got, as a resuming client
/// does. Runs until aborted.
async fn follow(
    url: &str,
    pattern: &str,
) -> (
    Arc<Mutex<Delivered>>,
    Arc<Mutex<Vec<Instant>>>,
    tokio::task::JoinHandle<()>,
) {
    let client = Client::new(url).expect("client");
    let pattern = pattern.to_owned();
    let options = move |start: Start| {
        SubscribeOptions::new(pattern.as_str())
            .with_start(start)
            .with_reconnect_for(Duration::from_secs(120))
    };
    let mut subscription = client
        .subscribe(options(Start::Oldest))
        .await
        .expect("subscribe");
    let received = Arc::new(Mutex::new(Vec::new()));
    let times = Arc::new(Mutex::new(Vec::new()));
    let (into, at) = (Arc::clone(&received), Arc::clone(&times));
    let task = tokio::spawn(async move {
        let mut last_id = None;
        loop {
            while let Some(item) = subscription.next().await {
                match item {
                    Ok(Received::Event(event)) => {
                        let (publisher, n) = numbers(&event);
                        into.lock().unwrap().push((publisher, n, event.index));
                        at.lock().unwrap().push(Instant::now());
                        last_id = Some(event.id);
                    }
                    Ok(Received::Disconnected(_) | Received::Reconnected { .. }) => {}
                    Err(ClientError::Subscription(why)) => {
                        eprintln!("a subscription was ended by its server ({why}); resuming");
                        break;
                    }
                    Err(e) => panic!("the subscription failed: {e}"),
                }
            }
            let start = last_id.clone().map_or(Start::Oldest, Start::After);
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match client.subscribe(options(start.clone())).await {
                    Ok(resumed) => {
                        subscription = resumed;
                        break;
                    }
                    Err(e) => eprintln!("resubscribing failed ({e}); trying again"),
                }
            }
        }
    });
    (received, times, task)
}

fn numbers(event: &Event) -> (usize, u64) {
    let payload: serde_json::Value = event.payload_as().expect("a JSON payload");
    (
        payload["publisher"].as_u64().expect("publisher") as usize,
        payload["n"].as_u64().expect("n"),
    )
}

/// Checks what a subscriber received against what each publisher had acknowledged:
/// positions strictly increasing (log order, nothing twice), each publisher's numbers
/// increasing, and every acknowledged number there.
fn check_exactly_once_in_order(who: &str, received: &Delivered, acknowledged: &[Vec<u64>]) {
    for pair in received.windows(2) {
        assert!(
            pair[0].2 < pair[1].2,
            "{who}: position {} after {} (an event twice, or out of order)",
            pair[1].2,
            pair[0].2
        );
    }
    for (publisher, acked) in acknowledged.iter().enumerate() {
        let got: Vec<u64> = received
            .iter()
            .filter(|(p, _, _)| *p == publisher)
            .map(|(_, n, _)| *n)
            .collect();
        assert!(
            got.windows(2).all(|pair| pair[0] < pair[1]),
            "{who}: publisher {publisher}'s events out of order or twice: {got:?}"
        );
        let got: BTreeSet<u64> = got.into_iter().collect();
        let missing: Vec<u64> = acked.iter().filter(|n| !got.contains(n)).copied().collect();
        assert!(
            missing.is_empty(),
            "{who}: acknowledged publishes of publisher {publisher} never delivered: {missing:?}"
        );
    }
}

/// Waits until every subscriber has received every acknowledged publish.
async fn wait_for_all(subscribers: &[Arc<Mutex<Delivered>>], acknowledged: &[Vec<u64>]) {
    let wanted: usize = acknowledged.iter().map(Vec::len).sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, received) in subscribers.iter().enumerate() {
        loop {
            let have: BTreeSet<(usize, u64)> = received
                .lock()
                .unwrap()
                .iter()
                .map(|(p, n, _)| (*p, *n))
                .collect();
            let complete = acknowledged
                .iter()
                .enumerate()
                .all(|(p, acked)| acked.iter().all(|n| have.contains(&(p, *n))));
            if complete {
                break;
            }
            if Instant::now() > deadline {
                let missing: Vec<(usize, u64)> = acknowledged
                    .iter()
                    .enumerate()
                    .flat_map(|(p, acked)| acked.iter().map(move |n| (p, *n)))
                    .filter(|pn| !have.contains(pn))
                    .collect();
                let received = received.lock().unwrap();
                let last = received.iter().rev().take(3).collect::<Vec<_>>();
                panic!(
                    "subscriber {i} has {} events, {wanted} acknowledged; missing (publisher, n): {missing:?}; last received {last:?}",
                    have.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A node is killed (SIGKILL) while SDK clients stream and publish through it behind a
/// load balancer: they go on through the other node, resuming where they were, missing
/// nothing and getting nothing twice; the events a durable consumer's member held
/// unacknowledged on the killed node go to its member on the other node after the
/// redelivery time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_bus_nodes_clients_resume_on_another_and_its_work_goes_to_the_others() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut node_a = bus_node(data_a.path(), &nats.url(), "1");
    let node_b = bus_node(data_b.path(), &nats.url(), "1");
    let balancer = Balancer::start(vec![addr(&node_a), addr(&node_b)]).await;

    // A durable consumer with a member on each node; node a's takes four jobs and never
    // acknowledges them.
    let jobs = |node: &ServerProcess| {
        let client = Client::new(&node.url).expect("client");
        async move {
            client
                .subscribe(
                    SubscribeOptions::new("app.jobs")
                        .with_start(Start::Oldest)
                        .with_consumer("workers")
                        .with_max_inflight(4)
                        .with_redelivery(Duration::from_secs(3), 0)
                        .with_reconnect_for(Duration::ZERO),
                )
                .await
        }
    };
    let mut worker_a = jobs(&node_a).await.expect("worker on a");
    let through_a = Client::new(&node_a.url).expect("client");
    for n in 0..20u64 {
        let job = NewEvent::new("app.jobs")
            .with_payload(&json!({"publisher": 0, "n": n}))
            .unwrap();
        through_a.publish(&job).await.expect("publish a job");
    }
    let mut held_by_a = Vec::new();
    while held_by_a.len() < 4 {
        match tokio::time::timeout(Duration::from_secs(10), worker_a.next()).await {
            Ok(Some(Ok(Received::Event(event)))) => held_by_a.push(numbers(&event).1),
            other => panic!("worker a: {other:?}"),
        }
    }
    let mut worker_b = jobs(&node_b).await.expect("worker on b");
    let acker = Client::new(&node_b.url).expect("client");
    // The jobs node b's member did, each with when it came.
    let done_by_b = Arc::new(Mutex::new(Vec::new()));
    let working = {
        let done = Arc::clone(&done_by_b);
        tokio::spawn(async move {
            while let Some(item) = worker_b.next().await {
                if let Ok(Received::Event(event)) = item {
                    done.lock()
                        .unwrap()
                        .push((numbers(&event).1, Instant::now()));
                    acker
                        .ack(&event.consumer_id, &event.id)
                        .await
                        .expect("ack through b");
                }
            }
        })
    };

    // Streams and a publisher through the balancer (so through node a, while it lives).
    let mut subscribers = Vec::new();
    let mut times = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (received, at, task) = follow(&balancer.url, "app.live").await;
        subscribers.push(received);
        times.push(at);
        tasks.push(task);
    }
    let publisher = Publisher::start(&balancer.url, "app.live", 0, Duration::from_millis(5));
    let deadline = Instant::now() + Duration::from_secs(30);
    while publisher.acknowledged().len() < 100 {
        assert!(
            Instant::now() < deadline,
            "publishing through node a is slow"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen_before: Vec<usize> = subscribers
        .iter()
        .map(|s| s.lock().unwrap().len())
        .collect();
    let killed = Instant::now();
    node_a.child.kill().expect("SIGKILL node a");
    let _ = node_a.child.wait();
    drop(worker_a);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // (Publishes through the killed node may fail with a broken connection.)
    let acknowledged = vec![publisher.stop().await.0];
    wait_for_all(&subscribers, &acknowledged).await;
    for (i, received) in subscribers.iter().enumerate() {
        let received = received.lock().unwrap().clone();
        check_exactly_once_in_order(&format!("subscriber {i}"), &received, &acknowledged);
        let resumed = times[i].lock().unwrap()[seen_before[i]..]
            .iter()
            .find(|at| **at > killed)
            .map(|at| at.duration_since(killed));
        eprintln!("subscriber {i}: first event after the kill {resumed:?} later");
    }
    for task in tasks {
        task.abort();
    }

    // Node a's unacknowledged jobs went to node b's member, after the redelivery time,
    // and every job was done once there.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done: BTreeSet<u64> = done_by_b.lock().unwrap().iter().map(|(n, _)| *n).collect();
        if done.len() == 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node b's member did {done:?}; node a held {held_by_a:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = done_by_b.lock().unwrap().clone();
    let numbers_done: Vec<u64> = done.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers_done.len(), 20, "a job done twice: {numbers_done:?}");
    for (n, at) in &done {
        if held_by_a.contains(n) {
            assert!(
                *at > killed,
                "job {n}, held by node a, went to node b before node a died"
            );
        }
    }
    working.abort();
}

/// The leader of the stream's replicas (one of three nats-server nodes) is killed with
/// SIGKILL while 8 publishers and 4 resuming subscribers run through two bus nodes, then
/// restarted; three times. Every publish answered `202` is delivered to every subscriber
/// exactly once and in order; a publish during the election is answered `202` (and kept)
/// or refused, never acknowledged and lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_nats_node_loses_no_acknowledged_event() {
    let Some(mut cluster) = JetStreamCluster::start(3).await else {
        return;
    };
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let urls = cluster.urls();
    let nodes = [
        bus_node(data_a.path(), &urls, "3"),
        bus_node(data_b.path(), &urls, "3"),
    ];

    let mut subscribers = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (received, _, task) = follow(&nodes[i % 2].url, "app.>").await;
        subscribers.push(received);
        tasks.push(task);
    }
    let publishers: Vec<Publisher> = (0..8)
        .map(|p| {
            Publisher::start(
                &nodes[p % 2].url,
                &format!("app.p{p}"),
                p,
                Duration::from_millis(10),
            )
        })
        .collect();

    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = cluster.stream_leader("BUS_app").await;
        let before: usize = publishers.iter().map(|p| p.acknowledged().len()).sum();
        cluster.nodes[leader].stop();
        eprintln!("round {round}: killed n{leader}, the stream's leader, after {before} publishes");
        tokio::time::sleep(Duration::from_secs(4)).await;
        cluster.nodes[leader].resume();
        cluster.wait_until_ready().await;
        let after: usize = publishers.iter().map(|p| p.acknowledged().len()).sum();
        eprintln!("round {round}: n{leader} back; {after} publishes acknowledged");
    }
    // Publishing goes on after the last restart.
    let before: usize = publishers.iter().map(|p| p.acknowledged().len()).sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    while publishers
        .iter()
        .map(|p| p.acknowledged().len())
        .sum::<usize>()
        < before + 200
    {
        assert!(
            Instant::now() < deadline,
            "publishes are not acknowledged again after the last restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut acknowledged = Vec::new();
    for publisher in publishers {
        let (acked, not_503) = publisher.stop().await;
        assert!(
            not_503.is_empty(),
            "publishes failed otherwise than with a 503: {not_503:?}"
        );
        acknowledged.push(acked);
    }
    assert!(
        acknowledged.iter().all(|acked| acked.len() > 50),
        "every publisher got through: {:?}",
        acknowledged.iter().map(Vec::len).collect::<Vec<_>>()
    );
    wait_for_all(&subscribers, &acknowledged).await;
    for (i, received) in subscribers.iter().enumerate() {
        let received = received.lock().unwrap().clone();
        check_exactly_once_in_order(&format!("subscriber {i}"), &received, &acknowledged);
    }
    for task in tasks {
        task.abort();
    }
}
