//! Two nodes, each with its own cache, kept consistent through one sync bus: a `set` on
//! one node invalidates the key on the other, which reloads it on its next read.
//!
//! `cargo run --features nats,redis,kafka --example cache_invalidation -- memory` runs both nodes on the in-memory
//! bus; `-- bus` over a `bus` server with the `app` namespace (`BUS_HOST`, default
//! `http://localhost:2021`); `-- nats` over NATS (`NATS_URL`, default
//! `nats://127.0.0.1:4222`); `-- redis` over Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379/`); `-- kafka` over Kafka (`KAFKA_BROKERS`, comma-separated
//! `host:port`s, default `127.0.0.1:9092`); `-- mesh` peer to peer over UDP on loopback,
//! with no server at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::client::Client;
use bus::syncbus::{
    BusSyncBus, InMemoryBus, KafkaSyncBus, MeshOptions, MeshSyncBus, NatsSyncBus, PublishOptions,
    RedisSyncBus, SyncBus, SyncError,
};
use futures_util::StreamExt;

/// The shared store both nodes read through (a database, in a real deployment).
type Database = Arc<Mutex<HashMap<String, String>>>;

/// A node: a local cache in front of the database, and a bus to its peers.
struct Node<B: SyncBus> {
    name: &'static str,
    cache: Arc<Mutex<HashMap<String, String>>>,
    database: Database,
    bus: B,
}

impl<B: SyncBus> Node<B> {
    /// Starts invalidating this node's cache when peers change `key`.
    async fn watch(&self, key: &str) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let mut invalidations = self.bus.subscribe(key).await?;
        let cache = Arc::clone(&self.cache);
        let name = self.name;
        Ok(tokio::spawn(async move {
            while let Some(event) = invalidations.next().await {
                cache.lock().unwrap().remove(&event.key);
                println!("{name}: invalidated {}", event.key);
            }
        }))
    }

    fn get(&self, key: &str) -> Option<String> {
        let mut cache = self.cache.lock().unwrap();
        if let Some(value) = cache.get(key) {
            return Some(value.clone());
        }
        let value = self.database.lock().unwrap().get(key).cloned()?;
        cache.insert(key.to_owned(), value.clone());
        Some(value)
    }

    /// Writes through, and waits until the other node has dropped its copy (where the
    /// bus can tell; Redis and Kafka cannot, so there it publishes and lets delivery
    /// happen).
    async fn set(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.database
            .lock()
            .unwrap()
            .insert(key.into(), value.into());
        self.cache.lock().unwrap().insert(key.into(), value.into());
        match self
            .bus
            .publish_and_await(key, 1, Duration::from_secs(5))
            .await
        {
            Err(SyncError::QuorumUnsupported) => {
                self.bus.publish(key, PublishOptions::default()).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => other?,
        }
        Ok(())
    }
}

async fn scenario<B: SyncBus>(bus_a: B, bus_b: B) -> anyhow::Result<()> {
    let database: Database = Arc::default();
    database
        .lock()
        .unwrap()
        .insert("user:42".into(), "Ada".into());
    let node = |name, bus| Node {
        name,
        cache: Arc::default(),
        database: Arc::clone(&database),
        bus,
    };
    let (a, b) = (node("node-a", bus_a), node("node-b", bus_b));
    let watching = b.watch("user:42").await?;

    println!("node-b reads {:?}", b.get("user:42"));
    a.set("user:42", "Grace").await?;
    // Let node-b's watcher apply the invalidation it acknowledged.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = b.get("user:42");
    println!("node-b reads {after:?} after node-a's set");
    anyhow::ensure!(
        after.as_deref() == Some("Grace"),
        "node-b kept a stale value"
    );
    a.bus.publish("user:42", PublishOptions::default()).await?;
    watching.abort();
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref().unwrap_or("memory") {
        "memory" => {
            let hub = InMemoryBus::new();
            scenario(hub.node("a"), hub.node("b")).await?;
        }
        "bus" => {
            let host =
                std::env::var("BUS_HOST").unwrap_or_else(|_| bus::client::DEFAULT_HOST.into());
            let node = |zone| -> anyhow::Result<BusSyncBus> {
                Ok(BusSyncBus::new(Client::new(&host)?, "app").with_zone(zone))
            };
            scenario(node("a")?, node("b")?).await?;
        }
        "nats" => {
            let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
            let node = |zone| {
                let url = url.clone();
                async move {
                    let client = async_nats::connect(url.as_str()).await?;
                    anyhow::Ok(NatsSyncBus::new(client, "app").with_zone(zone))
                }
            };
            scenario(node("a").await?, node("b").await?).await?;
        }
        "redis" => {
            let url =
                std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
            let node = || async {
                let client = redis::Client::open(url.as_str())?;
                anyhow::Ok(RedisSyncBus::new(client, "app").await?)
            };
            scenario(node().await?, node().await?).await?;
        }
        "kafka" => {
            let brokers =
                std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
            let brokers: Vec<String> = brokers.split(',').map(str::to_owned).collect();
            let node = || KafkaSyncBus::new(brokers.clone(), "app");
            scenario(node().await?, node().await?).await?;
        }
        "mesh" => {
            let options = |peers: Vec<String>, zone: &str| MeshOptions {
                bind: ([127, 0, 0, 1], 0).into(),
                peers,
                zone: zone.into(),
                heartbeat: Duration::from_millis(100),
                ..MeshOptions::default()
            };
            let a = MeshSyncBus::new(options(vec![], "a")).await?;
            // b joins through a; on a network, each node lists one or more others.
            let b = MeshSyncBus::new(options(vec![a.local_addr()?.to_string()], "b")).await?;
            a.wait_for_peers(1, Duration::from_secs(5)).await?;
            b.wait_for_peers(1, Duration::from_secs(5)).await?;
            scenario(a, b).await?;
        }
        other => {
            anyhow::bail!("unknown backend {other:?}: use memory, bus, nats, redis, kafka or mesh")
        }
    }
    println!("consistent");
    Ok(())
}
