//! The waits of a publish that the server does itself — confirmations (`confirm=N`) and
//! replies (`reply=1`) — and replies carried by an ack, which are taken once, for an
//! event delivered to that connection.

use tokio::sync::{mpsc, oneshot};

use super::consumer::{Input, ReplyRefused};
use super::relayed;
use super::{
    random_id, Broker, BrokerError, ConfirmWait, InboxSubscription, PublishError, INBOX_NAMESPACE,
};
use crate::event::{EventDraft, PendingEvent};
use crate::subject::Subject;

impl Broker {
    /// Starts counting the consumers that acknowledge `event_id` (before it is published;
    /// see [`confirm`]).
    pub async fn expect_confirmations(&self, event_id: &str) -> ConfirmWait {
        let mut wait = self.confirmations.expect(event_id);
        if let Some(relay) = &self.relay {
            match relayed::hear_confirmations(relay, &self.confirmations, event_id).await {
                Ok(listening) => wait.relayed = Some(listening),
                Err(e) => {
                    tracing::warn!(event_id, error = %e, "confirmations given on other nodes will not count")
                }
            }
        }
        wait
    }

    /// A fresh inbox subject, already subscribed (also to what other nodes publish to it),
    /// for a reply to come to.
    pub async fn reply_inbox(&self) -> (String, InboxSubscription) {
        let subject = format!("{INBOX_NAMESPACE}.{}", random_id("r_"));
        let inbox = self.subscribe_inbox(&subject).await;
        (subject, inbox)
    }

    /// Subscribes to inbox subject `subject`, on this node and, on a shared backend, on
    /// the others.
    pub(super) async fn subscribe_inbox(&self, subject: &str) -> InboxSubscription {
        let mut inbox = self.inboxes.subscribe(subject);
        if let Some(relayed) = &self.relayed_inboxes {
            inbox.hear_other_nodes(relayed.listen(subject).await);
        }
        inbox
    }

    /// Claims the one reply to `event_id` for the connection `consumer_id`: the event
    /// must have been delivered to that connection, not be acknowledged yet, not have
    /// been replied to, and name a `response_subject`. The claim tells where the reply
    /// goes (for the front end to authorize); [`Broker::publish_reply`] publishes it, and
    /// a claim dropped unpublished lets the event be replied to again.
    pub async fn claim_reply(
        &self,
        consumer_id: &str,
        event_id: &str,
    ) -> Result<ReplyClaim, BrokerError> {
        let not_delivered = || {
            BrokerError::Conflict(format!(
                "event {event_id} is not waiting for an ack from consumer {consumer_id}: a reply goes \
                 with the ack of an event delivered to that connection and not yet acknowledged"
            ))
        };
        let (inputs, member) = self
            .acks
            .dispatcher(consumer_id)
            .ok_or_else(not_delivered)?;
        let (answer, answered) = oneshot::channel();
        let claim = Input::ClaimReply {
            event_id: event_id.to_owned(),
            member,
            answer,
        };
        if inputs.send(claim).await.is_err() {
            return Err(not_delivered());
        }
        let event = match answered.await {
            Ok(Ok(event)) => event,
            Ok(Err(ReplyRefused::Replied)) => {
                return Err(BrokerError::Conflict(format!(
                    "event {event_id} was replied to already; an event takes one reply"
                )))
            }
            Ok(Err(ReplyRefused::NotDelivered)) | Err(_) => return Err(not_delivered()),
        };
        let mut claim = ReplyClaim {
            subject: String::new(),
            event_id: event_id.to_owned(),
            inputs: Some(inputs),
        };
        claim.subject = event.response_subject().ok_or_else(|| {
            BrokerError::Conflict(format!(
                "event {event_id} has no response_subject: its publisher asked for no reply"
            ))
        })?;
        Ok(claim)
    }

    /// Publishes `payload` as the claimed reply, to the event's `response_subject`.
    pub async fn publish_reply(
        &self,
        mut claim: ReplyClaim,
        payload: &[u8],
    ) -> Result<(), PublishError> {
        let subject = Subject::parse(&claim.subject)
            .map_err(|e| PublishError::Invalid(format!("response_subject: {e}")))?;
        let draft = EventDraft {
            subject: &claim.subject,
            payload: Some(payload),
            ..EventDraft::default()
        };
        let reply = PendingEvent::new(&draft).map_err(|e| PublishError::Invalid(e.to_string()))?;
        if subject.is_inbox() {
            self.publish_to_inbox(&claim.subject, &reply).await;
        } else {
            let log = self
                .log(subject.namespace())
                .map_err(PublishError::Invalid)?;
            log.append(vec![reply])
                .await
                .map_err(PublishError::Storage)?;
        }
        claim.inputs = None;
        Ok(())
    }
}

/// The one reply to an event, claimed by a connection it was delivered to
/// ([`Broker::claim_reply`]); dropped without being published, it is given back.
pub struct ReplyClaim {
    /// Where the reply goes: the event's `response_subject`.
    pub subject: String,
    event_id: String,
    /// The dispatcher to give the claim back to; `None` once published.
    inputs: Option<mpsc::Sender<Input>>,
}

impl Drop for ReplyClaim {
    fn drop(&mut self) {
        let Some(inputs) = self.inputs.take() else {
            return;
        };
        let release = Input::ReleaseReply {
            event_id: std::mem::take(&mut self.event_id),
        };
        if let Err(mpsc::error::TrySendError::Full(release)) = inputs.try_send(release) {
            // A busy dispatcher gets it as soon as it has room.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = inputs.send(release).await;
                });
            }
        }
    }
}
