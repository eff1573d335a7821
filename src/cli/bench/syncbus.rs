//! `bus bench syncbus`: cache invalidations through a sync bus (`bus::syncbus`), from one
//! publisher handle to `--subscribers` subscriber handles (nodes), each its own
//! handle with its own connections (memory: nodes of one `InMemoryBus` hub; mesh: N+1
//! `MeshSyncBus` nodes on 127.0.0.1, the publisher's address their static peer, the mesh
//! formed before measuring).
//!
//! Every node subscribes to all `--keys` keys (`bench:0`, `bench:1`, …) before the clock
//! starts; subscribing (and connecting, and forming a mesh) is timed apart as
//! `setup_seconds`. Then the publisher publishes `--events` invalidations, event `i` on
//! key `i % K`, from `--concurrency` lanes at once (C publishes in flight, so that the
//! backends that batch can). Lane `j` owns the keys `j, j+C, j+2C, …` and publishes them
//! one after another, so no two publishes in flight share a key: the backends that
//! coalesce overlapping publishes of one key (see `SyncBus::publish`) merge none, and
//! every node must receive every invalidation exactly once. That is why `--keys` must be
//! at least `--concurrency`.
//!
//! The publisher publishes as fast as its publishes return, or at `--rate` in all (then
//! latency is the backend's own, not time spent queued behind a publisher that outruns
//! the readers). Each event's scope carries its number and the time its publish was
//! called (nanoseconds since an `Instant` all nodes share, being in this one process);
//! each node's reader, a task of its own running while the publisher publishes, checks
//! the event and takes the latency from it.
//!
//! Measured: published invalidations per second (until the last publish returned),
//! deliveries per second (M×N over the time until the last delivery), and the
//! publish-to-delivery latency (p50 and p99 over every delivery, or an even sample of
//! them past two million; the max over all). The run fails if a node misses an
//! invalidation (once the publisher is done, none arrived anywhere for 10 s), receives
//! one twice, or receives it on the wrong key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use futures_util::{Stream, StreamExt, TryStreamExt};
use serde_json::json;
use tokio::sync::oneshot;

use super::measure::{ms, percentile, print_report};
use crate::syncbus::{
    BusSyncBus, InMemoryBus, MeshOptions, MeshSyncBus, PublishOptions, SyncBus, SyncEvent,
};

#[derive(Debug, Args)]
pub struct SyncbusBench {
    /// The sync-bus backend to measure.
    #[arg(long, value_enum)]
    pub backend: Backend,
    /// Subscriber nodes, each its own handle subscribing to every key.
    #[arg(long, default_value_t = 4)]
    pub subscribers: usize,
    /// Invalidations the publisher publishes in all.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Distinct keys the publisher cycles through (event i is on key i % keys); at least
    /// --concurrency, so that no two publishes in flight share a key.
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Publishes in flight from the publisher (lanes, each owning every C-th key).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Invalidations per second from the publisher, all lanes together (0: as fast as
    /// the publishes return). Below the backends' ceiling, latency is the backend's own
    /// rather than the time queued behind a publisher that outruns the readers.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// The server (bus: http://127.0.0.1:2021; nats: nats://127.0.0.1:4222; redis:
    /// redis://127.0.0.1:6379/; kafka: 127.0.0.1:9092, brokers comma-separated).
    /// Not used by memory and mesh.
    #[arg(long)]
    pub url: Option<String>,
    /// The namespace (bus; the server must serve it), subject prefix (nats), channel
    /// prefix (redis) or topic (kafka) the run uses.
    #[arg(long, default_value = "bench")]
    pub namespace: String,
    /// mesh: the share of datagrams every node drops on purpose (0 to 1), to measure
    /// what reliable delivery costs under loss; the datagrams sent are reported after.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// `InMemoryBus`: nodes of one hub in this process.
    Memory,
    /// `BusSyncBus`: through a `bus` server (--url, --namespace).
    Bus,
    /// `NatsSyncBus`: NATS core pub/sub (--url).
    Nats,
    /// `RedisSyncBus`: Redis pub/sub (--url).
    Redis,
    /// `KafkaSyncBus`: a Kafka topic of one partition (--url: the brokers).
    Kafka,
    /// `MeshSyncBus`: peer to peer over UDP on 127.0.0.1, no server.
    Mesh,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Bus => "bus",
            Backend::Nats => "nats",
            Backend::Redis => "redis",
            Backend::Kafka => "kafka",
            Backend::Mesh => "mesh",
        }
    }

    fn default_url(self) -> &'static str {
        match self {
            Backend::Bus => "http://127.0.0.1:2021",
            Backend::Nats => "nats://127.0.0.1:4222",
            Backend::Redis => "redis://127.0.0.1:6379/",
            Backend::Kafka => "127.0.0.1:9092",
            Backend::Memory | Backend::Mesh => "",
        }
    }
}

/// Latencies kept across all nodes; past this, every n-th event's.
const LATENCY_SAMPLES: u64 = 2_000_000;
/// How long the deliveries may stall, once the publisher is done, before the run fails.
const STALL: Duration = Duration::from_secs(10);
/// How long the nodes keep reading once all has arrived, to catch late duplicates.
const SETTLE: Duration = Duration::from_millis(200);
/// How long a mesh has to form.
const MESH_FORMING: Duration = Duration::from_secs(30);

pub async fn run(args: SyncbusBench) -> anyhow::Result<()> {
    if args.subscribers == 0 || args.events == 0 || args.keys == 0 || args.concurrency == 0 {
        bail!("--subscribers, --events, --keys and --concurrency must be at least 1");
    }
    if args.keys < args.concurrency {
        bail!(
            "--keys ({}) must be at least --concurrency ({}): each lane publishes keys of its \
             own, so that no publishes of one key overlap (they would be coalesced)",
            args.keys,
            args.concurrency
        );
    }
    crate::cli::server::raise_open_file_limit();
    let setup = Instant::now();
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| args.backend.default_url().to_owned());
    let n = args.subscribers;
    match args.backend {
        Backend::Memory => {
            let hub = InMemoryBus::new();
            let publisher = hub.node("publisher");
            let nodes = (0..n).map(|i| hub.node(&format!("node-{i}"))).collect();
            measure(&args, publisher, nodes, setup).await
        }
        Backend::Bus => {
            let connect = || -> anyhow::Result<BusSyncBus> {
                let client =
                    crate::client::Client::new(&url).with_context(|| format!("--url {url}"))?;
                Ok(BusSyncBus::new(client, &args.namespace))
            };
            let publisher = connect()?;
            if !publisher.is_healthy().await {
                bail!("no bus server answers at {url}");
            }
            let nodes = (0..n).map(|_| connect()).collect::<anyhow::Result<_>>()?;
            measure(&args, publisher, nodes, setup).await
        }
        Backend::Nats => nats(&args, &url, setup).await,
        Backend::Redis => redis(&args, &url, setup).await,
        Backend::Kafka => kafka(&args, &url, setup).await,
        Backend::Mesh => {
            let local = |peers: Vec<String>, zone: String| MeshOptions {
                bind: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                peers,
                heartbeat: Duration::from_millis(100),
                zone,
                simulated_loss: args.loss,
                ..MeshOptions::default()
            };
            let publisher = MeshSyncBus::new(local(Vec::new(), "publisher".into())).await?;
            let address = publisher.local_addr()?.to_string();
            let mut nodes = Vec::with_capacity(n);
            for i in 0..n {
                let options = local(vec![address.clone()], format!("node-{i}"));
                nodes.push(MeshSyncBus::new(options).await?);
            }
            // Every node must see all the others before the first publish.
            for (i, node) in std::iter::once(&publisher).chain(&nodes).enumerate() {
                if node.wait_for_peers(n, MESH_FORMING).await.is_err() {
                    bail!(
                        "the mesh did not form within {MESH_FORMING:?}: node {i} sees {} of \
                         the {n} others",
                        node.peers().len()
                    );
                }
            }
            let all: Vec<MeshSyncBus> =
                std::iter::once(&publisher).chain(&nodes).cloned().collect();
            measure(&args, publisher, nodes, setup).await?;
            let stats = all.iter().map(MeshSyncBus::stats);
            let sum = |field: fn(&crate::syncbus::MeshStats) -> u64| {
                stats.clone().map(|s| field(&s)).sum::<u64>()
            };
            print_report(
                args.json,
                "syncbus mesh datagrams (all nodes)",
                json!({
                    "loss": args.loss,
                    "data": sum(|s| s.data),
                    "retransmitted": sum(|s| s.retransmitted),
                    "acks": sum(|s| s.acks),
                    "heartbeats": sum(|s| s.heartbeats),
                    "dropped": sum(|s| s.dropped),
                }),
            );
            Ok(())
        }
    }
}

#[cfg(feature = "nats")]
async fn nats(args: &SyncbusBench, url: &str, setup: Instant) -> anyhow::Result<()> {
    use crate::syncbus::NatsSyncBus;
    let connect = || async {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        anyhow::Ok(NatsSyncBus::new(client, &args.namespace))
    };
    let publisher = connect().await?;
    let mut nodes = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        nodes.push(connect().await?);
    }
    measure(args, publisher, nodes, setup).await
}

#[cfg(not(feature = "nats"))]
async fn nats(_: &SyncbusBench, _: &str, _: Instant) -> anyhow::Result<()> {
    bail!("this bus was built without the nats feature")
}

#[cfg(feature = "redis")]
async fn redis(args: &SyncbusBench, url: &str, setup: Instant) -> anyhow::Result<()> {
    use crate::syncbus::RedisSyncBus;
    let connect = || async {
        let client = redis::Client::open(url).with_context(|| format!("--url {url}"))?;
        RedisSyncBus::new(client, &args.namespace)
            .await
            .with_context(|| format!("connecting to Redis at {url}"))
    };
    let publisher = connect().await?;
    let mut nodes = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        nodes.push(connect().await?);
    }
    measure(args, publisher, nodes, setup).await
}

#[cfg(not(feature = "redis"))]
async fn redis(_: &SyncbusBench, _: &str, _: Instant) -> anyhow::Result<()> {
    bail!("this bus was built without the redis feature")
}

#[cfg(feature = "kafka")]
async fn kafka(args: &SyncbusBench, url: &str, setup: Instant) -> anyhow::Result<()> {
    use crate::syncbus::KafkaSyncBus;
    let brokers: Vec<String> = url
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(str::to_owned)
        .collect();
    let connect = || async {
        KafkaSyncBus::new(brokers.clone(), &args.namespace)
            .await
            .with_context(|| format!("connecting to Kafka at {url}"))
    };
    let publisher = connect().await?;
    let mut nodes = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        nodes.push(connect().await?);
    }
    measure(args, publisher, nodes, setup).await
}

#[cfg(not(feature = "kafka"))]
async fn kafka(_: &SyncbusBench, _: &str, _: Instant) -> anyhow::Result<()> {
    bail!("this bus was built without the kafka feature")
}

/// The name of key `k`.
fn key_name(k: usize) -> String {
    format!("bench:{k}")
}

/// What every node's reader needs to check and time the events.
#[derive(Clone)]
struct Plan {
    /// This run's id, first in every scope: events of another run on the same server
    /// (same namespace) are not ours.
    run: Arc<str>,
    events: u64,
    keys: u64,
    /// The shared clock the publish times are read from.
    epoch: Instant,
    /// Every how many events a node keeps a latency.
    stride: u64,
    /// With --rate: the time between a lane's publishes.
    interval: Option<Duration>,
}

/// What one node's reader saw.
#[derive(Default)]
struct Seen {
    /// Distinct invalidations received.
    unique: u64,
    duplicates: u64,
    /// Received on another key than the event's.
    misrouted: u64,
    /// Not of this run (another run's, or without our scope).
    foreign: u64,
    latencies: Vec<Duration>,
    max_latency: Duration,
    /// When the last distinct invalidation arrived.
    last: Option<Instant>,
    /// Whether its subscriptions ended before the reader was stopped.
    ended: bool,
}

/// Subscribes every node to every key, publishes, reads, checks and reports.
async fn measure<B>(
    args: &SyncbusBench,
    publisher: B,
    nodes: Vec<B>,
    setup: Instant,
) -> anyhow::Result<()>
where
    B: SyncBus + Clone + 'static,
{
    let (events, keys, lanes) = (args.events, args.keys, args.concurrency);
    let per_node = (LATENCY_SAMPLES / nodes.len() as u64).max(1);
    let plan = Plan {
        run: run_id().into(),
        events,
        keys: keys as u64,
        epoch: Instant::now(),
        stride: events.div_ceil(per_node).max(1),
        interval: (args.rate > 0).then(|| Duration::from_secs_f64(lanes as f64 / args.rate as f64)),
    };

    // Subscribe every node to every key (nodes at once, a few keys at a time each).
    let subscribing = nodes.iter().enumerate().map(|(i, node)| async move {
        futures_util::stream::iter(0..keys)
            .map(|k| async move { node.subscribe(&key_name(k)).await })
            .buffered(16)
            .try_collect::<Vec<_>>()
            .await
            .with_context(|| format!("node {i} subscribing"))
    });
    let subscriptions = futures_util::future::try_join_all(subscribing).await?;
    let setup_elapsed = setup.elapsed();

    // One reader per node, running while the publisher publishes.
    let mut readers = Vec::with_capacity(nodes.len());
    for subscriptions in subscriptions {
        let progress = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = oneshot::channel::<()>();
        let merged = futures_util::stream::select_all(subscriptions);
        let task = tokio::spawn(read(merged, plan.clone(), Arc::clone(&progress), stopped));
        readers.push((progress, stop, task));
    }

    let started = Instant::now();
    let mut publishing = Vec::with_capacity(lanes);
    for lane in 0..lanes {
        let (publisher, plan) = (publisher.clone(), plan.clone());
        publishing.push(tokio::spawn(async move {
            publish_lane(&publisher, lane, lanes, &plan).await
        }));
    }
    for lane in publishing {
        lane.await.context("a publishing lane panicked")??;
    }
    let publish_elapsed = started.elapsed();

    // Wait for every node to have every invalidation, or for the deliveries to stall.
    let received = || -> Vec<u64> {
        readers
            .iter()
            .map(|(p, _, _)| p.load(Ordering::Relaxed))
            .collect()
    };
    let (mut last_total, mut last_progress) = (u64::MAX, Instant::now());
    let complete = loop {
        let counts = received();
        if counts.iter().all(|&c| c >= events) {
            break true;
        }
        if readers.iter().any(|(_, _, task)| task.is_finished()) {
            break false; // a node's subscriptions ended
        }
        let total: u64 = counts.iter().sum();
        if total != last_total {
            (last_total, last_progress) = (total, Instant::now());
        } else if last_progress.elapsed() >= STALL {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    if complete {
        tokio::time::sleep(SETTLE).await;
    }
    let mut seen = Vec::with_capacity(readers.len());
    for (_, stop, task) in readers {
        let _ = stop.send(());
        seen.push(task.await.context("a node's reader panicked")?);
    }

    let problems: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| s.unique < events || s.duplicates + s.misrouted > 0 || s.ended)
        .map(|(i, s)| {
            let mut problem = format!("node {i}: {} of {events} arrived", s.unique);
            if s.duplicates > 0 {
                problem += &format!(", {} duplicates", s.duplicates);
            }
            if s.misrouted > 0 {
                problem += &format!(", {} on the wrong key", s.misrouted);
            }
            if s.ended {
                problem += ", its subscriptions ended";
            }
            problem
        })
        .collect();
    if !problems.is_empty() {
        let waited = if complete {
            String::new()
        } else {
            format!(" (waited until nothing new arrived for {STALL:?} after the last publish)")
        };
        bail!(
            "{}: invalidations went missing or wrong: {}{waited}; the publisher handle \
             counts {} published, the nodes {} delivered",
            args.backend.name(),
            problems.join("; "),
            publisher.metrics().published,
            nodes.iter().map(|n| n.metrics().delivered).sum::<u64>(),
        );
    }

    let last_delivery = seen.iter().filter_map(|s| s.last).max().unwrap_or(started);
    let delivery_elapsed = last_delivery.saturating_duration_since(started);
    let deliveries = events * seen.len() as u64;
    let foreign: u64 = seen.iter().map(|s| s.foreign).sum();
    let max_latency = seen.iter().map(|s| s.max_latency).max().unwrap_or_default();
    let mut latencies: Vec<Duration> = seen.into_iter().flat_map(|s| s.latencies).collect();
    latencies.sort_unstable();
    let delivered: u64 = nodes.iter().map(|n| n.metrics().delivered).sum();
    print_report(
        args.json,
        "syncbus",
        json!({
            "backend": args.backend.name(),
            "subscribers": nodes.len(),
            "events": events,
            "keys": keys,
            "concurrency": lanes,
            "rate": args.rate,
            "setup_seconds": setup_elapsed.as_secs_f64(),
            "publish_seconds": publish_elapsed.as_secs_f64(),
            "published_per_sec": events as f64 / publish_elapsed.as_secs_f64(),
            "deliveries": deliveries,
            "delivery_seconds": delivery_elapsed.as_secs_f64(),
            "deliveries_per_sec": deliveries as f64 / delivery_elapsed.as_secs_f64(),
            "latency_p50_ms": ms(percentile(&latencies, 0.50)),
            "latency_p99_ms": ms(percentile(&latencies, 0.99)),
            "latency_max_ms": ms(max_latency),
            "latency_samples": latencies.len(),
            "publisher_published": publisher.metrics().published,
            "nodes_delivered": delivered,
            "foreign_events": foreign,
        }),
    );
    Ok(())
}

/// Publishes lane `lane`'s events one after another: those of the keys `lane`,
/// `lane + lanes`, … in each round of `keys` events.
async fn publish_lane<B: SyncBus>(
    publisher: &B,
    lane: usize,
    lanes: usize,
    plan: &Plan,
) -> anyhow::Result<()> {
    let keys = plan.keys as usize;
    // With --rate, the lanes take turns: lane j starts j/lanes of an interval late.
    let mut next = tokio::time::Instant::now()
        + plan
            .interval
            .unwrap_or_default()
            .mul_f64(lane as f64 / lanes as f64);
    let mut first = 0u64;
    while first < plan.events {
        for key in (lane..keys).step_by(lanes) {
            let seq = first + key as u64;
            if seq >= plan.events {
                break;
            }
            if let Some(interval) = plan.interval {
                tokio::time::sleep_until(next).await;
                next += interval;
            }
            let sent = plan.epoch.elapsed().as_nanos();
            let options = PublishOptions {
                region: None,
                scope: Some(format!("{}:{seq}:{sent}", plan.run)),
            };
            publisher
                .publish(&key_name(key), options)
                .await
                .with_context(|| format!("publishing invalidation {seq}"))?;
            // A publish that never waits (memory) must still let the readers run.
            tokio::task::coop::consume_budget().await;
        }
        first += plan.keys;
    }
    Ok(())
}

/// A node's reader: takes its events until stopped (or until its subscriptions end),
/// checking each and keeping its latency.
async fn read(
    events: impl Stream<Item = SyncEvent> + Unpin,
    plan: Plan,
    progress: Arc<AtomicU64>,
    stopped: oneshot::Receiver<()>,
) -> Seen {
    let mut seen = Seen::default();
    let mut arrived = vec![0u64; plan.events.div_ceil(64) as usize];
    let mut events = events.take_until(stopped);
    while let Some(event) = events.next().await {
        let now = plan.epoch.elapsed();
        let Some((seq, sent)) = event
            .options
            .scope
            .as_deref()
            .and_then(|scope| parse_scope(scope, &plan.run))
            .filter(|(seq, _)| *seq < plan.events)
        else {
            seen.foreign += 1;
            continue;
        };
        let key = event
            .key
            .strip_prefix("bench:")
            .and_then(|k| k.parse().ok());
        if key != Some(seq % plan.keys) {
            seen.misrouted += 1;
            continue;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if arrived[word] & bit != 0 {
            seen.duplicates += 1;
            continue;
        }
        arrived[word] |= bit;
        seen.unique += 1;
        seen.last = Some(plan.epoch + now);
        progress.fetch_add(1, Ordering::Relaxed);
        let latency = now.saturating_sub(Duration::from_nanos(sent));
        seen.max_latency = seen.max_latency.max(latency);
        if seq % plan.stride == 0 {
            seen.latencies.push(latency);
        }
    }
    seen.ended = !events.is_stopped();
    seen
}

/// The number and publish time of an event of run `run` (scope `run:seq:nanos`).
fn parse_scope(scope: &str, run: &str) -> Option<(u64, u64)> {
    let mut parts = scope.split(':');
    if parts.next()? != run {
        return None;
    }
    let seq = parts.next()?.parse().ok()?;
    let sent = parts.next()?.parse().ok()?;
    Some((seq, sent))
}

/// An id for this run: its process and start time.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}", std::process::id(), nanos)
}
