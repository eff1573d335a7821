//! In-memory inbox subjects (`_bus_.…`): the return path of request/reply and
//! confirmations.
//!
//! An event published to an inbox subject is never written to disk. It goes, at once, to
//! every subscription open on exactly that subject at that moment; there is no history
//! and no wildcard. Each subscription holds at most [`INBOX_BUFFER`] events and
//! [`INBOX_BACKLOG_BYTES`] of them waiting for its reader (or one event, whatever its
//! size, when nothing waits): a reader that falls further behind loses the overflow,
//! which is logged and counted, rather than making the server buffer without bound. An
//! event published to several subscribers is one copy in memory, shared.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::listening::Listening;
use crate::event::StoredEvent;

/// Events an inbox subscription may have waiting.
pub const INBOX_BUFFER: usize = 256;
/// Bytes (of SSE frames) an inbox subscription may have waiting, beyond one event.
pub const INBOX_BACKLOG_BYTES: usize = 4 << 20;

/// One subscription as publishers see it: where its events go and what waits there.
struct Subscriber {
    id: u64,
    events: mpsc::Sender<StoredEvent>,
    waiting: Arc<AtomicUsize>,
}

type Subscribers = HashMap<String, Vec<Subscriber>>;

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
    /// Bytes of the events waiting in `events`.
    waiting: Arc<AtomicUsize>,
    _registration: Registration,
    /// The node's listener for what other nodes publish to the subject, if it has one.
    relayed: Option<Arc<Listening>>,
}

impl InboxSubscription {
    /// Keeps the node listening for the subject's events from other nodes while this
    /// subscription lives.
    pub(super) fn hear_other_nodes(&mut self, listener: Option<Arc<Listening>>) {
        self.relayed = listener;
    }

    /// The next event published to the subject.
    pub async fn recv(&mut self) -> Option<StoredEvent> {
        let event = self.events.recv().await?;
        self.waiting
            .fetch_sub(event.sse_frame().len(), Ordering::Relaxed);
        Some(event)
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
            list.retain(|subscriber| subscriber.id != self.id);
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
        let waiting = Arc::new(AtomicUsize::new(0));
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(subject.to_owned())
            .or_default()
            .push(Subscriber {
                id,
                events: sender,
                waiting: Arc::clone(&waiting),
            });
        InboxSubscription {
            events,
            waiting,
            _registration: Registration {
                subscribers: Arc::clone(&self.subscribers),
                subject: subject.to_owned(),
                id,
            },
            relayed: None,
        }
    }

    /// Hands an event published on this node to the current subscribers of `subject`;
    /// returns how many got it.
    pub fn publish(&self, subject: &str, event: &StoredEvent) -> usize {
        self.published.fetch_add(1, Ordering::Relaxed);
        self.deliver(subject, event)
    }

    /// Hands an event to the current subscribers of `subject` (one published on this node,
    /// or relayed from another); returns how many got it.
    pub fn deliver(&self, subject: &str, event: &StoredEvent) -> usize {
        let subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = subscribers.get(subject) else {
            return 0;
        };
        let size = event.sse_frame().len();
        let mut delivered = 0;
        for subscriber in list {
            // Counted before it is sent, so that the reader never subtracts it first.
            let waiting = subscriber.waiting.fetch_add(size, Ordering::Relaxed);
            let room = waiting == 0 || waiting + size <= INBOX_BACKLOG_BYTES;
            let sent = match room {
                true => subscriber.events.try_send(event.clone()),
                false => Err(mpsc::error::TrySendError::Full(event.clone())),
            };
            match sent {
                Ok(()) => {
                    delivered += 1;
                    continue;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        subject,
                        event_id = event.id(),
                        waiting_bytes = waiting,
                        "inbox subscriber is {INBOX_BUFFER} events or {INBOX_BACKLOG_BYTES} bytes behind; dropping the event for it"
                    );
                }
                // Unsubscribing; its registration removes it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
            subscriber.waiting.fetch_sub(size, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventDraft, JsonLayout, PendingEvent};

    fn event(payload_bytes: usize) -> StoredEvent {
        let payload = format!("\"{}\"", "x".repeat(payload_bytes));
        let pending = PendingEvent::new(&EventDraft {
            subject: "_bus_.inbox",
            payload: Some(payload.as_bytes()),
            ..EventDraft::default()
        })
        .unwrap();
        let mut json = Vec::new();
        let created_at = crate::timestamp::Timestamp::from_unix_nanos(0).format();
        let layout: JsonLayout = pending.write_json(&mut json, "e_1", &created_at, -1);
        let mut frame = bytes::BytesMut::new();
        crate::event::push_sse_frame(&mut frame, "e_1", &json);
        StoredEvent::new(0, frame.freeze(), &layout)
    }

    #[tokio::test]
    async fn a_reader_that_stops_holds_a_bounded_backlog_in_bytes() {
        let inboxes = Inboxes::default();
        let mut stopped = inboxes.subscribe("_bus_.inbox");
        let mut reading = inboxes.subscribe("_bus_.inbox");
        let large = event(1 << 20);
        for _ in 0..20 {
            inboxes.publish("_bus_.inbox", &large);
            assert_eq!(
                reading.recv().await.map(|e| e.id().to_owned()),
                Some("e_1".into())
            );
        }
        assert!(stopped.waiting.load(Ordering::Relaxed) <= INBOX_BACKLOG_BYTES);
        assert!(inboxes.dropped() >= 20 - (INBOX_BACKLOG_BYTES >> 20) as u64);
        // What waited is still delivered, and then there is room again.
        while stopped.waiting.load(Ordering::Relaxed) > 0 {
            stopped.recv().await.unwrap();
        }
        let huge = event(3 * INBOX_BACKLOG_BYTES);
        assert_eq!(
            inboxes.publish("_bus_.inbox", &huge),
            2,
            "one event always fits"
        );
    }
}
