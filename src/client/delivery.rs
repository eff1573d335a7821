//! What a subscription's delivered events share with it ([`Delivery`]): the connection to
//! acknowledge them through, and how far acknowledgements have come ([`Progress`]), which
//! says where a reconnection resumes.
//!
//! The promise: with manual acks a reconnection resumes after the last event up to which
//! everything was acknowledged, so an event whose ack did not arrive is delivered again;
//! without them it resumes after the last event delivered.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use serde_json::value::RawValue;

use super::error::ClientError;
use super::transport::Transport;

/// Shared (behind an `Arc`) by a subscription and every event it delivered.
pub(super) struct Delivery {
    transport: Transport,
    manual: bool,
    progress: Mutex<Progress>,
}

pub(super) struct Progress {
    /// The server's id for the current connection's consumer.
    pub(super) consumer_id: String,
    /// Manual acks: ids delivered on this connection, in order, and whether each was
    /// acknowledged. Bounded by the connection's `max_inflight`.
    pub(super) unacked: VecDeque<(String, bool)>,
    /// The event after which a reconnection resumes: the last delivered without acks,
    /// the last up to which all were acknowledged with them.
    pub(super) resume_after: Option<String>,
}

impl std::fmt::Debug for Delivery {
    // Every delivered event carries one: keep their debug output short.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("host", &self.transport.host())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// The delivery of a subscription just opened for consumer `consumer_id`.
    pub(super) fn new(transport: Transport, manual: bool, consumer_id: String) -> Delivery {
        Delivery {
            transport,
            manual,
            progress: Mutex::new(Progress {
                consumer_id,
                unacked: VecDeque::new(),
                resume_after: None,
            }),
        }
    }

    /// The connection the subscription reads from and acks through.
    pub(super) fn transport(&self) -> &Transport {
        &self.transport
    }

    pub(super) fn progress(&self) -> MutexGuard<'_, Progress> {
        // A panic while it was held cannot leave it half-updated: every change is one step.
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that event `id` was handed to the reader.
    pub(super) fn delivered(&self, id: &str) {
        let mut progress = self.progress();
        if !self.manual {
            progress.resume_after = Some(id.to_owned());
        } else if !progress.unacked.iter().any(|(unacked, _)| unacked == id) {
            // A redelivery is already listed.
            progress.unacked.push_back((id.to_owned(), false));
        }
    }

    /// Acknowledges event `event_id` of consumer `consumer_id` (with a reply, if given)
    /// and notes it.
    pub(super) async fn ack(
        &self,
        consumer_id: &str,
        event_id: &str,
        reply: Option<&RawValue>,
    ) -> Result<(), ClientError> {
        self.transport.put_ack(consumer_id, event_id, reply).await?;
        self.progress().acked(event_id);
        Ok(())
    }
}

impl Progress {
    fn acked(&mut self, id: &str) {
        if let Some(entry) = self.unacked.iter_mut().find(|(unacked, _)| unacked == id) {
            entry.1 = true;
        }
        while self.unacked.front().is_some_and(|(_, acked)| *acked) {
            self.resume_after = self.unacked.pop_front().map(|(id, _)| id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_acks_resume_after_the_last_contiguous_ack() {
        let base = reqwest::Url::parse("http://localhost:1").unwrap();
        let transport = Transport::new(base, std::time::Duration::from_secs(1), 1 << 20).unwrap();
        let delivery = Delivery::new(transport, true, String::new());
        for id in ["e1", "e2", "e3", "e2"] {
            delivery.delivered(id);
        }
        let mark = |id: &str| delivery.progress().acked(id);
        mark("e2");
        assert_eq!(
            delivery.progress().resume_after,
            None,
            "e1 is still unacked"
        );
        mark("e1");
        assert_eq!(delivery.progress().resume_after.as_deref(), Some("e2"));
        mark("e3");
        assert_eq!(delivery.progress().resume_after.as_deref(), Some("e3"));
        assert!(delivery.progress().unacked.is_empty());
    }
}
