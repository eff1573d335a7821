//! A handle's own subscriptions, by channel (the name its backend gives a key or a lease:
//! `k…` and `l…`): where a backend that receives a node's events on one
//! connection (a batch, a Kafka topic, a mesh socket) hands each to the subscriptions of
//! its key, in the order it received them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{SyncEvent, SUBSCRIPTION_BUFFER};

/// The subscriptions of each channel: their ids and the senders of their streams.
type ByChannel = HashMap<String, Vec<(u64, mpsc::Sender<SyncEvent>)>>;

#[derive(Default)]
pub(crate) struct Subscribers {
    by_channel: Mutex<ByChannel>,
    next_id: AtomicU64,
    /// Events handed to readers; shared with the handle's [`super::Metrics`].
    delivered: Arc<AtomicU64>,
}

impl Subscribers {
    pub(crate) fn new(delivered: Arc<AtomicU64>) -> Subscribers {
        Subscribers {
            delivered,
            ..Subscribers::default()
        }
    }

    /// A new subscription of `channel`, in parts: unregistered when its registration is
    /// dropped (and then, if it was the channel's last, `released` hears the channel's
    /// name). A backend makes the `KeySubscription` with what else it must keep alive.
    pub(crate) fn add(
        self: &Arc<Self>,
        channel: &str,
        released: Option<mpsc::UnboundedSender<String>>,
    ) -> Fed {
        let (sender, events) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(channel.to_owned())
            .or_default()
            .push((id, sender.clone()));
        let registration = Registration {
            subscribers: Arc::clone(self),
            channel: channel.to_owned(),
            id,
            released,
        };
        Fed {
            events,
            sender,
            registration: Box::new(registration),
        }
    }

    /// Whether `channel` has subscriptions.
    #[cfg(feature = "redis")]
    pub(crate) fn has(&self, channel: &str) -> bool {
        self.lock().contains_key(channel)
    }

    /// Ends every subscription (their streams end): the connection they received on is
    /// gone for good.
    #[cfg(feature = "redis")]
    pub(crate) fn close_all(&self) {
        self.lock().clear();
    }

    /// Hands `event` to every subscription of `channel`, waiting while one is full; how
    /// many took it.
    pub(crate) async fn deliver(&self, channel: &str, event: &SyncEvent) -> usize {
        let senders: Vec<mpsc::Sender<SyncEvent>> = match self.lock().get(channel) {
            Some(subscribers) => subscribers.iter().map(|(_, s)| s.clone()).collect(),
            None => return 0,
        };
        let mut handed = 0;
        for sender in senders {
            if sender.send(event.clone()).await.is_ok() {
                handed += 1;
            }
        }
        self.delivered.fetch_add(handed as u64, Ordering::Relaxed);
        handed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ByChannel> {
        self.by_channel.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A subscription's parts: its stream, the sender that feeds it (for a backend that also
/// feeds it events of its own, as NATS does those not batched), and its registration,
/// which unregisters it when dropped.
pub(crate) struct Fed {
    pub(crate) events: mpsc::Receiver<SyncEvent>,
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    pub(crate) sender: mpsc::Sender<SyncEvent>,
    pub(crate) registration: Box<dyn Send + Sync>,
}

struct Registration {
    subscribers: Arc<Subscribers>,
    channel: String,
    id: u64,
    released: Option<mpsc::UnboundedSender<String>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let last = {
            let mut by_channel = self.subscribers.lock();
            let Some(subscribers) = by_channel.get_mut(&self.channel) else {
                return;
            };
            subscribers.retain(|(id, _)| *id != self.id);
            let last = subscribers.is_empty();
            if last {
                by_channel.remove(&self.channel);
            }
            last
        };
        if let (true, Some(released)) = (last, &self.released) {
            let _ = released.send(std::mem::take(&mut self.channel));
        }
    }
}
