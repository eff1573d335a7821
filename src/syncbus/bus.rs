//! [`BusSyncBus`]: the sync bus over a `bus` server, through the HTTP client.
//!
//! Each key is a subject of one namespace: `<namespace>.k<hex of the key's UTF-8>` (leases:
//! `.l<hex>`), so any key maps to a valid subject and back; keys are limited by the
//! server's `--max-subject-len` (about 500 bytes with the default). Subscribers are
//! manual-ack consumers that ack an event once it is handed to the application, so
//! `publish_and_await` is the server's `confirm=N` and `publish_and_await_topology` its
//! `confirm_zones=K` (the handle's zone is declared on every subscription).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::{
    encoded, event_json, within, AbortOnDrop, BackendState, KeySubscription, Metrics,
    PublishOptions, SyncBus, SyncError, SyncEvent, SUBSCRIPTION_BUFFER,
};
use crate::client::{AckMode, Client, ClientError, NewEvent, Received, SubscribeOptions};

/// A node's handle on a sync bus carried by a `bus` server, through the HTTP client. Its
/// clones share its counts and publish coalescing. Every call to the server is bounded
/// by the publish timeout (5 s unless [`BusSyncBus::with_publish_timeout`] says
/// otherwise); quorum and topology waits by their own timeout plus that.
///
/// ```
/// use bus::client::Client;
/// use bus::syncbus::{BusSyncBus, PublishOptions, SyncBus};
/// use futures_util::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// let web = BusSyncBus::new(Client::new(host)?, "app");
/// let worker = BusSyncBus::new(Client::new(host)?, "app");
/// let mut invalidations = worker.subscribe("user:42").await?;
/// web.publish("user:42", PublishOptions::default()).await?;
/// let event = invalidations.next().await.ok_or("subscription ended")?;
/// assert_eq!(event.key, "user:42");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct BusSyncBus {
    client: Client,
    namespace: String,
    zone: Option<String>,
    publish_timeout: Duration,
    state: Arc<BackendState>,
}

impl BusSyncBus {
    /// A sync bus in `namespace` through `client`. Nothing is sent yet: a namespace the
    /// server does not serve makes each call fail with [`SyncError::Backend`].
    ///
    /// ```
    /// use bus::client::Client;
    /// use bus::syncbus::{BusSyncBus, PublishOptions, SyncBus, SyncError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// let bus = BusSyncBus::new(Client::new(host)?, "app");
    /// assert!(bus.is_healthy().await);
    /// assert_eq!(bus.peers(), [host]);
    /// bus.publish("user:42", PublishOptions::default()).await?;
    ///
    /// let elsewhere = BusSyncBus::new(Client::new(host)?, "not-served");
    /// let result = elsewhere.publish("user:42", PublishOptions::default()).await;
    /// assert!(matches!(result, Err(SyncError::Backend(_))));
    /// # Ok(()) }
    /// ```
    pub fn new(client: Client, namespace: &str) -> BusSyncBus {
        BusSyncBus {
            client,
            namespace: namespace.to_owned(),
            zone: None,
            publish_timeout: Duration::from_secs(5),
            state: Arc::default(),
        }
    }

    /// The zone this node is in, declared on its subscriptions for
    /// [`SyncBus::publish_and_await_topology`] to count (without one, a subscription
    /// counts for no zone).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus::client::Client;
    /// use bus::syncbus::{BusSyncBus, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// let eu = BusSyncBus::new(Client::new(host)?, "app").with_zone("eu");
    /// let us = BusSyncBus::new(Client::new(host)?, "app").with_zone("us");
    /// let _in_eu = eu.subscribe("price:9").await?;
    /// let _in_us = us.subscribe("price:9").await?;
    /// eu.publish_and_await_topology("price:9", 2, Duration::from_secs(5)).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_zone(mut self, zone: &str) -> BusSyncBus {
        self.zone = Some(zone.to_owned());
        self
    }

    /// The longest a call to the server may take (5 s by default) before it fails with
    /// [`SyncError::Timeout`]: publishes, lease revocations and subscribing; quorum and
    /// topology waits get it on top of their own timeout. A server that refuses
    /// connections fails sooner, with [`SyncError::Backend`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus::client::Client;
    /// use bus::syncbus::{BusSyncBus, PublishOptions, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// let bus = BusSyncBus::new(Client::new(host)?, "app")
    ///     .with_publish_timeout(Duration::from_millis(500));
    /// bus.publish("user:42", PublishOptions::default()).await?;
    ///
    /// // Nothing listens on port 9: the publish fails instead of hanging.
    /// let dead = BusSyncBus::new(Client::new("127.0.0.1:9")?, "app")
    ///     .with_publish_timeout(Duration::from_millis(500));
    /// assert!(dead.publish("user:42", PublishOptions::default()).await.is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_publish_timeout(mut self, timeout: Duration) -> BusSyncBus {
        self.publish_timeout = timeout;
        self
    }

    /// The subject of a key (`k`) or lease (`l`): reversible for any text.
    fn subject(&self, kind: char, key: &str) -> String {
        format!("{}.{}", self.namespace, encoded(kind, key))
    }

    fn event(&self, kind: char, key: &str, options: PublishOptions) -> Result<NewEvent, SyncError> {
        let payload = RawValue::from_string(event_json(key, options)?)
            .map_err(|e| SyncError::Backend(format!("encoding the event: {e}")))?;
        Ok(NewEvent {
            subject: self.subject(kind, key),
            payload: Some(payload),
            ..NewEvent::default()
        })
    }

    /// Runs `call` within the publish timeout.
    async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, SyncError> {
        within(self.publish_timeout, backend(call)).await
    }

    async fn send(&self, kind: char, key: &str, options: PublishOptions) -> Result<(), SyncError> {
        let event = self.event(kind, key, options)?;
        self.timed(self.client.publish(&event)).await?;
        self.state.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn subscribe_to(&self, kind: char, key: &str) -> Result<KeySubscription, SyncError> {
        let mut options = SubscribeOptions::new(self.subject(kind, key));
        options.ack = AckMode::Manual {
            redelivery: None,
            max_deliveries: None,
        };
        options.zone = self.zone.clone();
        let mut subscription = self.timed(self.client.subscribe(options)).await?;
        let (sender, events) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let delivered = Arc::clone(&self.state.delivered);
        let task = tokio::spawn(async move {
            while let Some(received) = subscription.next().await {
                let Ok(Received::Event(event)) = received else {
                    continue; // reconnecting: the client resumes by itself
                };
                let parsed = event
                    .payload
                    .as_deref()
                    .and_then(|raw| serde_json::from_str::<SyncEvent>(raw.get()).ok());
                if let Some(parsed) = parsed {
                    if sender.send(parsed).await.is_err() {
                        return; // unsubscribed
                    }
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                // Handed to the application: that is the acknowledgement.
                let _ = subscription.ack(&event).await;
            }
        });
        Ok(KeySubscription::new(events, AbortOnDrop(task)))
    }

    async fn confirmed(
        &self,
        key: &str,
        consumers: usize,
        zones: usize,
        timeout: Duration,
    ) -> Result<(), SyncError> {
        let event = self.event('k', key, PublishOptions::default())?;
        // The server waits up to `timeout`; the publish timeout bounds its answer on top.
        let call = self
            .client
            .publish_confirmed(&event, consumers, zones, timeout);
        let confirmation = within(timeout + self.publish_timeout, backend(call)).await?;
        self.state.published.fetch_add(1, Ordering::Relaxed);
        if confirmation.reached {
            return Ok(());
        }
        let (acknowledged, required) = if zones > 0 {
            (confirmation.zones, zones)
        } else {
            (confirmation.consumers, consumers)
        };
        Err(SyncError::QuorumNotSatisfied {
            acknowledged,
            required,
        })
    }
}

/// The client's failures as the sync bus reports them.
async fn backend<T>(call: impl Future<Output = Result<T, ClientError>>) -> Result<T, SyncError> {
    call.await.map_err(|e| SyncError::Backend(e.to_string()))
}

impl SyncBus for BusSyncBus {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), SyncError> {
        self.state
            .coalescer
            .publish(key, || self.send('k', key, options.clone()))
            .await
    }

    async fn publish_and_await(
        &self,
        key: &str,
        replicas: usize,
        timeout: Duration,
    ) -> Result<(), SyncError> {
        self.confirmed(key, replicas, 0, timeout).await
    }

    async fn publish_and_await_topology(
        &self,
        key: &str,
        min_zones: usize,
        timeout: Duration,
    ) -> Result<(), SyncError> {
        self.confirmed(key, 0, min_zones, timeout).await
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
        self.client.health().await.is_ok()
    }

    fn peers(&self) -> Vec<String> {
        vec![self.client.host().to_owned()]
    }
}
