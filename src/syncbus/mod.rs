//! The sync bus: how application nodes propagate cache invalidations to each other.
//!
//! A node that changes a key publishes an invalidation for it; every other node
//! subscribed to the key drops its local copy. [`SyncBus`] is the interface applications
//! program against; [`InMemoryBus`] serves tests and single-process use, and
//! [`BusSyncBus`] runs it over a `bus` server, where quorum and topology waits are the
//! server's confirmations.
//!
//! ```
//! use std::time::Duration;
//! use bus::syncbus::{InMemoryBus, PublishOptions, SyncBus};
//! use futures_util::StreamExt;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let hub = InMemoryBus::new();
//! let (node_a, node_b) = (hub.node("eu-1"), hub.node("us-1"));
//! let mut invalidations = node_b.subscribe("user:42").await.unwrap();
//! node_a.publish("user:42", PublishOptions::default()).await.unwrap();
//! assert_eq!(invalidations.next().await.unwrap().key, "user:42");
//! // Both zones hold a subscriber of this key on another publish:
//! let _also = node_a.subscribe("user:42").await.unwrap();
//! node_a.publish_and_await_topology("user:42", 2, Duration::from_secs(1)).await.unwrap();
//! # });
//! ```

mod bus;
mod memory;
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

pub use self::bus::BusSyncBus;
pub use self::memory::InMemoryBus;
#[cfg(feature = "nats")]
pub use self::nats_bus::NatsSyncBus;
#[cfg(feature = "redis")]
pub use self::redis_bus::RedisSyncBus;

/// Where an invalidation applies, as the publisher says (both optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// An invalidation as subscribers receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncEvent {
    /// The key (or, for a lease, the lease id).
    pub key: String,
    #[serde(flatten)]
    pub options: PublishOptions,
}

/// Published and delivered counts of one bus handle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    pub published: u64,
    pub delivered: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// Fewer subscribers (or zones) than required acknowledged in time.
    #[error("quorum not satisfied: {acknowledged} of {required} acknowledged")]
    QuorumNotSatisfied {
        acknowledged: usize,
        required: usize,
    },
    /// This backend cannot count acknowledgements honestly.
    #[error("this bus cannot wait for acknowledgements")]
    QuorumUnsupported,
    /// The backend did not answer within the publish timeout.
    #[error("the bus did not answer within {0:?}")]
    Timeout(Duration),
    /// The backend failed; the message says how.
    #[error("{0}")]
    Backend(String),
}

/// The operations of a sync bus.
pub trait SyncBus: Send + Sync {
    /// Publishes an invalidation for `key`. Publishes of a key made while one is on its
    /// way are coalesced into one more publish after it.
    fn publish(
        &self,
        key: &str,
        options: PublishOptions,
    ) -> impl std::future::Future<Output = Result<(), SyncError>> + Send;

    /// Publishes and returns once `replicas` subscribers acknowledged it, else
    /// [`SyncError::QuorumNotSatisfied`] after `timeout`.
    fn publish_and_await(
        &self,
        key: &str,
        replicas: usize,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<(), SyncError>> + Send;

    /// Publishes and returns once subscribers in `min_zones` distinct zones acknowledged
    /// it, else [`SyncError::QuorumNotSatisfied`] (counting zones) after `timeout`.
    fn publish_and_await_topology(
        &self,
        key: &str,
        min_zones: usize,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<(), SyncError>> + Send;

    /// The invalidations of `key`; dropping the subscription (or calling
    /// [`KeySubscription::unsubscribe`]) ends it.
    fn subscribe(
        &self,
        key: &str,
    ) -> impl std::future::Future<Output = Result<KeySubscription, SyncError>> + Send;

    /// Revokes lease `id`: its subscribers receive one event.
    fn revoke_lease(
        &self,
        id: &str,
    ) -> impl std::future::Future<Output = Result<(), SyncError>> + Send;

    /// Revocations of lease `id`.
    fn subscribe_lease(
        &self,
        id: &str,
    ) -> impl std::future::Future<Output = Result<KeySubscription, SyncError>> + Send;

    fn metrics(&self) -> Metrics;

    fn is_healthy(&self) -> impl std::future::Future<Output = bool> + Send;

    /// The other nodes this bus knows of (empty where the backend does not say).
    fn peers(&self) -> Vec<String>;
}

/// A stream of [`SyncEvent`]s for one key or lease.
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

    /// Ends the subscription (the same as dropping it).
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

/// Stops a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
