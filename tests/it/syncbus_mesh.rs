//! The mesh sync bus beyond the shared conformance suite: membership by gossip and
//! heartbeats, delivery under datagram loss, the datagram bound, and two processes. Every
//! node binds 127.0.0.1 on a port of its own; nothing is sent anywhere else.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bus::syncbus::{MeshOptions, MeshSyncBus, PublishOptions, SyncBus, SyncError};
use futures_util::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

fn options(peers: &[&MeshSyncBus], zone: &str) -> MeshOptions {
    MeshOptions {
        bind: "127.0.0.1:0".parse().unwrap(),
        peers: peers
            .iter()
            .map(|p| p.local_addr().unwrap().to_string())
            .collect(),
        heartbeat: Duration::from_millis(100),
        dead_after: Duration::from_millis(600),
        zone: zone.into(),
        ..MeshOptions::default()
    }
}

async fn node(peers: &[&MeshSyncBus], zone: &str) -> MeshSyncBus {
    MeshSyncBus::new(options(peers, zone)).await.unwrap()
}

fn addr(node: &MeshSyncBus) -> String {
    node.local_addr().unwrap().to_string()
}

fn sorted(mut addrs: Vec<String>) -> Vec<String> {
    addrs.sort();
    addrs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_nodes_learn_each_other_by_gossip_and_drop_the_silent() {
    let seed = node(&[], "a").await;
    // b and c know only the seed; they learn of each other from its heartbeats.
    let b = node(&[&seed], "b").await;
    let c = node(&[&seed], "c").await;
    for (node, others) in [(&seed, 2), (&b, 2), (&c, 2)] {
        node.wait_for_peers(others, WAIT).await.unwrap();
    }
    assert_eq!(b.peers(), sorted(vec![addr(&seed), addr(&c)]));
    assert_eq!(seed.peers(), sorted(vec![addr(&b), addr(&c)]));

    // c stops (its last handle dropped): the others drop it after missed heartbeats.
    let c_addr = addr(&c);
    drop(c);
    let deadline = tokio::time::Instant::now() + WAIT;
    while seed.peers().contains(&c_addr) || b.peers().contains(&c_addr) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "c was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seed.peers(), [addr(&b)]);
    assert_eq!(b.peers(), [addr(&seed)]);
}

/// The acceptance bound of the issue: at 10% loss of every datagram (data, acks and
/// heartbeats), at least 99.9% of 10,000 invalidations reach each of 5 nodes, and none
/// twice. Each node publishes 2,000; every node (the publisher included) subscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_ten_percent_loss_invalidations_reach_every_node_once() {
    const NODES: usize = 5;
    const PER_NODE: usize = 2_000;
    let lossy = |peers: &[&MeshSyncBus]| MeshOptions {
        simulated_loss: 0.1,
        dead_after: Duration::from_secs(3),
        ..options(peers, "z")
    };
    let seed = MeshSyncBus::new(lossy(&[])).await.unwrap();
    let mut nodes = vec![seed.clone()];
    for _ in 1..NODES {
        nodes.push(MeshSyncBus::new(lossy(&[&seed])).await.unwrap());
    }
    for node in &nodes {
        node.wait_for_peers(NODES - 1, WAIT).await.unwrap();
    }
    let total = NODES * PER_NODE;
    let mut readers = Vec::new();
    for node in &nodes {
        let mut subscription = node.subscribe("hot").await.unwrap();
        // Reads as the invalidations come: a reader far behind would hold its node up.
        readers.push(tokio::spawn(async move {
            let mut seen = HashSet::new();
            let mut twice = 0;
            while seen.len() < total {
                match tokio::time::timeout(Duration::from_secs(15), subscription.next()).await {
                    Ok(Some(event)) => {
                        if !seen.insert(event.options.scope.unwrap()) {
                            twice += 1;
                        }
                    }
                    _ => break,
                }
            }
            // Anything late would be a repeat.
            while let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_millis(300), subscription.next()).await
            {
                if !seen.insert(event.options.scope.unwrap()) {
                    twice += 1;
                }
            }
            (seen.len(), twice)
        }));
    }
    let started = std::time::Instant::now();
    let publishers = nodes.iter().enumerate().map(|(n, node)| async move {
        for i in 0..PER_NODE {
            let options = PublishOptions {
                region: None,
                scope: Some(format!("{n}-{i}")),
            };
            node.publish("hot", options).await.unwrap();
        }
    });
    futures_util::future::join_all(publishers).await;
    let results = futures_util::future::join_all(readers).await;
    eprintln!("delivered in {:?}", started.elapsed());
    let mut price = bus::syncbus::MeshStats::default();
    for node in &nodes {
        let stats = node.stats();
        price.data += stats.data;
        price.retransmitted += stats.retransmitted;
        price.acks += stats.acks;
        price.dropped += stats.dropped;
    }
    eprintln!("sent by the 5 nodes: {price:?}");
    // Loss was simulated, and made up for.
    assert!(price.dropped > 0 && price.retransmitted > 0, "{price:?}");
    for (n, result) in results.iter().enumerate() {
        let (received, twice) = result.as_ref().unwrap();
        eprintln!("node {n}: {received} of {total} invalidations, {twice} twice");
        assert_eq!(*twice, 0, "node {n} had invalidations twice");
        assert!(
            *received * 1000 >= total * 999,
            "node {n} received {received} of {total}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_larger_than_a_datagram_is_refused() {
    let single = node(&[], "a").await;
    let mut subscription = single.subscribe("k").await.unwrap();
    let options = PublishOptions {
        region: Some("r".repeat(600)),
        scope: Some("s".repeat(600)),
    };
    let refused = single.publish("k", options).await;
    assert_eq!(
        refused,
        Err(SyncError::TooLarge {
            size: 1201,
            limit: 1148
        })
    );
    assert_eq!(
        refused.unwrap_err().to_string(),
        "an invalidation of 1201 bytes is too large: this bus carries at most 1148 bytes of key, region and scope"
    );
    // The largest that fits goes through.
    let largest = "k".repeat(1148);
    let mut largest_subscription = single.subscribe(&largest).await.unwrap();
    single
        .publish(&largest, PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(largest_subscription.next().await.unwrap().key, largest);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), subscription.next())
            .await
            .is_err()
    );
}

/// The peer of [`two_processes_exchange_invalidations`]: runs only when that test starts
/// this binary with `BUS_MESH_PEER` set, and speaks on stdout in lines `mesh-peer: …`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_peer_process() {
    let Ok(peer) = std::env::var("BUS_MESH_PEER") else {
        return;
    };
    let options = MeshOptions {
        bind: "127.0.0.1:0".parse().unwrap(),
        peers: vec![peer],
        heartbeat: Duration::from_millis(100),
        zone: "child".into(),
        ..MeshOptions::default()
    };
    let node = MeshSyncBus::new(options).await.unwrap();
    node.wait_for_peers(1, WAIT).await.unwrap();
    let mut to_child = node.subscribe("to-child").await.unwrap();
    println!("mesh-peer: ready {}", addr(&node));
    let event = to_child.next().await.unwrap();
    println!("mesh-peer: got {} {:?}", event.key, event.options.scope);
    node.publish("to-parent", PublishOptions::default())
        .await
        .unwrap();
    // Stays until the parent kills it.
    tokio::time::sleep(Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_exchange_invalidations() {
    let parent = node(&[], "parent").await;
    let mut to_parent = parent.subscribe("to-parent").await.unwrap();
    let mut child = ChildProcess(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "syncbus_mesh::mesh_peer_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BUS_MESH_PEER", addr(&parent))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (lines_sender, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest's "test … " may begin the first line.
            if let Some((_, said)) = line.split_once("mesh-peer: ") {
                let _ = lines_sender.send(said.to_owned());
            }
        }
    });
    let said = tokio::time::timeout(WAIT, lines.recv()).await.unwrap();
    let child_addr = said.unwrap().strip_prefix("ready ").unwrap().to_owned();
    assert_eq!(parent.peers(), [child_addr]);

    // The child's subscription, in another process, acknowledges: a quorum of one, in
    // its zone.
    parent
        .publish_and_await_topology("to-child", 1, WAIT)
        .await
        .unwrap();
    let said = tokio::time::timeout(WAIT, lines.recv()).await.unwrap();
    assert_eq!(said.unwrap(), "got to-child None");
    let event = tokio::time::timeout(WAIT, to_parent.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.key, "to-parent");

    // Killed, it is dropped from the parent's members.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !parent.peers().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the child stays");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        parent
            .publish_and_await("to-child", 1, Duration::from_millis(200))
            .await,
        Err(SyncError::QuorumNotSatisfied {
            acknowledged: 0,
            required: 1
        })
    );
}

/// The peer process, killed however the test ends.
struct ChildProcess(std::process::Child);

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
