//! Inbox events across nodes: on a shared backend (JetStream) an inbox subscription on one
//! node receives what is published to its subject through another — a request's reply
//! written by a worker on another node, say. A node listens, through the backend's
//! [`Relay`], on `$BUS.inbox.<subject>` while it has subscriptions on that subject (one
//! listener per subject, shared by them), and sends what is published to an inbox subject
//! there as well as to its own subscribers. Nothing is kept: a node without subscribers
//! does not hear the event, as on one node.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use bytes::Bytes;

use super::inbox::Inboxes;
use super::listening::Listening;
use crate::event::StoredEvent;
use crate::store::Relay;

/// The relay subject of inbox subject `inbox`.
fn subject(inbox: &str) -> String {
    format!("$BUS.inbox.{inbox}")
}

pub(super) struct RelayedInboxes {
    relay: Arc<dyn Relay>,
    inboxes: Arc<Inboxes>,
    /// The listener of each subject with subscriptions on this node. Held (under the
    /// lock) while one is started, so that a subject never gets two.
    listening: tokio::sync::Mutex<HashMap<String, Weak<Listening>>>,
}

impl RelayedInboxes {
    pub(super) fn new(relay: Arc<dyn Relay>, inboxes: Arc<Inboxes>) -> RelayedInboxes {
        RelayedInboxes {
            relay,
            inboxes,
            listening: tokio::sync::Mutex::default(),
        }
    }

    /// Hears what other nodes publish to `inbox` while the handle lives.
    pub(super) async fn listen(&self, inbox: &str) -> Option<Arc<Listening>> {
        let mut listening = self.listening.lock().await;
        if let Some(listener) = listening.get(inbox).and_then(Weak::upgrade) {
            return Some(listener);
        }
        listening.retain(|_, listener| listener.strong_count() > 0);
        let mut listener = match self.relay.listen(&subject(inbox)).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(subject = inbox, error = %e, "inbox events published through other nodes will not reach this subscription");
                return None;
            }
        };
        let (inboxes, inbox_subject) = (Arc::clone(&self.inboxes), inbox.to_owned());
        let task = tokio::spawn(async move {
            while let Some((json, _)) = listener.next().await {
                match StoredEvent::from_json(0, &json) {
                    Some(event) => {
                        inboxes.deliver(&inbox_subject, &event);
                    }
                    None => {
                        tracing::warn!(
                            subject = inbox_subject,
                            "a relayed inbox event that is not an event is ignored"
                        )
                    }
                }
            }
        });
        let listener = Arc::new(Listening(task));
        listening.insert(inbox.to_owned(), Arc::downgrade(&listener));
        Some(listener)
    }

    /// Sends an event published to `inbox` on this node to the other nodes.
    pub(super) async fn publish(&self, inbox: &str, event: &StoredEvent) {
        let json = Bytes::copy_from_slice(&event.json());
        if let Err(e) = self.relay.publish(&subject(inbox), json).await {
            tracing::warn!(subject = inbox, error = %e, "an inbox event could not be sent to the other nodes");
        }
    }
}
