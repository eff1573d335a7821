//! The waits of a publish that the server does itself — confirmations (`confirm=N`) and
//! replies (`reply=1`) — and replies carried by an ack, which are taken once, for an
//! event delivered to that connection (claimed through [`super::reply_claim`]).

use super::relayed;
use super::reply_claim::{claim_held, not_delivered, ClaimHolder, ReplyClaim};
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
    /// a claim dropped unpublished lets the event be replied to again. On a shared
    /// backend the connection may be on another node: the claim is then that node's.
    pub async fn claim_reply(
        &self,
        consumer_id: &str,
        event_id: &str,
    ) -> Result<ReplyClaim, BrokerError> {
        if let Some(claimed) = claim_held(&self.acks, consumer_id, event_id).await {
            return claimed;
        }
        match &self.relay {
            Some(relay) => relayed::claim_reply(relay, consumer_id, event_id).await,
            None => Err(not_delivered(consumer_id, event_id)),
        }
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
        // Published: the claim is not given back (here, by dropping it; on the node
        // holding the connection, by telling it).
        if let (Some(ClaimHolder::Elsewhere { consumer_id, .. }), Some(relay)) =
            (claim.holder.take(), &self.relay)
        {
            relayed::replied(relay, &consumer_id, &claim.event_id).await;
        }
        Ok(())
    }
}
