//! One conformance suite for every sync-bus implementation: delivery by key (any
//! characters), region and scope kept, unsubscribe, quorum and topology waits, leases,
//! coalesced publishes, metrics and health; and what each backend lists as its peers. It
//! runs against the in-memory bus, `BusSyncBus` over a real server, and NATS and Redis
//! where their servers are installed.

use std::time::Duration;

use bus::client::Client;
use bus::syncbus::{
    BusSyncBus, InMemoryBus, KeySubscription, NatsSyncBus, PublishOptions, RedisSyncBus, SyncBus,
    SyncError,
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
