//! One conformance suite for every sync-bus implementation: delivery by key (any
//! characters), region and scope kept, unsubscribe, quorum and topology waits, leases,
//! coalesced publishes, metrics and health; and what each backend lists as its peers. It
//! runs against the in-memory bus, `BusSyncBus` over a real server, and NATS, Redis and
//! Kafka (the broker tansu) where their servers are installed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus::client::Client;
use bus::syncbus::{
    BusSyncBus, InMemoryBus, KafkaSyncBus, KeySubscription, MeshOptions, MeshSyncBus, NatsSyncBus,
    PublishOptions, RedisSyncBus, SyncBus, SyncError,
};
use futures_util::StreamExt;

use crate::common::backends::Backend;
use crate::common::http::TestServer;

const WAIT: Duration = Duration::from_secs(5);
const SHORT: Duration = Duration::from_millis(300);
/// How long a wait that cannot be satisfied lasts: long enough for every acknowledgement
/// that can come to come, on a loaded machine.
const UNSATISFIABLE: Duration = Duration::from_millis(1500);

async fn next<S: futures_util::Stream + Unpin>(stream: &mut S) -> S::Item {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an event in time")
        .expect("the subscription goes on")
}

async fn nothing<S: futures_util::Stream + Unpin>(stream: &mut S)
where
    S::Item: std::fmt::Debug,
{
    if let Ok(Some(item)) = tokio::time::timeout(SHORT, stream.next()).await {
        panic!("unexpected {item:?}");
    }
}

/// `a1` and `a2` are nodes in zone a, `b` in zone b. `counts` says whether the backend
/// can wait for acknowledgements (else it must say it cannot).
async fn conformance<B: SyncBus>(a1: &B, a2: &B, b: &B, counts: bool) {
    // Delivery by key, whatever its characters, with the publisher's options.
    let key = "user:42/ü ñ.*>";
    let mut on_a2 = a2.subscribe(key).await.unwrap();
    let mut on_b = b.subscribe(key).await.unwrap();
    let mut other = b.subscribe("user:43").await.unwrap();
    let options = PublishOptions {
        region: Some("eu-west".into()),
        scope: Some("profile".into()),
    };
    a1.publish(key, options.clone()).await.unwrap();
    for subscription in [&mut on_a2, &mut on_b] {
        let event = next(subscription).await;
        assert_eq!(event.key, key);
        assert_eq!(event.options, options);
    }
    nothing(&mut other).await;

    if counts {
        quorum_and_unsubscribe(a1, key, on_a2, on_b).await;
    } else {
        for result in [
            a1.publish_and_await(key, 1, SHORT).await,
            a1.publish_and_await_topology(key, 1, SHORT).await,
        ] {
            assert_eq!(result, Err(SyncError::QuorumUnsupported));
        }
        on_b.unsubscribe();
        drop(on_a2);
    }

    // Leases are apart from keys.
    let mut lease = b.subscribe_lease("lease-7").await.unwrap();
    let mut other_lease = b.subscribe_lease("lease-7").await.unwrap();
    let mut same_name_key = b.subscribe("lease-7").await.unwrap();
    a1.revoke_lease("lease-7").await.unwrap();
    assert_eq!(next(&mut lease).await.key, "lease-7");
    assert_eq!(next(&mut other_lease).await.key, "lease-7");
    nothing(&mut same_name_key).await;
    // An unsubscribed lease receives nothing more; the other one still does.
    b.unsubscribe_lease(lease);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let delivered = b.metrics().delivered;
    a1.revoke_lease("lease-7").await.unwrap();
    assert_eq!(next(&mut other_lease).await.key, "lease-7");
    tokio::time::sleep(SHORT).await;
    assert_eq!(
        b.metrics().delivered,
        delivered + 1,
        "only the subscribed lease"
    );

    // Concurrent publishes of one key all succeed; at least one reaches the subscriber.
    let mut hot = b.subscribe("hot").await.unwrap();
    let publishes = (0..10).map(|_| a1.publish("hot", PublishOptions::default()));
    for result in futures_util::future::join_all(publishes).await {
        result.unwrap();
    }
    let mut received = 1;
    next(&mut hot).await;
    while let Ok(Some(_)) = tokio::time::timeout(SHORT, hot.next()).await {
        received += 1;
    }
    assert!((1..=10).contains(&received), "{received}");

    // At least: the first publish, the lease, one of the coalesced ones (and the waits).
    assert!(a1.metrics().published >= 3, "{:?}", a1.metrics());
    assert!(b.metrics().delivered >= 3, "{:?}", b.metrics());
    assert!(a1.is_healthy().await);
}

async fn quorum_and_unsubscribe<B: SyncBus>(
    a1: &B,
    key: &str,
    mut on_a2: KeySubscription,
    mut on_b: KeySubscription,
) {
    // Quorum: two subscribers of the key acknowledge.
    a1.publish_and_await(key, 2, WAIT).await.unwrap();
    assert_eq!(
        a1.publish_and_await(key, 3, UNSATISFIABLE).await,
        Err(SyncError::QuorumNotSatisfied {
            acknowledged: 2,
            required: 3
        })
    );
    // Topology: they are in two zones.
    a1.publish_and_await_topology(key, 2, WAIT).await.unwrap();
    assert_eq!(
        a1.publish_and_await_topology(key, 3, UNSATISFIABLE).await,
        Err(SyncError::QuorumNotSatisfied {
            acknowledged: 2,
            required: 3
        })
    );
    for subscription in [&mut on_a2, &mut on_b] {
        for _ in 0..4 {
            next(subscription).await;
        }
    }

    // Unsubscribing, by dropping or explicitly, removes the subscription.
    drop(on_b);
    on_a2.unsubscribe();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        a1.publish_and_await(key, 1, SHORT).await,
        Err(SyncError::QuorumNotSatisfied {
            acknowledged: 0,
            required: 1
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_bus_conforms() {
    let hub = InMemoryBus::new();
    conformance(&hub.node("a"), &hub.node("a"), &hub.node("b"), true).await;
}

#[test]
fn in_memory_peers_are_the_zones_of_the_other_live_nodes() {
    let hub = InMemoryBus::new();
    let eu = hub.node("eu");
    let us = hub.node("us");
    assert_eq!(eu.peers(), ["us"]);
    assert_eq!(us.peers(), ["eu"]);
    // Another node in the same zone is a peer; a clone of a handle is the same node.
    let eu_again = hub.node("eu");
    assert_eq!(eu.peers(), ["eu", "us"]);
    assert_eq!(eu.clone().peers(), ["eu", "us"]);
    // The hub's own handle lists every node and is not one.
    assert_eq!(hub.peers(), ["eu", "us"]);
    // Dropped nodes are gone.
    drop((eu_again, us));
    assert!(eu.peers().is_empty(), "{:?}", eu.peers());
    assert_eq!(hub.peers(), ["eu"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_sync_bus_conforms() {
    let mut nodes: Vec<MeshSyncBus> = Vec::new();
    for zone in ["a", "a", "b"] {
        let options = MeshOptions {
            bind: "127.0.0.1:0".parse().unwrap(),
            // Each joins through the first; the third learns of the second by gossip.
            peers: nodes
                .first()
                .map(|first| first.local_addr().unwrap().to_string())
                .into_iter()
                .collect(),
            heartbeat: Duration::from_millis(100),
            zone: zone.into(),
            ..MeshOptions::default()
        };
        nodes.push(MeshSyncBus::new(options).await.unwrap());
    }
    for node in &nodes {
        node.wait_for_peers(2, WAIT).await.unwrap();
    }
    conformance(&nodes[0], &nodes[1], &nodes[2], true).await;
    // The peers are the other live nodes' addresses.
    let mut others: Vec<String> = nodes[1..]
        .iter()
        .map(|n| n.local_addr().unwrap().to_string())
        .collect();
    others.sort();
    assert_eq!(nodes[0].peers(), others);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_sync_bus_conforms() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &["--namespaces", "cache"]).await;
    let node =
        |zone: &str| BusSyncBus::new(Client::new(&server.url).unwrap(), "cache").with_zone(zone);
    conformance(&node("a"), &node("a"), &node("b"), true).await;
    // The peer is the server the invalidations go through.
    assert_eq!(node("a").peers(), [server.url.trim_end_matches('/')]);

    // A dead backend fails within the publish timeout instead of hanging.
    let dead = BusSyncBus::new(Client::new("127.0.0.1:9").unwrap(), "cache")
        .with_publish_timeout(Duration::from_millis(500));
    assert!(dead.publish("k", PublishOptions::default()).await.is_err());
    assert!(!dead.is_healthy().await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sync_bus_conforms() {
    let Some(server) = Backend::nats() else {
        return;
    };
    let url = format!("nats://127.0.0.1:{}", server.port);
    let mut nodes = Vec::new();
    for zone in ["a", "a", "b"] {
        let client = async_nats::connect(&url).await.unwrap();
        nodes.push(NatsSyncBus::new(client, "sync").with_zone(zone));
    }
    conformance(&nodes[0], &nodes[1], &nodes[2], true).await;
    // A server on its own announces itself alone.
    assert_eq!(
        nodes[0].peers(),
        [format!("nats://127.0.0.1:{}", server.port)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sync_bus_conforms() {
    let Some(server) = Backend::redis() else {
        return;
    };
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let client = redis::Client::open(url.as_str()).unwrap();
        nodes.push(RedisSyncBus::new(client, "sync").await.unwrap());
    }
    conformance(&nodes[0], &nodes[1], &nodes[2], false).await;
    assert_eq!(
        nodes[0].peers(),
        [format!("redis://127.0.0.1:{}", server.port)]
    );
}

/// A Redis handle receives on one connection for all its subscriptions: when Redis goes
/// away they end (rather than wait for ever), and once it is back a new subscription
/// works, on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_subscriptions_end_with_their_connection_and_resubscribing_works() {
    let Some(server) = Backend::redis() else {
        return;
    };
    let port = server.port;
    let url = format!("redis://127.0.0.1:{port}/");
    let node = RedisSyncBus::new(redis::Client::open(url.as_str()).unwrap(), "gone")
        .await
        .unwrap();
    let mut first = node.subscribe("user:42").await.unwrap();
    let mut second = node.subscribe("user:43").await.unwrap();
    drop(server);
    for subscription in [&mut first, &mut second] {
        let end = tokio::time::timeout(WAIT, subscription.next()).await;
        assert_eq!(end.expect("the subscription ends"), None);
    }

    let _again = Backend::redis_on(port).unwrap();
    let mut third = node.subscribe("user:42").await.unwrap();
    let publisher = RedisSyncBus::new(redis::Client::open(url.as_str()).unwrap(), "gone")
        .await
        .unwrap();
    publisher
        .publish("user:42", PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(next(&mut third).await.key, "user:42");
}

/// Adaptive batching: a burst of 10,000 invalidations of distinct keys goes out in far
/// fewer `PUBLISH` calls (Redis's own count, `INFO commandstats`), and each of three
/// nodes subscribed to every key receives every invalidation once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_burst_is_batched_into_few_publishes() {
    const KEYS: usize = 10_000;
    let Some(server) = Backend::redis() else {
        return;
    };
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let client = redis::Client::open(url.as_str()).unwrap();
    let publisher = RedisSyncBus::new(client.clone(), "burst").await.unwrap();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("item:{i}")).collect();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let node = RedisSyncBus::new(client.clone(), "burst").await.unwrap();
        let mut subscriptions = Vec::new();
        for key in &keys {
            subscriptions.push(node.subscribe(key).await.unwrap());
        }
        nodes.push((node, subscriptions));
    }
    // Every node has subscribed: the readers' waits start now.
    let readers: Vec<_> = nodes
        .into_iter()
        .map(|(node, subscriptions)| {
            tokio::spawn(async move {
                let mut received: HashMap<String, usize> = HashMap::new();
                let mut events = futures_util::stream::select_all(subscriptions);
                while received.values().sum::<usize>() < KEYS {
                    let Ok(Some(event)) = tokio::time::timeout(WAIT, events.next()).await else {
                        panic!(
                            "{} of {KEYS} received, {:?}",
                            received.len(),
                            node.metrics()
                        );
                    };
                    *received.entry(event.key).or_default() += 1;
                }
                nothing(&mut events).await;
                (received, node.metrics().delivered)
            })
        })
        .collect();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let publish_calls = |connection: &mut redis::aio::MultiplexedConnection| {
        let mut connection = connection.clone();
        async move {
            let stats: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut connection)
                .await
                .unwrap();
            let line = stats.lines().find(|l| l.starts_with("cmdstat_publish:"));
            line.map_or(0, |line| {
                let calls = line.split(['=', ',']).nth(1).unwrap();
                calls.parse::<usize>().unwrap()
            })
        }
    };
    let before = publish_calls(&mut connection).await;
    let publishes = keys
        .iter()
        .map(|key| publisher.publish(key, PublishOptions::default()));
    for result in futures_util::future::join_all(publishes).await {
        result.unwrap();
    }
    let calls = publish_calls(&mut connection).await - before;
    for reader in readers {
        let (received, delivered) = reader.await.unwrap();
        assert_eq!(received.len(), KEYS, "every key");
        assert!(received.values().all(|&n| n == 1), "every key once");
        assert_eq!(delivered, KEYS as u64);
    }
    assert_eq!(publisher.metrics().published, KEYS as u64);
    eprintln!("{KEYS} invalidations in {calls} PUBLISH calls");
    assert!((1..=KEYS / 50).contains(&calls), "{calls} PUBLISH calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sync_bus_conforms() {
    let Some(broker) = Backend::kafka() else {
        return;
    };
    let address = format!("127.0.0.1:{}", broker.port);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            KafkaSyncBus::new(vec![address.clone()], "sync")
                .await
                .unwrap(),
        );
    }
    conformance(&nodes[0], &nodes[1], &nodes[2], false).await;
    // The peers are the bootstrap brokers, each once.
    assert_eq!(nodes[0].peers(), [format!("kafka://{address}")]);
    let twice = KafkaSyncBus::new(vec![address.clone(), address.clone()], "sync")
        .await
        .unwrap();
    assert_eq!(twice.peers(), [format!("kafka://{address}")]);

    // A subscription outlives the handle that made it (its consumer with it).
    let mut outliving = twice.subscribe("user:44").await.unwrap();
    drop(twice);
    nodes[0]
        .publish("user:44", PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(next(&mut outliving).await.key, "user:44");

    // A broker gone makes the handle unhealthy within the publish timeout, and one that
    // never answered fails the constructor instead of hanging.
    let short = Duration::from_millis(500);
    let node = nodes[0].clone().with_publish_timeout(short);
    drop(broker);
    assert!(!node.is_healthy().await);
    assert!(node.publish("k", PublishOptions::default()).await.is_err());
    let dead = KafkaSyncBus::new(vec!["127.0.0.1:9".into()], "sync").await;
    assert!(dead.is_err());
}

/// A proxy in front of a Kafka broker that counts the produce requests (API key 0) its
/// clients send through it.
async fn counting_proxy(
    listener: tokio::net::TcpListener,
    broker: u16,
    produces: Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((client, _)) = listener.accept().await {
        let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", broker)).await else {
            continue;
        };
        let (mut client_read, mut client_write) = client.into_split();
        let (mut upstream_read, mut upstream_write) = upstream.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut upstream_read, &mut client_write).await;
        });
        let produces = Arc::clone(&produces);
        tokio::spawn(async move {
            // Each request: its size (4 bytes, big-endian), then its header, which starts
            // with the API key (2 bytes).
            let mut size = [0; 4];
            while client_read.read_exact(&mut size).await.is_ok() {
                let mut request = vec![0; u32::from_be_bytes(size) as usize];
                if client_read.read_exact(&mut request).await.is_err() {
                    return;
                }
                if request.starts_with(&[0, 0]) {
                    produces.fetch_add(1, Ordering::Relaxed);
                }
                let forwarded = async {
                    upstream_write.write_all(&size).await?;
                    upstream_write.write_all(&request).await
                };
                if forwarded.await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A burst of 2,000 publishes of distinct keys reaches the node subscribed to them all,
/// each exactly once, in a handful of produce requests (batches of gzip records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_burst_arrives_whole_in_few_produce_requests() {
    const KEYS: usize = 2000;
    // Clients reach the broker only through the proxy, which it advertises.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let Some(broker) = Backend::kafka_advertising(Some(proxy_port)) else {
        return;
    };
    let produces = Arc::new(AtomicUsize::new(0));
    let _proxy = tokio::spawn(counting_proxy(listener, broker.port, Arc::clone(&produces)));
    let brokers = vec![format!("127.0.0.1:{proxy_port}")];
    let publisher = KafkaSyncBus::new(brokers.clone(), "burst").await.unwrap();
    let subscriber = KafkaSyncBus::new(brokers, "burst").await.unwrap();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("item:{i}")).collect();
    let mut subscriptions = Vec::new();
    for key in &keys {
        subscriptions.push(subscriber.subscribe(key).await.unwrap());
    }

    let before = produces.load(Ordering::Relaxed);
    let publishes = keys
        .iter()
        .map(|key| publisher.publish(key, PublishOptions::default()));
    for result in futures_util::future::join_all(publishes).await {
        result.unwrap();
    }
    let requests = produces.load(Ordering::Relaxed) - before;

    let mut received: HashMap<String, usize> = HashMap::new();
    let mut events = futures_util::stream::select_all(subscriptions);
    while received.values().sum::<usize>() < KEYS {
        let event = next(&mut events).await;
        *received.entry(event.key).or_default() += 1;
    }
    nothing(&mut events).await;
    assert_eq!(received.len(), KEYS, "every key once");
    assert!(received.values().all(|&n| n == 1), "every key once");
    assert_eq!(publisher.metrics().published, KEYS as u64);
    assert_eq!(subscriber.metrics().delivered, KEYS as u64);
    // Every one went through the proxy (none, and the count would prove nothing).
    assert!(
        (1..=KEYS / 20).contains(&requests),
        "{requests} produce requests for {KEYS} events"
    );
    eprintln!("{KEYS} events in {requests} produce requests");
}

/// A subscription that `subscribe` returned is in place at the NATS server: a publish
/// from another connection right after it reaches it, every time. (Writing the SUB out
/// is not enough: the server may still be reading it when the other connection's publish
/// arrives; this raced under load before `subscribe` waited for a round trip.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_subscriptions_are_in_place_when_subscribe_returns() {
    let Some(server) = Backend::nats() else {
        return;
    };
    let url = format!("nats://127.0.0.1:{}", server.port);
    let publisher = NatsSyncBus::new(async_nats::connect(&url).await.unwrap(), "race");
    let subscriber = NatsSyncBus::new(async_nats::connect(&url).await.unwrap(), "race");
    for round in 0..300 {
        let key = format!("key-{round}");
        let mut subscription = subscriber.subscribe(&key).await.unwrap();
        publisher
            .publish(&key, PublishOptions::default())
            .await
            .unwrap();
        let event = next(&mut subscription).await;
        assert_eq!(event.key, key, "round {round}");
    }
}
