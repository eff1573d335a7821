//! [`RedisSyncBus`]: the sync bus over Redis pub/sub (crate `redis`).
//!
//! Keys are channels `<prefix>.k<hex>` (leases `<prefix>.l<hex>`). Redis pub/sub has no
//! acknowledgements — `PUBLISH` says how many connections received a message, not that
//! any application handled it — so quorum and topology waits are
//! [`SyncError::QuorumUnsupported`] rather than a count that would only look like one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use tokio::sync::mpsc;

use super::{
    encoded, event_json, within, AbortOnDrop, BackendState, KeySubscription, Metrics,
    PublishOptions, SyncBus, SyncError, SyncEvent, SUBSCRIPTION_BUFFER,
};

/// A node's handle on a sync bus carried by Redis pub/sub. Its clones share its counts,
/// publish coalescing and connection; each subscription has a connection of its own.
/// Redis cannot say whether anyone handled a message, so quorum and topology waits fail
/// with [`SyncError::QuorumUnsupported`].
///
/// ```no_run
/// use std::time::Duration;
/// use bus::syncbus::{PublishOptions, RedisSyncBus, SyncBus, SyncError};
/// use futures_util::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let bus = RedisSyncBus::new(client, "warp.sync").await?;
/// let mut invalidations = bus.subscribe("user:42").await?;
/// bus.publish("user:42", PublishOptions::default()).await?;
/// let event = invalidations.next().await.ok_or("subscription ended")?;
/// assert_eq!(event.key, "user:42");
/// assert_eq!(
///     bus.publish_and_await("user:42", 1, Duration::from_secs(1)).await,
///     Err(SyncError::QuorumUnsupported)
/// );
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisSyncBus {
    client: redis::Client,
    connection: redis::aio::MultiplexedConnection,
    prefix: String,
    publish_timeout: Duration,
    state: Arc<BackendState>,
}

fn backend(e: impl std::fmt::Display) -> SyncError {
    SyncError::Backend(format!("Redis: {e}"))
}

/// The URL of a Redis server's address, without database or credentials.
fn address(addr: &redis::ConnectionAddr) -> String {
    // Redis keeps IPv6 hosts without brackets; a URL needs them.
    let bracketed = |host: &str| {
        if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        }
    };
    match addr {
        redis::ConnectionAddr::Tcp(host, port) => format!("redis://{}:{port}", bracketed(host)),
        redis::ConnectionAddr::TcpTls { host, port, .. } => {
            format!("rediss://{}:{port}", bracketed(host))
        }
        redis::ConnectionAddr::Unix(path) => format!("redis+unix://{}", path.display()),
        other => other.to_string(),
    }
}

impl RedisSyncBus {
    /// A sync bus on channels under `prefix` (`warp.sync`, say) through `client`. It
    /// connects here, once, and fails with [`SyncError::Backend`] if it cannot. Nodes
    /// must share the prefix to see each other's invalidations.
    ///
    /// ```no_run
    /// use bus::syncbus::{RedisSyncBus, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
    /// let bus = RedisSyncBus::new(client, "warp.sync").await?;
    /// assert!(bus.is_healthy().await);
    /// assert_eq!(bus.peers(), ["redis://127.0.0.1:6379"]);
    /// # Ok(()) }
    /// ```
    pub async fn new(client: redis::Client, prefix: &str) -> Result<RedisSyncBus, SyncError> {
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(backend)?;
        Ok(RedisSyncBus {
            client,
            connection,
            prefix: prefix.to_owned(),
            publish_timeout: Duration::from_secs(5),
            state: Arc::default(),
        })
    }

    /// The longest a publish or lease revocation may take before it fails with
    /// [`SyncError::Timeout`] (5 s by default); it also bounds the `PING` of
    /// [`SyncBus::is_healthy`].
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use bus::syncbus::{PublishOptions, RedisSyncBus, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
    /// let bus = RedisSyncBus::new(client, "warp.sync")
    ///     .await?
    ///     .with_publish_timeout(Duration::from_secs(1));
    /// bus.publish("user:42", PublishOptions::default()).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_publish_timeout(mut self, timeout: Duration) -> RedisSyncBus {
        self.publish_timeout = timeout;
        self
    }

    fn channel(&self, kind: char, key: &str) -> String {
        format!("{}.{}", self.prefix, encoded(kind, key))
    }

    async fn send(&self, kind: char, key: &str, options: PublishOptions) -> Result<(), SyncError> {
        let payload = event_json(key, options)?;
        let mut connection = self.connection.clone();
        let channel = self.channel(kind, key);
        within(self.publish_timeout, async {
            connection
                .publish::<_, _, i64>(channel, payload)
                .await
                .map_err(backend)
        })
        .await?;
        self.state.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn subscribe_to(&self, kind: char, key: &str) -> Result<KeySubscription, SyncError> {
        let mut pubsub = self.client.get_async_pubsub().await.map_err(backend)?;
        // Redis confirms SUBSCRIBE before this returns: publishes from now on arrive.
        pubsub
            .subscribe(self.channel(kind, key))
            .await
            .map_err(backend)?;
        let (sender, events) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let delivered = Arc::clone(&self.state.delivered);
        let task = tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let Ok(event) = serde_json::from_slice::<SyncEvent>(message.get_payload_bytes())
                else {
                    continue;
                };
                if sender.send(event).await.is_err() {
                    return;
                }
                delivered.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(KeySubscription::new(events, AbortOnDrop(task)))
    }
}

impl SyncBus for RedisSyncBus {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), SyncError> {
        self.state
            .coalescer
            .publish(key, || self.send('k', key, options.clone()))
            .await
    }

    async fn publish_and_await(
        &self,
        _key: &str,
        _replicas: usize,
        _timeout: Duration,
    ) -> Result<(), SyncError> {
        Err(SyncError::QuorumUnsupported)
    }

    async fn publish_and_await_topology(
        &self,
        _key: &str,
        _min_zones: usize,
        _timeout: Duration,
    ) -> Result<(), SyncError> {
        Err(SyncError::QuorumUnsupported)
    }

    async fn subscribe(&self, key: &str) -> Result<KeySubscription, SyncError> {
        self.subscribe_to('k', key).await
    }

    async fn revoke_lease(&self, id: &str) -> Result<(), SyncError> {
        self.send('l', id, PublishOptions::default()).await
    }

    async fn subscribe_lease(&self, id: &str) -> Result<KeySubscription, SyncError> {
        self.subscribe_to('l', id).await
    }

    fn metrics(&self) -> Metrics {
        self.state.metrics()
    }

    async fn is_healthy(&self) -> bool {
        let mut connection = self.connection.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        matches!(
            tokio::time::timeout(self.publish_timeout, ping).await,
            Ok(Ok(_))
        )
    }

    fn peers(&self) -> Vec<String> {
        vec![address(self.client.get_connection_info().addr())]
    }
}
