//! Routing of acknowledgements (`PUT /`) to the manual-ack subscriptions waiting for them.
//!
//! A manual-ack subscription registers its consumer id while it is open. An ack for an
//! unknown consumer, or for an event the consumer is not waiting for, is accepted and
//! ignored: acks that arrive after a redelivery or after the consumer left are normal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// Acks a consumer may have queued before further ones are dropped (a consumer waits for
/// one event at a time, so only a misbehaving client gets near this).
const ACK_QUEUE: usize = 64;

/// Who a consumer belongs to, and where its acks go.
struct Consumer {
    acks: mpsc::Sender<String>,
    namespace: String,
    owner: Option<u32>,
}

type Consumers = HashMap<String, Consumer>;

#[derive(Default)]
pub struct Acks {
    consumers: Arc<Mutex<Consumers>>,
}

/// The acks addressed to one consumer; dropping it unregisters the consumer.
pub struct AckReceiver {
    acks: mpsc::Receiver<String>,
    consumers: Arc<Mutex<Consumers>>,
    consumer_id: String,
}

impl AckReceiver {
    /// The id of the next event acknowledged by this consumer.
    pub async fn recv(&mut self) -> Option<String> {
        self.acks.recv().await
    }
}

impl Drop for AckReceiver {
    fn drop(&mut self) {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.consumer_id);
    }
}

impl Acks {
    /// Registers a consumer of `namespace`, opened by `owner` (an identity the HTTP
    /// layer gives, when it authenticates requests).
    pub fn register(&self, consumer_id: &str, namespace: &str, owner: Option<u32>) -> AckReceiver {
        let (sender, acks) = mpsc::channel(ACK_QUEUE);
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                consumer_id.to_owned(),
                Consumer {
                    acks: sender,
                    namespace: namespace.to_owned(),
                    owner,
                },
            );
        AckReceiver {
            acks,
            consumers: Arc::clone(&self.consumers),
            consumer_id: consumer_id.to_owned(),
        }
    }

    /// The namespace and owner of a connected consumer.
    pub fn consumer(&self, consumer_id: &str) -> Option<(String, Option<u32>)> {
        let consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        consumers
            .get(consumer_id)
            .map(|c| (c.namespace.clone(), c.owner))
    }

    /// Passes an ack to its consumer, if that consumer is connected.
    pub fn ack(&self, consumer_id: &str, event_id: &str) -> bool {
        let consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        consumers
            .get(consumer_id)
            .is_some_and(|c| c.acks.try_send(event_id.to_owned()).is_ok())
    }
}
