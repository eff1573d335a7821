//! [`NatsSyncBus`]: the sync bus over NATS core pub/sub (crate `async-nats`).
//!
//! Keys are subjects `<prefix>.k<hex>` (leases `<prefix>.l<hex>`); batches of invalidations
//! go on `<prefix>.batch`, which a handle follows from its first subscription on and hands
//! out to its subscriptions. Quorum is request/reply:
//! a publish that waits carries a fresh reply inbox, every subscriber answers it with its
//! zone once it has handed the event to the application, and the publisher counts the
//! answers until it has enough or the timeout passes.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::batching::{decode_batch, gzip_batcher, Batcher};
use super::dispatch::Subscribers;
use super::{
    encoded, event_json, quorum, with_scheme, within, AbortOnDrop, BackendState, BatchOptions,
    KeySubscription, Metrics, PublishOptions, SyncBus, SyncError, SyncEvent,
};

/// A node's handle on a sync bus carried by NATS core pub/sub. Its clones share its counts
/// and publish coalescing. Every call to the server is bounded by the publish timeout
/// (5 s unless [`NatsSyncBus::with_publish_timeout`] says otherwise); quorum and topology
/// waits count the subscribers' answers until their own timeout.
///
/// ```no_run
/// use bus::syncbus::{NatsSyncBus, PublishOptions, SyncBus};
/// use futures_util::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let url = "nats://127.0.0.1:4222";
/// let web = NatsSyncBus::new(async_nats::connect(url).await?, "warp.sync");
/// let worker = NatsSyncBus::new(async_nats::connect(url).await?, "warp.sync");
/// let mut invalidations = worker.subscribe("user:42").await?;
/// web.publish("user:42", PublishOptions::default()).await?;
/// let event = invalidations.next().await.ok_or("subscription ended")?;
/// assert_eq!(event.key, "user:42");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsSyncBus {
    client: async_nats::Client,
    prefix: String,
    zone: String,
    publish_timeout: Duration,
    batching: BatchOptions,
    batcher: Arc<Batcher>,
    state: Arc<BackendState>,
    subscribers: Arc<Subscribers>,
    /// The task that hands out the batches, started at the handle's first subscription.
    batches: Arc<tokio::sync::Mutex<Option<AbortOnDrop>>>,
}

/// What a subscriber answers to a publish that waits.
#[derive(Serialize, Deserialize)]
struct Ack {
    zone: String,
}

fn backend(e: impl std::fmt::Display) -> SyncError {
    SyncError::Backend(format!("NATS: {e}"))
}

impl NatsSyncBus {
    /// A sync bus on subjects under `prefix` (`warp.sync`, say) through `client`, in zone
    /// `default`. Nodes must share the prefix to see each other's invalidations.
    ///
    /// ```no_run
    /// use bus::syncbus::{NatsSyncBus, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    /// let bus = NatsSyncBus::new(client, "warp.sync");
    /// assert!(bus.is_healthy().await);
    /// assert!(bus.peers().contains(&"nats://127.0.0.1:4222".to_owned()));
    /// # Ok(()) }
    /// ```
    pub fn new(client: async_nats::Client, prefix: &str) -> NatsSyncBus {
        let state = Arc::new(BackendState::default());
        let (publish_timeout, batching) = (Duration::from_secs(5), BatchOptions::default());
        NatsSyncBus {
            batcher: batcher(
                &client,
                format!("{prefix}.batch"),
                publish_timeout,
                batching,
                &state,
            ),
            subscribers: Arc::new(Subscribers::new(Arc::clone(&state.delivered))),
            client,
            prefix: prefix.to_owned(),
            zone: "default".into(),
            publish_timeout,
            batching,
            state,
            batches: Arc::default(),
        }
    }

    /// When invalidations are batched (see [`BatchOptions`]; by default above 1000 per
    /// second, in windows of 10 ms). A batch is one message on the subject
    /// `<prefix>.batch` carrying the gzip of its events' JSON array, which every handle
    /// with subscriptions receives and hands out, in order, to the subscriptions of each
    /// key.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use bus::syncbus::{BatchOptions, NatsSyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    /// let never = NatsSyncBus::new(client, "warp.sync").with_batching(BatchOptions::disabled());
    /// # Ok(()) }
    /// ```
    pub fn with_batching(mut self, options: BatchOptions) -> NatsSyncBus {
        self.batching = options;
        self.with_batcher()
    }

    /// The handle's batcher again, after a setting it sends with changed.
    fn with_batcher(mut self) -> NatsSyncBus {
        self.batcher = batcher(
            &self.client,
            self.batch_subject(),
            self.publish_timeout,
            self.batching,
            &self.state,
        );
        self
    }

    fn batch_subject(&self) -> String {
        format!("{}.batch", self.prefix)
    }

    /// The zone this node is in (`default` unless set), which its subscriptions answer
    /// with for [`SyncBus::publish_and_await_topology`] to count.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use bus::syncbus::{NatsSyncBus, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let url = "nats://127.0.0.1:4222";
    /// let eu = NatsSyncBus::new(async_nats::connect(url).await?, "warp.sync").with_zone("eu");
    /// let us = NatsSyncBus::new(async_nats::connect(url).await?, "warp.sync").with_zone("us");
    /// let _in_eu = eu.subscribe("price:9").await?;
    /// let _in_us = us.subscribe("price:9").await?;
    /// eu.publish_and_await_topology("price:9", 2, Duration::from_secs(5)).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_zone(mut self, zone: &str) -> NatsSyncBus {
        self.zone = zone.to_owned();
        self
    }

    /// The longest a call may wait for the NATS server (5 s by default) before it fails
    /// with [`SyncError::Timeout`]: publishes, lease revocations, subscribing, and sending
    /// the event of a quorum or topology wait (whose answers have their own timeout).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use bus::syncbus::{NatsSyncBus, PublishOptions, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    /// let bus = NatsSyncBus::new(client, "warp.sync")
    ///     .with_publish_timeout(Duration::from_secs(1));
    /// bus.publish("user:42", PublishOptions::default()).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_publish_timeout(mut self, timeout: Duration) -> NatsSyncBus {
        self.publish_timeout = timeout;
        self.with_batcher()
    }

    fn subject(&self, kind: char, key: &str) -> String {
        format!("{}.{}", self.prefix, encoded(kind, key))
    }

    async fn send(&self, kind: char, key: &str, options: PublishOptions) -> Result<(), SyncError> {
        let payload = event_json(key, options)?;
        within(self.publish_timeout, async {
            self.client
                .publish(self.subject(kind, key), payload.into())
                .await
                .map_err(backend)?;
            self.client.flush().await.map_err(backend)
        })
        .await?;
        self.state.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes with a reply inbox and counts the answers: (subscribers, zones).
    async fn counted(
        &self,
        key: &str,
        enough: impl Fn(usize, usize) -> bool,
        timeout: Duration,
    ) -> Result<(usize, usize), SyncError> {
        let inbox = self.client.new_inbox();
        let payload = event_json(key, PublishOptions::default())?;
        let mut answers = within(self.publish_timeout, async {
            let answers = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(backend)?;
            self.client
                .publish_with_reply(self.subject('k', key), inbox, payload.into())
                .await
                .map_err(backend)?;
            self.client.flush().await.map_err(backend)?;
            Ok(answers)
        })
        .await?;
        self.state.published.fetch_add(1, Ordering::Relaxed);
        let (mut subscribers, mut zones) = (0, HashSet::new());
        let deadline = tokio::time::Instant::now() + timeout;
        while !enough(subscribers, zones.len()) {
            match tokio::time::timeout_at(deadline, answers.next()).await {
                // Only subscribers' answers count: not the server's "no responders"
                // status, which has no payload of ours.
                Ok(Some(message)) => {
                    if let Ok(ack) = serde_json::from_slice::<Ack>(&message.payload) {
                        subscribers += 1;
                        zones.insert(ack.zone);
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok((subscribers, zones.len()))
    }

    /// Starts handing out batches, unless it has.
    async fn receive_batches(&self) -> Result<(), SyncError> {
        let mut batches = self.batches.lock().await;
        if batches.as_ref().is_some_and(|task| !task.0.is_finished()) {
            return Ok(());
        }
        let mut messages = self.subscribe_in_place(self.batch_subject()).await?;
        let subscribers = Arc::clone(&self.subscribers);
        *batches = Some(AbortOnDrop(tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                for event in decode_batch(&message.payload).unwrap_or_default() {
                    subscribers.deliver(&encoded('k', &event.key), &event).await;
                }
            }
        })));
        Ok(())
    }

    /// Subscribes to `subject` and returns once the server has the subscription, so that
    /// a publish from any other connection reaches it. (`flush` only writes the SUB to the
    /// socket: the server may still be reading it when another connection's publish
    /// arrives, and that publish would miss it.) The round trip is a request nobody
    /// subscribes to, which comes back as the server's "no responders" status once the
    /// server has processed everything this connection sent before it.
    async fn subscribe_in_place(
        &self,
        subject: String,
    ) -> Result<async_nats::Subscriber, SyncError> {
        within(self.publish_timeout, async {
            let messages = self.client.subscribe(subject).await.map_err(backend)?;
            let nobody = self.client.new_inbox();
            match self.client.request(nobody, Default::default()).await {
                Ok(_) => Ok(messages),
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(messages),
                Err(e) => Err(backend(e)),
            }
        })
        .await
    }

    async fn subscribe_to(&self, kind: char, key: &str) -> Result<KeySubscription, SyncError> {
        self.receive_batches().await?;
        let mut messages = self.subscribe_in_place(self.subject(kind, key)).await?;
        let fed = self.subscribers.add(&encoded(kind, key), None);
        let sender = fed.sender;
        let client = self.client.clone();
        let delivered = Arc::clone(&self.state.delivered);
        let ack = serde_json::to_vec(&Ack {
            zone: self.zone.clone(),
        })
        .map_err(backend)?;
        let task = tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let Ok(event) = serde_json::from_slice::<SyncEvent>(&message.payload) else {
                    continue;
                };
                if sender.send(event).await.is_err() {
                    return;
                }
                delivered.fetch_add(1, Ordering::Relaxed);
                if let Some(reply) = message.reply {
                    let _ = client.publish(reply, ack.clone().into()).await;
                }
            }
        });
        Ok(KeySubscription::new(
            fed.events,
            (fed.registration, AbortOnDrop(task)),
        ))
    }
}

/// A batcher whose batches are one message each on `subject`.
fn batcher(
    client: &async_nats::Client,
    subject: String,
    timeout: Duration,
    options: BatchOptions,
    state: &Arc<BackendState>,
) -> Arc<Batcher> {
    let client = client.clone();
    gzip_batcher(options, timeout, state, move |body| {
        let (client, subject) = (client.clone(), subject.clone());
        async move {
            client
                .publish(subject, body.into())
                .await
                .map_err(backend)?;
            client.flush().await.map_err(backend)
        }
    })
}

impl SyncBus for NatsSyncBus {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), SyncError> {
        self.batcher
            .publish_key(&self.state.coalescer, key, options, |options| {
                self.send('k', key, options)
            })
            .await
    }

    async fn publish_and_await(
        &self,
        key: &str,
        replicas: usize,
        timeout: Duration,
    ) -> Result<(), SyncError> {
        let (subscribers, _) = self.counted(key, |n, _| n >= replicas, timeout).await?;
        quorum(subscribers, replicas)
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
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn peers(&self) -> Vec<String> {
        let info = self.client.server_info();
        let url = |address: &str| with_scheme("nats", address);
        let mut peers: BTreeSet<String> = info.connect_urls.iter().map(|a| url(a)).collect();
        if !info.host.is_empty() {
            // The server gives IPv6 hosts without brackets; a URL needs them.
            let host = if info.host.contains(':') {
                format!("[{}]", info.host)
            } else {
                info.host
            };
            peers.insert(url(&format!("{host}:{}", info.port)));
        }
        peers.into_iter().collect()
    }
}
