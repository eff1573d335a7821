//! [`InMemoryBus`]: a sync bus inside one process, for tests and single-node use.
//!
//! Every handle made with [`InMemoryBus::node`] shares one hub and stands for a node in a
//! zone. An event is acknowledged by a subscription when it is handed to it, at once; a
//! subscription that is full (its reader far behind) does not acknowledge.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{
    AbortOnDrop, KeySubscription, Metrics, PublishOptions, SyncBus, SyncError, SyncEvent,
    SUBSCRIPTION_BUFFER,
};

struct Subscriber {
    id: u64,
    zone: String,
    events: mpsc::Sender<SyncEvent>,
}

#[derive(Default)]
struct Hub {
    /// By key ("k:…") or lease ("l:…").
    subscribers: Mutex<HashMap<String, Vec<Subscriber>>>,
    /// The live nodes made by [`InMemoryBus::node`], by id: their zones.
    nodes: Mutex<HashMap<u64, String>>,
    /// Ids of subscriptions and nodes.
    next_id: AtomicU64,
}

impl Hub {
    fn nodes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, String>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lists a node on its hub for as long as any clone of its handle lives.
struct Membership {
    hub: Arc<Hub>,
    id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.nodes().remove(&self.id);
    }
}

/// A node's handle on an in-memory hub: the sync bus inside one process. Every handle
/// made with [`InMemoryBus::node`] shares the hub of the handle it came from and stands
/// for a node in a zone; a clone is the same node (its counts and membership shared).
/// Calls never fail and never wait: a subscription acknowledges an event as it is handed
/// to it, so quorum and topology waits answer at once, whatever their timeout.
///
/// ```
/// use bus::syncbus::{InMemoryBus, PublishOptions, SyncBus};
/// use futures_util::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let hub = InMemoryBus::new();
/// let (web, worker) = (hub.node("eu"), hub.node("eu"));
/// let mut invalidations = worker.subscribe("user:42").await?;
/// web.publish("user:42", PublishOptions::default()).await?;
/// let event = invalidations.next().await.ok_or("subscription ended")?;
/// assert_eq!(event.key, "user:42");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct InMemoryBus {
    hub: Arc<Hub>,
    zone: String,
    counts: Arc<Counts>,
    /// `None` for the hub's own handle (from [`InMemoryBus::new`]), which is not listed.
    membership: Option<Arc<Membership>>,
}

#[derive(Default)]
struct Counts {
    published: AtomicU64,
    delivered: AtomicU64,
}

impl Default for InMemoryBus {
    fn default() -> Self {
        InMemoryBus::new()
    }
}

impl InMemoryBus {
    /// A new hub, and a handle on it in zone `default`. That handle works as a node but
    /// stands for the hub: other nodes do not list it among their [`SyncBus::peers`].
    ///
    /// ```
    /// use bus::syncbus::{InMemoryBus, SyncBus};
    ///
    /// let hub = InMemoryBus::new();
    /// let node = hub.node("eu");
    /// assert!(node.peers().is_empty());
    /// assert_eq!(hub.peers(), ["eu"]);
    /// ```
    pub fn new() -> InMemoryBus {
        InMemoryBus {
            hub: Arc::default(),
            zone: "default".into(),
            counts: Arc::default(),
            membership: None,
        }
    }

    /// Another node on the same hub, in `zone` (what [`SyncBus::publish_and_await_topology`]
    /// counts). It is listed among the other nodes' [`SyncBus::peers`] until it and its
    /// clones are dropped; its subscriptions go on after that.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus::syncbus::{InMemoryBus, SyncBus};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = InMemoryBus::new();
    /// let (eu, us) = (hub.node("eu"), hub.node("us"));
    /// let _in_eu = eu.subscribe("price:9").await?;
    /// let _in_us = us.subscribe("price:9").await?;
    /// eu.publish_and_await_topology("price:9", 2, Duration::from_secs(1)).await?;
    /// assert_eq!(eu.peers(), ["us"]);
    /// # Ok(()) }
    /// ```
    pub fn node(&self, zone: &str) -> InMemoryBus {
        let id = self.hub.next_id.fetch_add(1, Ordering::Relaxed);
        self.hub.nodes().insert(id, zone.to_owned());
        InMemoryBus {
            hub: Arc::clone(&self.hub),
            zone: zone.to_owned(),
            counts: Arc::default(),
            membership: Some(Arc::new(Membership {
                hub: Arc::clone(&self.hub),
                id,
            })),
        }
    }

    /// Hands `event` to every subscription of `topic`; returns the acknowledging
    /// subscriptions' zones.
    fn deliver(&self, topic: &str, event: &SyncEvent) -> Vec<String> {
        self.counts.published.fetch_add(1, Ordering::Relaxed);
        let subscribers = self
            .hub
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        subscribers
            .get(topic)
            .into_iter()
            .flatten()
            .filter(|s| s.events.try_send(event.clone()).is_ok())
            .map(|s| s.zone.clone())
            .collect()
    }

    fn subscribe_to(&self, topic: String) -> KeySubscription {
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let id = self.hub.next_id.fetch_add(1, Ordering::Relaxed);
        self.hub
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(topic.clone())
            .or_default()
            .push(Subscriber {
                id,
                zone: self.zone.clone(),
                events: sender,
            });
        let counted = Counted {
            hub: Arc::clone(&self.hub),
            topic,
            id,
        };
        let delivered = Arc::clone(&self.counts);
        // Deliveries are counted as the reader takes them.
        let (forward, events) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let task = tokio::spawn(async move {
            let mut receiver = receiver;
            while let Some(event) = receiver.recv().await {
                if forward.send(event).await.is_err() {
                    return;
                }
                delivered.delivered.fetch_add(1, Ordering::Relaxed);
            }
        });
        KeySubscription::new(events, (counted, AbortOnDrop(task)))
    }
}

/// Removes a subscription from the hub when dropped.
struct Counted {
    hub: Arc<Hub>,
    topic: String,
    id: u64,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut subscribers = self
            .hub
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(list) = subscribers.get_mut(&self.topic) {
            list.retain(|s| s.id != self.id);
            if list.is_empty() {
                subscribers.remove(&self.topic);
            }
        }
    }
}

fn event(key: &str, options: PublishOptions) -> SyncEvent {
    SyncEvent {
        key: key.to_owned(),
        options,
    }
}

impl SyncBus for InMemoryBus {
    async fn publish(&self, key: &str, options: PublishOptions) -> Result<(), SyncError> {
        self.deliver(&format!("k:{key}"), &event(key, options));
        Ok(())
    }

    async fn publish_and_await(
        &self,
        key: &str,
        replicas: usize,
        _timeout: Duration,
    ) -> Result<(), SyncError> {
        let acknowledged = self
            .deliver(&format!("k:{key}"), &event(key, PublishOptions::default()))
            .len();
        if acknowledged >= replicas {
            Ok(())
        } else {
            Err(SyncError::QuorumNotSatisfied {
                acknowledged,
                required: replicas,
            })
        }
    }

    async fn publish_and_await_topology(
        &self,
        key: &str,
        min_zones: usize,
        _timeout: Duration,
    ) -> Result<(), SyncError> {
        let zones: HashSet<String> = self
            .deliver(&format!("k:{key}"), &event(key, PublishOptions::default()))
            .into_iter()
            .collect();
        if zones.len() >= min_zones {
            Ok(())
        } else {
            Err(SyncError::QuorumNotSatisfied {
                acknowledged: zones.len(),
                required: min_zones,
            })
        }
    }

    async fn subscribe(&self, key: &str) -> Result<KeySubscription, SyncError> {
        Ok(self.subscribe_to(format!("k:{key}")))
    }

    async fn revoke_lease(&self, id: &str) -> Result<(), SyncError> {
        self.deliver(&format!("l:{id}"), &event(id, PublishOptions::default()));
        Ok(())
    }

    async fn subscribe_lease(&self, id: &str) -> Result<KeySubscription, SyncError> {
        Ok(self.subscribe_to(format!("l:{id}")))
    }

    fn metrics(&self) -> Metrics {
        Metrics {
            published: self.counts.published.load(Ordering::Relaxed),
            delivered: self.counts.delivered.load(Ordering::Relaxed),
        }
    }

    async fn is_healthy(&self) -> bool {
        true
    }

    fn peers(&self) -> Vec<String> {
        let own = self.membership.as_ref().map(|m| m.id);
        let nodes = self.hub.nodes();
        let zones: BTreeSet<&String> = nodes
            .iter()
            .filter(|(id, _)| Some(**id) != own)
            .map(|(_, zone)| zone)
            .collect();
        zones.into_iter().cloned().collect()
    }
}
