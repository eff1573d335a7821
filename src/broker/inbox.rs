//! In-memory inbox subjects (`_bus_.…`): the return path of request/reply and
//! confirmations.
//!
//! An event published to an inbox subject is never written to disk. It goes, at once, to
//! every subscription open on exactly that subject at that moment; there is no history
//! and no wildcard. Each subscription buffers at most [`INBOX_BUFFER`] events: a reader
//! that falls further behind loses the overflow, which is logged, rather than making
//! the server buffer without bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::event::StoredEvent;

/// Events an inbox subscription may have waiting.
pub const INBOX_BUFFER: usize = 256;

type Subscribers = HashMap<String, Vec<(u64, mpsc::Sender<StoredEvent>)>>;

#[derive(Default)]
pub struct Inboxes {
    subscribers: Arc<Mutex<Subscribers>>,
    next_id: AtomicU64,
    /// Events published to inbox subjects, and copies of them dropped for subscribers too
    /// far behind.
    published: AtomicU64,
    dropped: AtomicU64,
}

/// An open inbox subscription; dropping it unsubscribes.
pub struct InboxSubscription {
    events: mpsc::Receiver<StoredEvent>,
    _registration: Registration,
}

impl InboxSubscription {
    /// The next event published to the subject.
    pub async fn recv(&mut self) -> Option<StoredEvent> {
        self.events.recv().await
    }
}

struct Registration {
    subscribers: Arc<Mutex<Subscribers>>,
    subject: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = subscribers.get_mut(&self.subject) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                subscribers.remove(&self.subject);
            }
        }
    }
}

impl Inboxes {
    pub fn subscribe(&self, subject: &str) -> InboxSubscription {
        let (sender, events) = mpsc::channel(INBOX_BUFFER);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(subject.to_owned())
            .or_default()
            .push((id, sender));
        InboxSubscription {
            events,
            _registration: Registration {
                subscribers: Arc::clone(&self.subscribers),
                subject: subject.to_owned(),
                id,
            },
        }
    }

    /// Hands an event to the current subscribers of `subject`; returns how many got it.
    pub fn publish(&self, subject: &str, event: &StoredEvent) -> usize {
        self.published.fetch_add(1, Ordering::Relaxed);
        let subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = subscribers.get(subject) else {
            return 0;
        };
        let mut delivered = 0;
        for (_, sender) in list {
            match sender.try_send(event.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        subject,
                        event_id = event.id(),
                        "inbox subscriber is {INBOX_BUFFER} events behind; dropping the event for it"
                    );
                }
                // Unsubscribing; its registration removes it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        delivered
    }

    /// Events published to inbox subjects so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Copies of inbox events dropped so far for subscribers too far behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Number of open inbox subscriptions.
    pub fn subscriptions(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }
}
