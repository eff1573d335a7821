//! Server-side confirmations: a publisher waits until N distinct consumers (or consumers
//! in K distinct zones) have acknowledged its event.
//!
//! The publisher registers the event's id *before* the event is appended (the id is fixed
//! in advance), so no ack can come before the registration. Consumers' dispatchers report
//! every ack that matched an event they had delivered; only registered ids are kept.
//! A durable consumer counts once however many members its queue group has; an
//! ephemeral one is its connection.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::listening::Listening;

/// How many have confirmed: distinct consumers, distinct zones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confirmed {
    pub consumers: usize,
    pub zones: usize,
}

struct Waiter {
    consumers: HashSet<String>,
    zones: HashSet<String>,
    progress: watch::Sender<Confirmed>,
}

#[derive(Default)]
pub struct Confirmations {
    waiters: Arc<Mutex<HashMap<String, Waiter>>>,
}

/// A registered wait; dropping it unregisters the event.
pub struct ConfirmWait {
    waiters: Arc<Mutex<HashMap<String, Waiter>>>,
    event_id: String,
    progress: watch::Receiver<Confirmed>,
    /// The listener for confirmations given on other nodes, if the backend is shared.
    pub(super) relayed: Option<Listening>,
}

impl Confirmations {
    /// Starts counting acks of `event_id`.
    pub fn expect(&self, event_id: &str) -> ConfirmWait {
        let (progress, receiver) = watch::channel(Confirmed::default());
        self.lock().insert(
            event_id.to_owned(),
            Waiter {
                consumers: HashSet::new(),
                zones: HashSet::new(),
                progress,
            },
        );
        ConfirmWait {
            waiters: Arc::clone(&self.waiters),
            event_id: event_id.to_owned(),
            progress: receiver,
            relayed: None,
        }
    }

    /// `consumer` (in `zone`, if it declared one) acknowledged `event_id`.
    pub fn record(&self, event_id: &str, consumer: &str, zone: Option<&str>) {
        let mut waiters = self.lock();
        let Some(waiter) = waiters.get_mut(event_id) else {
            return;
        };
        waiter.consumers.insert(consumer.to_owned());
        if let Some(zone) = zone {
            waiter.zones.insert(zone.to_owned());
        }
        waiter.progress.send_replace(Confirmed {
            consumers: waiter.consumers.len(),
            zones: waiter.zones.len(),
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ConfirmWait {
    /// Waits until `consumers` distinct consumers and `zones` distinct zones have
    /// confirmed, or `timeout` passes; returns the counts and whether they sufficed.
    pub async fn wait(
        mut self,
        consumers: usize,
        zones: usize,
        timeout: Duration,
    ) -> (Confirmed, bool) {
        let enough = |c: &Confirmed| c.consumers >= consumers && c.zones >= zones;
        let reached = tokio::time::timeout(timeout, self.progress.wait_for(enough))
            .await
            .is_ok_and(|r| r.is_ok());
        let confirmed = *self.progress.borrow();
        (confirmed, reached)
    }
}

impl Drop for ConfirmWait {
    fn drop(&mut self) {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.event_id);
    }
}
