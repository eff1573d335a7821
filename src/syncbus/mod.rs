//! The sync bus: how application nodes propagate cache invalidations to each other.
//!
//! A node that changes a key publishes an invalidation for it; every other node
//! subscribed to the key drops its local copy. [`SyncBus`] is the interface applications
//! program against. [`InMemoryBus`] serves tests and single-process use; [`BusSyncBus`]
//! runs it over a `bus` server, where quorum and topology waits are the server's
//! confirmations; [`MeshSyncBus`] runs it peer to peer over UDP, with no server at all;
//! `NatsSyncBus`, `RedisSyncBus` and `KafkaSyncBus` (cargo features `nats`, `redis` and
//! `kafka`) run it over NATS and Redis pub/sub and a Kafka topic.
//!
//! # Adaptive batching
//!
//! The NATS, Redis and Kafka backends batch bursts: while a handle publishes more than
//! [`BatchOptions::threshold`] invalidations per second, they are gathered into batches
//! that each go as one message, gzip-compressed (on NATS and Redis, the gzip of their
//! JSON array on the bus's `batch` subject or channel; on Kafka, one produce request of
//! gzip-compressed records). A batch gathers while the one before it is on its way, and
//! for [`BatchOptions::window`] at most, so a publish waits for about one send. Below
//! the threshold nothing waits. Receivers hand out a batch's invalidations in order. The mesh
//! packs whatever is queued for a member into each datagram, which batches bursts with no
//! wait at all.
//!
//! ```
//! use std::time::Duration;
//! use bus::syncbus::{InMemoryBus, PublishOptions, SyncBus};
//! use futures_util::StreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let hub = InMemoryBus::new();
//! let (node_a, node_b) = (hub.node("eu-1"), hub.node("us-1"));
//! let mut invalidations = node_b.subscribe("user:42").await?;
//! node_a.publish("user:42", PublishOptions::default()).await?;
//! let event = invalidations.next().await.ok_or("subscription ended")?;
//! assert_eq!(event.key, "user:42");
//! // Both zones hold a subscriber of this key on another publish:
//! let _also = node_a.subscribe("user:42").await?;
//! node_a.publish_and_await_topology("user:42", 2, Duration::from_secs(1)).await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod batching;
mod bus;
mod dispatch;
#[cfg(feature = "kafka")]
mod kafka_bus;
mod memory;
mod mesh;
#[cfg(feature = "nats")]
mod nats_bus;
#[cfg(feature = "redis")]
mod redis_bus;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use self::batching::BatchOptions;
pub use self::bus::BusSyncBus;
#[cfg(feature = "kafka")]
pub use self::kafka_bus::KafkaSyncBus;
pub use self::memory::InMemoryBus;
pub use self::mesh::{MeshMulticast, MeshOptions, MeshStats, MeshSyncBus};
#[cfg(feature = "nats")]
pub use self::nats_bus::NatsSyncBus;
#[cfg(feature = "redis")]
pub use self::redis_bus::RedisSyncBus;

/// Where an invalidation applies, as the publisher says (both optional). Subscribers
/// receive it unchanged in [`SyncEvent::options`]; the bus itself does not filter on it.
///
/// ```
/// use bus::syncbus::{InMemoryBus, PublishOptions, SyncBus};
/// use futures_util::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let hub = InMemoryBus::new();
/// let (eu, us) = (hub.node("eu"), hub.node("us"));
/// let mut invalidations = us.subscribe("user:42").await?;
/// let options = PublishOptions {
///     region: Some("eu-west".into()),
///     scope: Some("profile".into()),
/// };
/// eu.publish("user:42", options.clone()).await?;
/// let event = invalidations.next().await.ok_or("subscription ended")?;
/// assert_eq!(event.options, options);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOptions {
    /// The region the change concerns (`eu-west`, say), for subscribers that care.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// What part of the cached value changed (`profile`, say), for subscribers that
    /// invalidate selectively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// An invalidation as subscribers receive it. The remote backends carry it as this JSON:
/// the key, with the options beside it and left out when absent.
///
/// ```
/// use bus::syncbus::{PublishOptions, SyncEvent};
///
/// # fn main() -> Result<(), serde_json::Error> {
/// let event = SyncEvent {
///     key: "user:42".into(),
///     options: PublishOptions {
///         region: Some("eu-west".into()),
///         scope: None,
///     },
/// };
/// let json = serde_json::to_string(&event)?;
/// assert_eq!(json, r#"{"key":"user:42","region":"eu-west"}"#);
/// assert_eq!(serde_json::from_str::<SyncEvent>(&json)?, event);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncEvent {
    /// The key (or, for a lease, the lease id).
    pub key: String,
    /// The publisher's options (none for quorum and topology publishes and for leases).
    #[serde(flatten)]
    pub options: PublishOptions,
}

/// Published and delivered counts of one bus handle, since it was made; its clones share
/// them.
///
/// ```
/// use bus::syncbus::{InMemoryBus, Metrics, PublishOptions, SyncBus};
/// use futures_util::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let hub = InMemoryBus::new();
/// let (eu, us) = (hub.node("eu"), hub.node("us"));
/// let mut invalidations = us.subscribe("user:42").await?;
/// eu.publish("user:42", PublishOptions::default()).await?;
/// invalidations.next().await.ok_or("subscription ended")?;
/// assert_eq!(eu.metrics(), Metrics { published: 1, delivered: 0 });
/// assert_eq!(us.metrics(), Metrics { published: 0, delivered: 1 });
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Messages this handle sent: invalidations (a coalesced burst counts the ones
    /// actually sent; a batch, each it carries), quorum and topology publishes, and lease
    /// revocations.
    pub published: u64,
    /// Events this handle's subscriptions (of keys and leases) handed to their readers.
    pub delivered: u64,
}

/// Why a sync-bus operation failed.
///
/// ```
/// use std::time::Duration;
/// use bus::syncbus::{InMemoryBus, SyncBus, SyncError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), SyncError> {
/// let hub = InMemoryBus::new();
/// let (eu, us) = (hub.node("eu"), hub.node("us"));
/// let _subscribed = us.subscribe("user:42").await?;
/// let result = eu.publish_and_await("user:42", 2, Duration::from_secs(1)).await;
/// let error = SyncError::QuorumNotSatisfied { acknowledged: 1, required: 2 };
/// assert_eq!(result, Err(error.clone()));
/// assert_eq!(error.to_string(), "quorum not satisfied: 1 of 2 acknowledged");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// Fewer subscribers (or zones) than required acknowledged in time. The invalidation
    /// was still published: those that acknowledged have it.
    #[error("quorum not satisfied: {acknowledged} of {required} acknowledged")]
    QuorumNotSatisfied {
        /// How many subscribers (for a topology wait: distinct zones) acknowledged.
        acknowledged: usize,
        /// How many the caller asked for.
        required: usize,
    },
    /// This backend cannot count acknowledgements honestly (Redis, Kafka), so it does not
    /// wait for them. Nothing was published.
    #[error("this bus cannot wait for acknowledgements")]
    QuorumUnsupported,
    /// The invalidation is larger than the backend carries: on [`MeshSyncBus`], its key,
    /// region and scope must fit one datagram. Nothing was published.
    #[error("an invalidation of {size} bytes is too large: this bus carries at most {limit} bytes of key, region and scope")]
    TooLarge {
        /// The bytes of key, region and scope together.
        size: usize,
        /// The most this bus carries.
        limit: usize,
    },
    /// The backend did not answer within the publish timeout (the duration given). The
    /// invalidation may or may not have gone out.
    #[error("the bus did not answer within {0:?}")]
    Timeout(Duration),
    /// The backend failed (unreachable, refused the request, …); the message says how.
    #[error("{0}")]
    Backend(String),
}

/// The operations of a sync bus, the same for every backend (the conformance tests hold
/// them to it). Program against it with generics (`impl SyncBus`): its methods return
/// futures, so it cannot be a `dyn` object.
///
/// ```
/// use bus::syncbus::{InMemoryBus, PublishOptions, SyncBus, SyncError};
/// use futures_util::StreamExt;
///
/// /// Saves a user, then tells the other nodes to drop their copy.
/// async fn save_user(bus: &impl SyncBus, id: u64) -> Result<(), SyncError> {
///     // … write to the database …
///     bus.publish(&format!("user:{id}"), PublishOptions::default()).await
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let hub = InMemoryBus::new();
/// let (eu, us) = (hub.node("eu"), hub.node("us"));
/// let mut invalidations = us.subscribe("user:42").await?;
/// save_user(&eu, 42).await?;
/// let event = invalidations.next().await.ok_or("subscription ended")?;
/// assert_eq!(event.key, "user:42");
/// # Ok(()) }
/// ```
pub trait SyncBus: Send + Sync {
    /// Publishes an invalidation of `key` with `options` to every subscription of the key
    /// (this node's own included), and returns once the backend has taken it — not once
    /// subscribers have it. While a publish of a key is on its way, further publishes of
    /// it return at once and make it publish once more when done, so the last change is
    /// announced after it happened and a burst costs two messages. Fails with
    /// [`SyncError::Timeout`] if the backend does not answer within the publish timeout,
    /// [`SyncError::TooLarge`] if it cannot carry the invalidation (the mesh),
    /// [`SyncError::Backend`] if it fails.
    ///
    /// ```
    /// use bus::syncbus::{InMemoryBus, PublishOptions, SyncBus};
    /// use futures_util::StreamExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = InMemoryBus::new();
    /// let (eu, us) = (hub.node("eu"), hub.node("us"));
    /// let mut invalidations = us.subscribe("cart:7").await?;
    /// eu.publish("cart:7", PublishOptions::default()).await?;
    /// let event = invalidations.next().await.ok_or("subscription ended")?;
    /// assert_eq!(event.key, "cart:7");
    /// # Ok(()) }
    /// ```
    fn publish(
        &self,
        key: &str,
        options: PublishOptions,
    ) -> impl std::future::Future<Output = Result<(), SyncError>> + Send;

    /// Publishes an invalidation of `key` (without options, and not coalesced) and returns
    /// once `replicas` subscriptions have acknowledged it, that is handed it to their
    /// readers. Fails with [`SyncError::QuorumNotSatisfied`] (saying how many did) if
    /// fewer have after `timeout`, [`SyncError::QuorumUnsupported`] on a backend that
    /// cannot count them, and as [`SyncBus::publish`] does if the backend fails.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus::syncbus::{InMemoryBus, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = InMemoryBus::new();
    /// let (writer, reader_1, reader_2) = (hub.node("eu"), hub.node("eu"), hub.node("us"));
    /// let _first = reader_1.subscribe("price:9").await?;
    /// let _second = reader_2.subscribe("price:9").await?;
    /// // Returns once both readers have the invalidation.
    /// writer.publish_and_await("price:9", 2, Duration::from_secs(1)).await?;
    /// # Ok(()) }
    /// ```
    fn publish_and_await(
        &self,
        key: &str,
        replicas: usize,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<(), SyncError>> + Send;

    /// As [`SyncBus::publish_and_await`], but counts the distinct zones of the
    /// acknowledging subscriptions (each subscription is in its node's zone) and returns
    /// once there are `min_zones`; [`SyncError::QuorumNotSatisfied`] then counts zones.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus::syncbus::{InMemoryBus, SyncBus, SyncError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = InMemoryBus::new();
    /// let (eu, us) = (hub.node("eu"), hub.node("us"));
    /// let _in_eu = eu.subscribe("price:9").await?;
    /// let _in_us = us.subscribe("price:9").await?;
    /// let timeout = Duration::from_secs(1);
    /// eu.publish_and_await_topology("price:9", 2, timeout).await?;
    /// assert_eq!(
    ///     eu.publish_and_await_topology("price:9", 3, timeout).await,
    ///     Err(SyncError::QuorumNotSatisfied { acknowledged: 2, required: 3 })
    /// );
    /// # Ok(()) }
    /// ```
    fn publish_and_await_topology(
        &self,
        key: &str,
        min_zones: usize,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<(), SyncError>> + Send;

    /// Subscribes to the invalidations of exactly `key` (its characters have no special
    /// meaning: `user:*` is one key, not a pattern). Every invalidation published after
    /// this returns is delivered; dropping the subscription (or calling
    /// [`KeySubscription::unsubscribe`]) ends it. Fails as [`SyncBus::publish`] does if
    /// the backend does.
    ///
    /// ```
    /// use bus::syncbus::{InMemoryBus, PublishOptions, SyncBus};
    /// use futures_util::StreamExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = InMemoryBus::new();
    /// let node = hub.node("eu");
    /// let mut invalidations = node.subscribe("user:42").await?;
    /// hub.node("us").publish("user:42", PublishOptions::default()).await?;
    /// if let Some(event) = invalidations.next().await {
    ///     assert_eq!(event.key, "user:42"); // drop the cached user 42 here
    /// }
    /// # Ok(()) }
    /// ```
    fn subscribe(
        &self,
        key: &str,
    ) -> impl std::future::Future<Output = Result<KeySubscription, SyncError>> + Send;

    /// Revokes lease `id`: each of its subscriptions receives one event whose key is
    /// `id`. Leases are apart from keys: subscribers of a key named `id` receive nothing.
    /// Fails as [`SyncBus::publish`] does.
    ///
    /// ```
    /// use bus::syncbus::{InMemoryBus, SyncBus};
    /// use futures_util::StreamExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = InMemoryBus::new();
    /// let (eu, us) = (hub.node("eu"), hub.node("us"));
    /// let mut revocations = us.subscribe_lease("session-7").await?;
    /// eu.revoke_lease("session-7").await?;
    /// let revoked = revocations.next().await.ok_or("subscription ended")?;
    /// assert_eq!(revoked.key, "session-7");
    /// # Ok(()) }
    /// ```
    fn revoke_lease(
        &self,
        id: &str,
    ) -> impl std::future::Future<Output = Result<(), SyncError>> + Send;

    /// Subscribes to the revocations of lease `id`, as [`SyncBus::subscribe`] does to
    /// the invalidations of a key.
    ///
    /// ```
    /// use bus::syncbus::{InMemoryBus, SyncBus};
    /// use futures_util::StreamExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = InMemoryBus::new();
    /// let node = hub.node("eu");
    /// let mut revocations = node.subscribe_lease("session-7").await?;
    /// hub.node("us").revoke_lease("session-7").await?;
    /// if let Some(revoked) = revocations.next().await {
    ///     assert_eq!(revoked.key, "session-7"); // drop what the session held here
    /// }
    /// # Ok(()) }
    /// ```
    fn subscribe_lease(
        &self,
        id: &str,
    ) -> impl std::future::Future<Output = Result<KeySubscription, SyncError>> + Send;

    /// Ends a lease subscription: the same as dropping it or calling
    /// [`KeySubscription::unsubscribe`], under the name the seeds' `Bus` interface gives
    /// it. The backend stops delivering to it at once.
    ///
    /// ```
    /// use bus::syncbus::{InMemoryBus, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = InMemoryBus::new();
    /// let node = hub.node("eu");
    /// let revocations = node.subscribe_lease("session-7").await?;
    /// node.unsubscribe_lease(revocations);
    /// hub.node("us").revoke_lease("session-7").await?;
    /// assert_eq!(node.metrics().delivered, 0);
    /// # Ok(()) }
    /// ```
    fn unsubscribe_lease(&self, subscription: KeySubscription) {
        subscription.unsubscribe();
    }

    /// This handle's counts so far (see [`Metrics`]).
    ///
    /// ```
    /// use bus::syncbus::{InMemoryBus, Metrics, PublishOptions, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let node = InMemoryBus::new().node("eu");
    /// assert_eq!(node.metrics(), Metrics::default());
    /// node.publish("user:42", PublishOptions::default()).await?;
    /// node.revoke_lease("session-7").await?;
    /// assert_eq!(node.metrics().published, 2);
    /// # Ok(()) }
    /// ```
    fn metrics(&self) -> Metrics;

    /// Whether the backend answers now: always for [`InMemoryBus`]; for a remote backend,
    /// whether the server answers a health check (`bus`: `GET /health`; Redis: `PING`;
    /// Kafka: a metadata request; within the publish timeout) or the connection is up
    /// (NATS); for [`MeshSyncBus`], whether its socket's tasks run. Never fails.
    ///
    /// ```
    /// use bus::syncbus::{InMemoryBus, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let node = InMemoryBus::new().node("eu");
    /// assert!(node.is_healthy().await);
    /// # }
    /// ```
    fn is_healthy(&self) -> impl std::future::Future<Output = bool> + Send;

    /// The other parties this handle exchanges invalidations through or with, sorted:
    ///
    /// - [`InMemoryBus`]: the zones of the hub's other live nodes (those made by
    ///   [`InMemoryBus::node`] and not yet dropped, this node and its clones excepted),
    ///   each zone once.
    /// - [`BusSyncBus`]: the address of its server (`http://host:port`).
    /// - `NatsSyncBus`: the server it is connected to and the other servers of its
    ///   cluster, as they announce themselves (`nats://host:port`).
    /// - `RedisSyncBus`: the Redis server it connects to (`redis://host:port`, without
    ///   database or password).
    /// - `KafkaSyncBus`: the brokers it was given (`kafka://host:port`).
    /// - [`MeshSyncBus`]: the addresses of the live members (`host:port`), this node
    ///   excepted.
    ///
    /// ```
    /// use bus::syncbus::{InMemoryBus, SyncBus};
    ///
    /// let hub = InMemoryBus::new();
    /// let (eu, us, us_2) = (hub.node("eu"), hub.node("us"), hub.node("us"));
    /// assert_eq!(eu.peers(), ["us"]);
    /// assert_eq!(us.peers(), ["eu", "us"]);
    /// drop((us, us_2));
    /// assert!(eu.peers().is_empty());
    /// ```
    fn peers(&self) -> Vec<String>;
}

/// A stream of [`SyncEvent`]s for one key or lease, from [`SyncBus::subscribe`] or
/// [`SyncBus::subscribe_lease`]. Dropping it unsubscribes. It buffers up to 1024 events;
/// a reader further behind makes a remote backend wait, and misses events on
/// [`InMemoryBus`] (which then does not count them as acknowledged). The stream ends
/// only if the backend ends it (its connection closed for good). It outlives the handle
/// that made it.
///
/// ```
/// use std::collections::HashMap;
/// use bus::syncbus::{InMemoryBus, PublishOptions, SyncBus};
/// use futures_util::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let hub = InMemoryBus::new();
/// let (eu, us) = (hub.node("eu"), hub.node("us"));
/// let mut cache = HashMap::from([("user:42".to_owned(), "Ada")]);
/// let mut invalidations = us.subscribe("user:42").await?;
/// eu.publish("user:42", PublishOptions::default()).await?;
/// if let Some(event) = invalidations.next().await {
///     cache.remove(&event.key);
/// }
/// assert!(cache.is_empty());
/// # Ok(()) }
/// ```
pub struct KeySubscription {
    events: mpsc::Receiver<SyncEvent>,
    /// Dropped with the subscription: unregisters it from its backend.
    _registration: Box<dyn Send + Sync>,
}

impl KeySubscription {
    fn new(events: mpsc::Receiver<SyncEvent>, registration: impl Send + Sync + 'static) -> Self {
        KeySubscription {
            events,
            _registration: Box::new(registration),
        }
    }

    /// Ends the subscription, the same as dropping it: from then on it neither receives
    /// nor acknowledges invalidations.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus::syncbus::{InMemoryBus, SyncBus, SyncError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), SyncError> {
    /// let hub = InMemoryBus::new();
    /// let (eu, us) = (hub.node("eu"), hub.node("us"));
    /// let subscription = us.subscribe("user:42").await?;
    /// subscription.unsubscribe();
    /// assert_eq!(
    ///     eu.publish_and_await("user:42", 1, Duration::from_millis(100)).await,
    ///     Err(SyncError::QuorumNotSatisfied { acknowledged: 0, required: 1 })
    /// );
    /// # Ok(()) }
    /// ```
    pub fn unsubscribe(self) {}
}

impl Stream for KeySubscription {
    type Item = SyncEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SyncEvent>> {
        self.events.poll_recv(cx)
    }
}

/// Events a subscription may hold before a slow reader makes its backend wait.
const SUBSCRIPTION_BUFFER: usize = 1024;

/// What every remote backend's handle shares with its clones: its publish coalescing and
/// its counts.
#[derive(Default)]
pub(crate) struct BackendState {
    pub(crate) coalescer: Coalescer,
    pub(crate) published: std::sync::atomic::AtomicU64,
    /// Shared with the tasks that hand events to subscribers.
    pub(crate) delivered: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl BackendState {
    pub(crate) fn metrics(&self) -> Metrics {
        use std::sync::atomic::Ordering::Relaxed;
        Metrics {
            published: self.published.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
        }
    }
}

/// Coalesces publishes of a key: while one is on its way, further ones return at once and
/// make it send once more when it is done (so the last change is always announced after
/// it happened, and a burst costs two messages, not N).
#[derive(Default)]
pub(crate) struct Coalescer {
    /// Keys being published, and whether another publish of them came meanwhile.
    in_flight: Mutex<HashMap<String, bool>>,
}

impl Coalescer {
    pub(crate) async fn publish<F, Fut>(&self, key: &str, send: F) -> Result<(), SyncError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), SyncError>>,
    {
        {
            let mut in_flight = self.lock();
            if let Some(again) = in_flight.get_mut(key) {
                *again = true;
                return Ok(());
            }
            in_flight.insert(key.to_owned(), false);
        }
        // Removes the key however this ends, a cancelled publish included.
        let _in_flight = InFlight {
            coalescer: self,
            key,
        };
        loop {
            send().await?;
            let mut in_flight = self.lock();
            match in_flight.get_mut(key) {
                Some(again) if *again => *again = false,
                _ => return Ok(()),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, bool>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct InFlight<'a> {
    coalescer: &'a Coalescer,
    key: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.coalescer.lock().remove(self.key);
    }
}

/// The subject (or channel) segment of a key (`k`) or lease (`l`): the hex of its UTF-8,
/// so that any text maps to a valid name and back.
pub(crate) fn encoded(kind: char, key: &str) -> String {
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{kind}{hex}")
}

/// The JSON the remote backends carry for an invalidation of `key` (or a lease's
/// revocation): a [`SyncEvent`].
pub(crate) fn event_json(key: &str, options: PublishOptions) -> Result<String, SyncError> {
    serde_json::to_string(&SyncEvent {
        key: key.to_owned(),
        options,
    })
    .map_err(|e| SyncError::Backend(format!("encoding the event: {e}")))
}

/// `address` as a URL: as it is if it has a scheme, else with `scheme`.
#[cfg(any(feature = "nats", feature = "kafka"))]
pub(crate) fn with_scheme(scheme: &str, address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("{scheme}://{address}")
    }
}

/// Whether `acknowledged` (subscriptions or zones) reach `required`: how a quorum or
/// topology wait that counted answers ends.
pub(crate) fn quorum(acknowledged: usize, required: usize) -> Result<(), SyncError> {
    if acknowledged >= required {
        Ok(())
    } else {
        Err(SyncError::QuorumNotSatisfied {
            acknowledged,
            required,
        })
    }
}

/// `call`, or [`SyncError::Timeout`] once `limit` has passed: how the remote backends
/// keep a slow or dead server from holding their callers.
pub(crate) async fn within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, SyncError>>,
) -> Result<T, SyncError> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| SyncError::Timeout(limit))?
}

/// Stops a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
