//! [`MeshSyncBus`]: the sync bus between nodes that talk to each other over UDP, with no
//! server in between.
//!
//! Nodes find each other through static peers (or a multicast group) and gossip, and
//! deliver every invalidation to every live member reliably: numbered datagrams,
//! acknowledged and retransmitted until acknowledged, handed to the application once.
//! See `node.rs` for the protocol and `wire.rs` for the datagrams.

mod node;
mod wire;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use self::node::{channel, Config, Node};
use self::wire::{Item, MAX_EVENT_TEXT};
use super::dispatch::Subscribers;
use super::{quorum, KeySubscription, Metrics, PublishOptions, SyncBus, SyncError, SyncEvent};

/// How a [`MeshSyncBus`] node runs. Nodes find each other through `peers` (any one live
/// member is enough: the others are learned from its heartbeats) or a multicast group.
///
/// ```
/// use std::time::Duration;
/// use bus::syncbus::MeshOptions;
///
/// let options = MeshOptions {
///     bind: "0.0.0.0:7946".parse().unwrap(),
///     peers: vec!["10.0.0.2:7946".into(), "cache-3.internal:7946".into()],
///     advertise: Some("10.0.0.1:7946".parse().unwrap()),
///     zone: "eu-west-1a".into(),
///     ..MeshOptions::default()
/// };
/// assert_eq!(options.heartbeat, Duration::from_secs(1));
/// ```
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// The UDP address to listen on (`0.0.0.0:7946` by default; port 0 picks a free one).
    pub bind: SocketAddr,
    /// Static peers (`host:port`), contacted at every heartbeat until they answer: how a
    /// node joins on a network without multicast. Names are looked up each time.
    pub peers: Vec<String>,
    /// A multicast group to announce this node on and listen to (none by default).
    pub multicast: Option<MeshMulticast>,
    /// The address other nodes reach this one at, if not the bound one (behind NAT, or
    /// bound to `0.0.0.0`: then peers use the address its datagrams come from).
    pub advertise: Option<SocketAddr>,
    /// How often a node heartbeats each member (1 s by default).
    pub heartbeat: Duration,
    /// How long a member may go unheard before it is dropped (5 s by default). What was
    /// queued for it goes with it.
    pub dead_after: Duration,
    /// The zone of this node, which it acknowledges with for
    /// [`SyncBus::publish_and_await_topology`] (`default` by default).
    pub zone: String,
    /// For tests: the share of outgoing datagrams (of every kind) dropped on purpose, to
    /// see delivery hold under loss. 0 by default.
    pub simulated_loss: f64,
}

/// A multicast group a mesh node joins on an interface, to be found without static peers.
///
/// ```
/// use std::net::Ipv4Addr;
/// use bus::syncbus::{MeshMulticast, MeshOptions};
///
/// let options = MeshOptions {
///     multicast: Some(MeshMulticast {
///         group: Ipv4Addr::new(239, 1, 2, 3),
///         interface: Ipv4Addr::UNSPECIFIED,
///     }),
///     ..MeshOptions::default()
/// };
/// assert!(options.peers.is_empty());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshMulticast {
    /// The group (`239.0.0.0/8` is for local use). Its port is the node's.
    pub group: Ipv4Addr,
    /// The interface's address, or `0.0.0.0` for the system's choice.
    pub interface: Ipv4Addr,
}

/// What a [`MeshSyncBus`] node sent since it started, by kind of datagram: the price of
/// its reliability (acknowledgements, retransmissions) beside its data.
///
/// ```
/// use bus::syncbus::{MeshOptions, MeshSyncBus, PublishOptions, SyncBus};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let options = MeshOptions { bind: "127.0.0.1:0".parse()?, ..MeshOptions::default() };
/// let alone = MeshSyncBus::new(options).await?;
/// alone.publish("user:42", PublishOptions::default()).await?;
/// // No other member: nothing to send it to.
/// assert_eq!(alone.stats().data, 0);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// `Data` datagrams sent the first time (each carries one or more items).
    pub data: u64,
    /// `Data` datagrams sent again, unacknowledged after their timeout.
    pub retransmitted: u64,
    /// `Ack` datagrams sent.
    pub acks: u64,
    /// Heartbeats sent.
    pub heartbeats: u64,
    /// Datagrams of any kind dropped by [`MeshOptions::simulated_loss`].
    pub dropped: u64,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            bind: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7946)),
            peers: Vec::new(),
            multicast: None,
            advertise: None,
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
            zone: "default".into(),
            simulated_loss: 0.0,
        }
    }
}

/// A node of a sync bus carried peer to peer over UDP: no server. Every invalidation
/// reaches every live member even when datagrams are lost (they are acknowledged and
/// sent again), and reaches each subscription once. A quorum or topology wait counts
/// the subscriptions (or zones) of the members that handed it out, this node's own
/// included. An invalidation's key, region and scope must fit one datagram together
/// (1,148 bytes), else [`SyncError::TooLarge`].
///
/// A publish returns once the invalidation is queued for every live member and handed to
/// this node's subscriptions, so publishes are not coalesced. Clones are the same node;
/// it stops when the last clone and subscription are dropped. A subscription whose
/// reader stops reading holds up what its node receives: the other members then queue
/// for it (their publishes wait once a queue is full), and past
/// [`MeshOptions::dead_after`] the stalled node drops them, with what it had queued.
///
/// ```
/// use std::time::Duration;
/// use bus::syncbus::{MeshOptions, MeshSyncBus, PublishOptions, SyncBus};
/// use futures_util::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let local = |peers: Vec<String>| MeshOptions {
///     bind: "127.0.0.1:0".parse().unwrap(),
///     peers,
///     heartbeat: Duration::from_millis(100),
///     ..MeshOptions::default()
/// };
/// let first = MeshSyncBus::new(local(vec![])).await?;
/// let second = MeshSyncBus::new(local(vec![first.local_addr()?.to_string()])).await?;
/// second.wait_for_peers(1, Duration::from_secs(5)).await?;
/// first.wait_for_peers(1, Duration::from_secs(5)).await?;
///
/// let mut invalidations = first.subscribe("user:42").await?;
/// second.publish("user:42", PublishOptions::default()).await?;
/// let event = invalidations.next().await.ok_or("subscription ended")?;
/// assert_eq!(event.key, "user:42");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MeshSyncBus {
    node: Arc<Node>,
    delivered: Arc<std::sync::atomic::AtomicU64>,
    publish_timeout: Duration,
}

impl MeshSyncBus {
    /// Starts a node: binds its socket (failing with [`SyncError::Backend`] if it
    /// cannot) and starts heartbeating its static peers. It does not wait for them: see
    /// [`MeshSyncBus::wait_for_peers`].
    ///
    /// ```
    /// use bus::syncbus::{MeshOptions, MeshSyncBus, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let options = MeshOptions { bind: "127.0.0.1:0".parse()?, ..MeshOptions::default() };
    /// let node = MeshSyncBus::new(options).await?;
    /// assert!(node.is_healthy().await);
    /// assert!(node.peers().is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn new(options: MeshOptions) -> Result<MeshSyncBus, SyncError> {
        if !(0.0..=1.0).contains(&options.simulated_loss) {
            return Err(SyncError::Backend(format!(
                "mesh: simulated_loss is a share between 0 and 1, not {}",
                options.simulated_loss
            )));
        }
        let delivered = Arc::default();
        let subscribers = Arc::new(Subscribers::new(Arc::clone(&delivered)));
        let config = Config {
            bind: options.bind,
            peers: options.peers,
            multicast: options.multicast.map(|m| (m.group, m.interface)),
            advertise: options.advertise,
            heartbeat: options.heartbeat,
            dead_after: options.dead_after,
            zone: options.zone,
            loss: options.simulated_loss,
        };
        Ok(MeshSyncBus {
            node: Arc::new(Node::start(config, subscribers).await?),
            delivered,
            publish_timeout: Duration::from_secs(5),
        })
    }

    /// The address the node's socket is bound to (with the port picked, if it was 0).
    ///
    /// ```
    /// use bus::syncbus::{MeshOptions, MeshSyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let options = MeshOptions { bind: "127.0.0.1:0".parse()?, ..MeshOptions::default() };
    /// let node = MeshSyncBus::new(options).await?;
    /// assert_ne!(node.local_addr()?.port(), 0);
    /// # Ok(()) }
    /// ```
    pub fn local_addr(&self) -> Result<SocketAddr, SyncError> {
        self.node.inner.local_addr()
    }

    /// Waits until at least `count` other nodes are live members, or fails with
    /// [`SyncError::Timeout`] after `timeout`: for a node that should not publish before
    /// the mesh has formed.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus::syncbus::{MeshOptions, MeshSyncBus, SyncError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let options = MeshOptions { bind: "127.0.0.1:0".parse()?, ..MeshOptions::default() };
    /// let alone = MeshSyncBus::new(options).await?;
    /// let wait = alone.wait_for_peers(1, Duration::from_millis(50)).await;
    /// assert_eq!(wait, Err(SyncError::Timeout(Duration::from_millis(50))));
    /// # Ok(()) }
    /// ```
    pub async fn wait_for_peers(&self, count: usize, timeout: Duration) -> Result<(), SyncError> {
        let deadline = Instant::now() + timeout;
        while self.node.inner.peers().len() < count {
            if Instant::now() >= deadline {
                return Err(SyncError::Timeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// What this node sent so far, by kind of datagram.
    ///
    /// ```
    /// use bus::syncbus::{MeshOptions, MeshSyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let options = MeshOptions { bind: "127.0.0.1:0".parse()?, ..MeshOptions::default() };
    /// let node = MeshSyncBus::new(options).await?;
    /// assert_eq!(node.stats().retransmitted, 0);
    /// # Ok(()) }
    /// ```
    pub fn stats(&self) -> MeshStats {
        let counts = &self.node.inner.counts;
        let read = |count: &std::sync::atomic::AtomicU64| count.load(Ordering::Relaxed);
        MeshStats {
            data: read(&counts.data),
            retransmitted: read(&counts.retransmitted),
            acks: read(&counts.acks),
            heartbeats: read(&counts.heartbeats),
            dropped: read(&counts.dropped),
        }
    }

    /// The longest a publish may wait for room in a member's queue (5 s by default)
    /// before it fails with [`SyncError::Timeout`]; a member that stopped acknowledging
    /// fills its queue, until it is dropped.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus::syncbus::{MeshOptions, MeshSyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let options = MeshOptions { bind: "127.0.0.1:0".parse()?, ..MeshOptions::default() };
    /// let node = MeshSyncBus::new(options).await?.with_publish_timeout(Duration::from_secs(1));
    /// # Ok(()) }
    /// ```
    pub fn with_publish_timeout(mut self, timeout: Duration) -> MeshSyncBus {
        self.publish_timeout = timeout;
        self
    }

    /// Sends an invalidation (or revocation) to every live member and this node's own
    /// subscriptions; how many of those took it.
    async fn send(
        &self,
        kind: u8,
        key: &str,
        options: PublishOptions,
        request: u64,
    ) -> Result<usize, SyncError> {
        let size = key.len()
            + options.region.as_ref().map_or(0, String::len)
            + options.scope.as_ref().map_or(0, String::len);
        if size > MAX_EVENT_TEXT {
            return Err(SyncError::TooLarge {
                size,
                limit: MAX_EVENT_TEXT,
            });
        }
        let event = SyncEvent {
            key: key.to_owned(),
            options,
        };
        let inner = &self.node.inner;
        let item = Item::Invalidation {
            kind,
            request,
            event,
        };
        inner.broadcast(&item, self.publish_timeout).await?;
        inner.published.fetch_add(1, Ordering::Relaxed);
        let Item::Invalidation { event, .. } = item else {
            return Ok(0);
        };
        Ok(inner.subscribers.deliver(&channel(kind, key), &event).await)
    }

    /// Publishes with a quorum wait and counts the answers: (subscriptions, zones).
    async fn counted(
        &self,
        key: &str,
        enough: impl Fn(usize, usize) -> bool,
        timeout: Duration,
    ) -> Result<(usize, usize), SyncError> {
        let inner = &self.node.inner;
        let deadline = Instant::now() + timeout;
        let (request, changed) = inner.wait();
        let counts = async {
            let here = self
                .send(b'k', key, PublishOptions::default(), request)
                .await?;
            inner.count(request, here, &inner.zone);
            Ok(inner
                .await_counts(request, &changed, enough, deadline)
                .await)
        }
        .await;
        inner.end_wait(request);
        counts
    }

    fn subscribe_to(&self, kind: u8, key: &str) -> KeySubscription {
        let fed = self.node.inner.subscribers.add(&channel(kind, key), None);
        // The subscription keeps the node running.
        KeySubscription::new(fed.events, (fed.registration, Arc::clone(&self.node)))
    }
}

impl SyncBus for MeshSyncBus {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), SyncError> {
        self.send(b'k', key, options, 0).await.map(drop)
    }

    async fn publish_and_await(
        &self,
        key: &str,
        replicas: usize,
        timeout: Duration,
    ) -> Result<(), SyncError> {
        let (subscriptions, _) = self.counted(key, |n, _| n >= replicas, timeout).await?;
        quorum(subscriptions, replicas)
    }

    async fn publish_and_await_topology(
        &self,
        key: &str,
        min_zones: usize,
        timeout: Duration,
    ) -> Result<(), SyncError> {
        let (_, zones) = self.counted(key, |_, z| z >= min_zones, timeout).await?;
        quorum(zones, min_zones)
    }

    async fn subscribe(&self, key: &str) -> Result<KeySubscription, SyncError> {
        Ok(self.subscribe_to(b'k', key))
    }

    async fn revoke_lease(&self, id: &str) -> Result<(), SyncError> {
        self.send(b'l', id, PublishOptions::default(), 0)
            .await
            .map(drop)
    }

    async fn subscribe_lease(&self, id: &str) -> Result<KeySubscription, SyncError> {
        Ok(self.subscribe_to(b'l', id))
    }

    fn metrics(&self) -> Metrics {
        Metrics {
            published: self.node.inner.published.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
        }
    }

    async fn is_healthy(&self) -> bool {
        self.node.is_running()
    }

    fn peers(&self) -> Vec<String> {
        self.node.inner.peers()
    }
}
