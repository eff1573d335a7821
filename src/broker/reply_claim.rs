//! A reply carried by an ack, claimed once: the claim ([`ReplyClaim`]) holds the reply's
//! place on the connection the event was delivered to (on this node, or on another one
//! on a shared backend) until the reply is published, and gives it back if it is not.

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::acks::Acks;
use super::consumer::{Input, ReplyRefused};
use super::BrokerError;

pub(super) fn not_delivered(consumer_id: &str, event_id: &str) -> BrokerError {
    BrokerError::Conflict(format!(
        "event {event_id} is not waiting for an ack from consumer {consumer_id}: a reply goes \
         with the ack of an event delivered to that connection and not yet acknowledged"
    ))
}

/// Claims the reply to `event_id` from connection `consumer_id` if this node holds that
/// connection; `None` if it does not.
pub(super) async fn claim_held(
    acks: &Acks,
    consumer_id: &str,
    event_id: &str,
) -> Option<Result<ReplyClaim, BrokerError>> {
    let (inputs, member) = acks.dispatcher(consumer_id)?;
    let (answer, answered) = oneshot::channel();
    let claim = Input::ClaimReply {
        event_id: event_id.to_owned(),
        member,
        answer,
    };
    if inputs.send(claim).await.is_err() {
        return Some(Err(not_delivered(consumer_id, event_id)));
    }
    let event = match answered.await {
        Ok(Ok(event)) => event,
        Ok(Err(ReplyRefused::Replied)) => {
            return Some(Err(BrokerError::Conflict(format!(
                "event {event_id} was replied to already; an event takes one reply"
            ))))
        }
        Ok(Err(ReplyRefused::NotDelivered)) | Err(_) => {
            return Some(Err(not_delivered(consumer_id, event_id)))
        }
    };
    let mut claim = ReplyClaim {
        subject: String::new(),
        event_id: event_id.to_owned(),
        holder: Some(ClaimHolder::Here(inputs)),
    };
    // Without a response subject the claim is dropped, so given back.
    claim.subject = match event.response_subject() {
        Some(subject) => subject,
        None => {
            return Some(Err(BrokerError::Conflict(format!(
                "event {event_id} has no response_subject: its publisher asked for no reply"
            ))))
        }
    };
    Some(Ok(claim))
}

/// The one reply to an event, claimed by a connection it was delivered to
/// ([`Broker::claim_reply`]); dropped without being published, it is given back.
pub struct ReplyClaim {
    /// Where the reply goes: the event's `response_subject`.
    pub subject: String,
    pub(super) event_id: String,
    /// Who gives the claim back if it is dropped; `None` once published.
    pub(super) holder: Option<ClaimHolder>,
}

/// Where a claimed reply's connection is.
pub(super) enum ClaimHolder {
    /// On this node: its consumer's dispatcher.
    Here(mpsc::Sender<Input>),
    /// On another node, which holds the claim until told the reply was published (or
    /// not): `give_back` tells it not.
    Elsewhere {
        consumer_id: String,
        give_back: BoxFuture<'static, ()>,
    },
}

impl ReplyClaim {
    /// Marks the claim as used without giving it back: its reply was published (by the
    /// node that asked for it, when the connection is here but the `PUT` came elsewhere).
    pub(super) fn published(mut self) {
        self.holder = None;
    }
}

impl Drop for ReplyClaim {
    fn drop(&mut self) {
        let event_id = std::mem::take(&mut self.event_id);
        match self.holder.take() {
            None => {}
            Some(ClaimHolder::Here(inputs)) => {
                let release = Input::ReleaseReply { event_id };
                if let Err(mpsc::error::TrySendError::Full(release)) = inputs.try_send(release) {
                    // A busy dispatcher gets it as soon as it has room.
                    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                        runtime.spawn(async move {
                            let _ = inputs.send(release).await;
                        });
                    }
                }
            }
            Some(ClaimHolder::Elsewhere { give_back, .. }) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(give_back);
                }
            }
        }
    }
}
