//! [`RedisSyncBus`]: the sync bus over Redis pub/sub (crate `redis`).
//!
//! Keys are channels `<prefix>.k<hex>` (leases `<prefix>.l<hex>`); batches of
//! invalidations go on `<prefix>.batch`. A handle receives on one subscriber connection,
//! made at its first subscription, that SUBSCRIBEs to the channels its subscriptions
//! need and hands each message to them. Redis pub/sub has no
//! acknowledgements — `PUBLISH` says how many connections received a message, not that
//! any application handled it — so quorum and topology waits are
//! [`SyncError::QuorumUnsupported`] rather than a count that would only look like one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashSet;

use futures_util::StreamExt;
use redis::AsyncCommands;
use tokio::sync::{mpsc, oneshot};

use super::batching::{decode_batch, gzip_batcher, Batcher};
use super::dispatch::Subscribers;
use super::{
    encoded, event_json, within, AbortOnDrop, BackendState, BatchOptions, KeySubscription, Metrics,
    PublishOptions, SyncBus, SyncError, SyncEvent,
};

/// A node's handle on a sync bus carried by Redis pub/sub. Its clones share its counts,
/// publish coalescing and batching, and its two connections: one to publish, one (made
/// at the first subscription) for all its subscriptions.
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
    batching: BatchOptions,
    batcher: Arc<Batcher>,
    state: Arc<BackendState>,
    subscribers: Arc<Subscribers>,
    /// The handle's subscriber connection, made at its first subscription (and again
    /// after it was lost).
    inbound: Arc<tokio::sync::Mutex<Option<Inbound>>>,
}

/// The subscriber connection of a handle: one for all its subscriptions, SUBSCRIBEd to
/// the channels of their keys and to the batch channel.
struct Inbound {
    /// To the task that owns the connection's SUBSCRIBE side, which handles one command
    /// at a time so that a subscription and the release of the same channel keep their
    /// order.
    subscribe: mpsc::UnboundedSender<(String, oneshot::Sender<Result<(), SyncError>>)>,
    /// Channels whose last subscription ended.
    released: mpsc::UnboundedSender<String>,
    /// Hands the connection's messages out; it ends when the connection does.
    reader: AbortOnDrop,
    _commands: AbortOnDrop,
}

impl Inbound {
    fn is_up(&self) -> bool {
        !self.reader.0.is_finished() && !self.subscribe.is_closed()
    }
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
        let state = Arc::new(BackendState::default());
        let subscribers = Arc::new(Subscribers::new(Arc::clone(&state.delivered)));
        let publish_timeout = Duration::from_secs(5);
        let batching = BatchOptions::default();
        let batch_channel = format!("{prefix}.batch");
        Ok(RedisSyncBus {
            batcher: batcher(
                &connection,
                batch_channel,
                publish_timeout,
                batching,
                &state,
            ),
            client,
            connection,
            prefix: prefix.to_owned(),
            publish_timeout,
            batching,
            state,
            subscribers,
            inbound: Arc::default(),
        })
    }

    /// When invalidations are batched (see [`BatchOptions`]; by default above 1000 per
    /// second, in windows of 10 ms). A batch is one `PUBLISH` on the channel
    /// `<prefix>.batch` of the gzip of its events' JSON array, which every handle with
    /// subscriptions receives and hands out, in order, to the subscriptions of each key.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use bus::syncbus::{BatchOptions, RedisSyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
    /// let options = BatchOptions { threshold: 5000, window: Duration::from_millis(5) };
    /// let bus = RedisSyncBus::new(client, "warp.sync").await?.with_batching(options);
    /// # Ok(()) }
    /// ```
    pub fn with_batching(mut self, options: BatchOptions) -> RedisSyncBus {
        self.batching = options;
        self.with_batcher()
    }

    /// The handle's batcher again, after a setting it sends with changed.
    fn with_batcher(mut self) -> RedisSyncBus {
        self.batcher = batcher(
            &self.connection,
            self.batch_channel(),
            self.publish_timeout,
            self.batching,
            &self.state,
        );
        self
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
        self.with_batcher()
    }

    fn channel(&self, kind: char, key: &str) -> String {
        format!("{}.{}", self.prefix, encoded(kind, key))
    }

    fn batch_channel(&self) -> String {
        format!("{}.batch", self.prefix)
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
        within(self.publish_timeout, async {
            let mut inbound = self.inbound.lock().await;
            if !inbound.as_ref().is_some_and(Inbound::is_up) {
                *inbound = Some(self.connect_inbound().await?);
            }
            let Some(inbound) = inbound.as_ref() else {
                return Err(backend("no subscriber connection"));
            };
            let channel = encoded(kind, key);
            let fed = self
                .subscribers
                .add(&channel, Some(inbound.released.clone()));
            // The subscription keeps the connection it receives on, should the handle go.
            let subscription =
                KeySubscription::new(fed.events, (fed.registration, Arc::clone(&self.inbound)));
            let (done, subscribed) = oneshot::channel();
            inbound
                .subscribe
                .send((channel, done))
                .map_err(|_| backend("the subscriber connection closed"))?;
            subscribed
                .await
                .map_err(|_| backend("the subscriber connection closed"))??;
            Ok(subscription)
        })
        .await
    }

    /// Opens the handle's subscriber connection, SUBSCRIBEd to the batch channel.
    async fn connect_inbound(&self) -> Result<Inbound, SyncError> {
        let pubsub = self.client.get_async_pubsub().await.map_err(backend)?;
        let (mut sink, mut messages) = pubsub.split();
        let batch_channel = self.batch_channel();
        // Redis confirms SUBSCRIBE before this returns: publishes from now on arrive.
        sink.subscribe(&batch_channel).await.map_err(backend)?;
        let prefix = format!("{}.", self.prefix);
        let subscribers = Arc::clone(&self.subscribers);
        let reader = tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let body = message.get_payload_bytes();
                if message.get_channel_name() == batch_channel {
                    for event in decode_batch(body).unwrap_or_default() {
                        subscribers.deliver(&encoded('k', &event.key), &event).await;
                    }
                } else if let (Some(channel), Ok(event)) = (
                    message.get_channel_name().strip_prefix(&prefix),
                    serde_json::from_slice::<SyncEvent>(body),
                ) {
                    subscribers.deliver(channel, &event).await;
                }
            }
            // The connection is gone: its subscriptions end.
            subscribers.close_all();
        });
        let (subscribe, mut subscribes) =
            mpsc::unbounded_channel::<(String, oneshot::Sender<Result<(), SyncError>>)>();
        let (released, mut releases) = mpsc::unbounded_channel::<String>();
        let (prefix, subscribers) = (self.prefix.clone(), Arc::clone(&self.subscribers));
        let commands = tokio::spawn(async move {
            let mut subscribed = HashSet::new();
            loop {
                tokio::select! {
                    Some((channel, done)) = subscribes.recv() => {
                        let mut result = Ok(());
                        if !subscribed.contains(&channel) {
                            result = sink.subscribe(format!("{prefix}.{channel}")).await.map_err(backend);
                            if result.is_ok() {
                                subscribed.insert(channel);
                            }
                        }
                        let _ = done.send(result);
                    }
                    Some(channel) = releases.recv() => {
                        if !subscribers.has(&channel) && subscribed.remove(&channel) {
                            let _ = sink.unsubscribe(format!("{prefix}.{channel}")).await;
                        }
                    }
                    else => return,
                }
            }
        });
        Ok(Inbound {
            subscribe,
            released,
            reader: AbortOnDrop(reader),
            _commands: AbortOnDrop(commands),
        })
    }
}

/// A batcher whose batches are one `PUBLISH` each on `channel`.
fn batcher(
    connection: &redis::aio::MultiplexedConnection,
    channel: String,
    timeout: Duration,
    options: BatchOptions,
    state: &Arc<BackendState>,
) -> Arc<Batcher> {
    let connection = connection.clone();
    gzip_batcher(options, timeout, state, move |body| {
        let (mut connection, channel) = (connection.clone(), channel.clone());
        async move {
            connection
                .publish::<_, _, i64>(channel, body)
                .await
                .map(drop)
                .map_err(backend)
        }
    })
}

impl SyncBus for RedisSyncBus {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), SyncError> {
        self.batcher
            .publish_key(&self.state.coalescer, key, options, |options| {
                self.send('k', key, options)
            })
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
