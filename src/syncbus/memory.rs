//! [`InMemoryBus`]: a sync bus inside one process, for tests and single-node use.
//!
//! Every handle made with [`InMemoryBus::node`] shares one hub and stands for a node in a
//! zone. An event is acknowledged by a subscription when it is handed to it, at once; a
//! subscription that is full (its reader far behind) does not acknowledge.

use std::collections::{HashMap, HashSet};
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
    next_id: AtomicU64,
}

/// A node's handle on an in-memory hub.
#[derive(Clone)]
pub struct InMemoryBus {
    hub: Arc<Hub>,
    zone: String,
    counts: Arc<Counts>,
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
    /// A new hub, and a handle on it in zone `default`.
    pub fn new() -> InMemoryBus {
        InMemoryBus {
            hub: Arc::default(),
            zone: "default".into(),
            counts: Arc::default(),
        }
    }

    /// Another node on the same hub, in `zone`.
    pub fn node(&self, zone: &str) -> InMemoryBus {
        InMemoryBus {
            hub: Arc::clone(&self.hub),
            zone: zone.to_owned(),
            counts: Arc::default(),
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
        Vec::new()
    }
}
