//! Acks across nodes. On a shared backend (JetStream) a load balancer may send a `PUT`
//! anywhere, and a publisher waiting for confirmations may be on another node than the
//! consumers that give them. Each manual-ack connection
//! listens, through the backend's [`Relay`], on `$BUS.consumer.<consumer_id>`; a node that
//! gets an ack for a consumer id it does not hold asks there who holds it (for the
//! authorization checks) and hands the ack over. Nothing answers for a consumer id no node
//! holds: the ack is then accepted and ignored, as a late ack is on one node.
//!
//! A reply carried by an ack (`PUT` with a body) that comes to another node is claimed
//! there, on the holding node, which keeps the claim while the other node checks the
//! token's grant on the reply's subject and publishes it.
//!
//! Confirmations: the node of a connection that acknowledges an event sends the fact on
//! `$BUS.confirm.<event_id>`; a node where a publisher waits for that event's
//! confirmations listens there while it waits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::acks::Acks;
use super::confirm::Confirmations;
use super::consumer::sleep_until;
use super::listening::Listening;
use super::reply_claim::{self, ClaimHolder, ReplyClaim};
use super::{Broker, BrokerError, Owner};
use crate::store::{Relay, StorageError};

/// What one node asks another about a connection it holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Ask {
    /// Its namespace and owner.
    Lookup,
    Ack {
        event_ids: Vec<String>,
    },
    Nak {
        event_ids: Vec<String>,
        delay_ms: u64,
    },
    /// Claim the reply to an event (a `PUT` with a body came to another node): answered
    /// with a [`ClaimAnswer`]; the claim is held until [`Ask::Replied`] or
    /// [`Ask::ReleaseReply`] comes, or for [`CLAIM_HELD_FOR`].
    ClaimReply {
        event_id: String,
    },
    /// The claimed reply was published.
    Replied {
        event_id: String,
    },
    /// The claimed reply was not published: the event may be replied to again.
    ReleaseReply {
        event_id: String,
    },
}

/// The answer to [`Ask::ClaimReply`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ClaimAnswer {
    /// Claimed: the reply goes to this subject.
    Claimed(String),
    /// Refused, for this reason (the event was not delivered to the connection, was
    /// replied to already, or expects no reply).
    Refused(String),
}

/// How long a node holds a reply claimed for another node that says nothing more (it
/// went away between claiming and publishing): the event may then be replied to again.
const CLAIM_HELD_FOR: Duration = Duration::from_secs(30);

/// The answer to [`Ask::Lookup`].
#[derive(Debug, Serialize, Deserialize)]
struct Held {
    namespace: String,
    owner: Option<Owner>,
}

/// The subject a connection's acks are relayed on.
fn subject(consumer_id: &str) -> String {
    format!("$BUS.consumer.{consumer_id}")
}

/// Starts listening for acks relayed to manual-ack connection `consumer_id`.
pub(super) async fn listen(
    relay: &Arc<dyn Relay>,
    acks: &Arc<Acks>,
    consumer_id: &str,
) -> Result<Listening, StorageError> {
    let mut listener = relay.listen(&subject(consumer_id)).await?;
    let (acks, consumer_id) = (Arc::clone(acks), consumer_id.to_owned());
    Ok(Listening(tokio::spawn(async move {
        // Replies claimed for other nodes, by event id, with when they are given back.
        let mut claims: HashMap<String, (ReplyClaim, Instant)> = HashMap::new();
        loop {
            let expiry = claims.values().map(|(_, until)| *until).min();
            let next = tokio::select! {
                next = listener.next() => next,
                () = sleep_until(expiry) => {
                    let now = Instant::now();
                    claims.retain(|_, (_, until)| *until > now);
                    continue;
                }
            };
            let Some((body, reply)) = next else {
                return;
            };
            let Some(reply) = reply else {
                continue;
            };
            let answer = match serde_json::from_slice::<Ask>(&body) {
                Ok(Ask::Lookup) => match acks.consumer(&consumer_id) {
                    Some((namespace, owner)) => serde_json::to_vec(&Held { namespace, owner }),
                    None => continue,
                },
                Ok(Ask::Ack { event_ids }) => {
                    acks.ack(&consumer_id, event_ids);
                    Ok(b"{}".to_vec())
                }
                Ok(Ask::Nak {
                    event_ids,
                    delay_ms,
                }) => {
                    for id in event_ids {
                        acks.nak(&consumer_id, id, Duration::from_millis(delay_ms));
                    }
                    Ok(b"{}".to_vec())
                }
                Ok(Ask::ClaimReply { event_id }) => {
                    let answer = match reply_claim::claim_held(&acks, &consumer_id, &event_id).await
                    {
                        None => continue,
                        Some(Ok(claim)) => {
                            let subject = claim.subject.clone();
                            claims.insert(event_id, (claim, Instant::now() + CLAIM_HELD_FOR));
                            ClaimAnswer::Claimed(subject)
                        }
                        Some(Err(refused)) => ClaimAnswer::Refused(refused.to_string()),
                    };
                    serde_json::to_vec(&answer)
                }
                Ok(Ask::Replied { event_id }) => {
                    if let Some((claim, _)) = claims.remove(&event_id) {
                        claim.published();
                    }
                    Ok(b"{}".to_vec())
                }
                Ok(Ask::ReleaseReply { event_id }) => {
                    claims.remove(&event_id);
                    Ok(b"{}".to_vec())
                }
                Err(e) => {
                    tracing::warn!(consumer_id, error = %e, "a relayed ack that is not one is ignored");
                    continue;
                }
            };
            if let Ok(answer) = answer {
                listener.answer(reply, Bytes::from(answer)).await;
            }
        }
    })))
}

/// Claims, on the node holding connection `consumer_id`, the reply to `event_id`.
pub(super) async fn claim_reply(
    relay: &Arc<dyn Relay>,
    consumer_id: &str,
    event_id: &str,
) -> Result<ReplyClaim, BrokerError> {
    let ask = Ask::ClaimReply {
        event_id: event_id.to_owned(),
    };
    let Some(answer) = ask_holder(relay, consumer_id, &ask).await? else {
        return Err(reply_claim::not_delivered(consumer_id, event_id));
    };
    match serde_json::from_slice::<ClaimAnswer>(&answer) {
        Ok(ClaimAnswer::Claimed(subject)) => Ok(ReplyClaim {
            subject,
            event_id: event_id.to_owned(),
            holder: Some(ClaimHolder::Elsewhere {
                consumer_id: consumer_id.to_owned(),
                give_back: Box::pin(release_reply(
                    Arc::clone(relay),
                    consumer_id.to_owned(),
                    event_id.to_owned(),
                )),
            }),
        }),
        Ok(ClaimAnswer::Refused(reason)) => Err(BrokerError::Conflict(reason)),
        Err(e) => {
            tracing::error!(consumer_id, error = %e, "a node answered a reply claim with nonsense");
            Err(BrokerError::Storage(
                "the node holding this consumer answered nonsense".into(),
            ))
        }
    }
}

/// Tells the node holding connection `consumer_id` that the reply it claimed for
/// `event_id` was published.
pub(super) async fn replied(relay: &Arc<dyn Relay>, consumer_id: &str, event_id: &str) {
    let ask = Ask::Replied {
        event_id: event_id.to_owned(),
    };
    if !matches!(ask_holder(relay, consumer_id, &ask).await, Ok(Some(_))) {
        tracing::warn!(
            consumer_id,
            event_id,
            "the node holding a consumer did not hear that its event was replied to; it may take another reply"
        );
    }
}

/// Gives back, on the node holding connection `consumer_id`, the reply it claimed for
/// `event_id`.
async fn release_reply(relay: Arc<dyn Relay>, consumer_id: String, event_id: String) {
    let ask = Ask::ReleaseReply { event_id };
    let _ = ask_holder(&relay, &consumer_id, &ask).await;
}

impl Broker {
    /// Whether acks for connections this node does not hold can go to the node that does.
    pub fn relays_acks(&self) -> bool {
        self.relay.is_some()
    }

    /// The namespace and owner of a manual-ack connection another node holds; `None` if
    /// no node holds it.
    pub async fn remote_consumer(
        &self,
        consumer_id: &str,
    ) -> Result<Option<(String, Option<Owner>)>, BrokerError> {
        let Some(answer) = self.ask(consumer_id, &Ask::Lookup).await? else {
            return Ok(None);
        };
        let held: Held = serde_json::from_slice(&answer).map_err(|e| {
            tracing::error!(consumer_id, error = %e, "a node answered a lookup with nonsense");
            BrokerError::Storage("the node holding this consumer answered nonsense".into())
        })?;
        Ok(Some((held.namespace, held.owner)))
    }

    /// Hands acks (or, with a delay, negative acks) to the node holding connection
    /// `consumer_id`; whether one does.
    pub async fn relay_ack(
        &self,
        consumer_id: &str,
        event_ids: Vec<String>,
        nak: Option<Duration>,
    ) -> Result<bool, BrokerError> {
        let ask = match nak {
            None => Ask::Ack { event_ids },
            Some(delay) => Ask::Nak {
                event_ids,
                delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            },
        };
        Ok(self.ask(consumer_id, &ask).await?.is_some())
    }

    /// Asks the node holding `consumer_id` ([`ask_holder`]).
    async fn ask(&self, consumer_id: &str, ask: &Ask) -> Result<Option<Bytes>, BrokerError> {
        match &self.relay {
            Some(relay) => ask_holder(relay, consumer_id, ask).await,
            None => Ok(None),
        }
    }
}

/// Asks the node holding `consumer_id`; `None` when none answers. A node that does not
/// answer in time (it is going away, or the connection just left) counts as none: an ack
/// is then a late one, accepted and ignored, and the event is redelivered.
async fn ask_holder(
    relay: &Arc<dyn Relay>,
    consumer_id: &str,
    ask: &Ask,
) -> Result<Option<Bytes>, BrokerError> {
    let body = serde_json::to_vec(ask).map_err(|e| BrokerError::Storage(e.to_string()))?;
    match relay
        .request(&subject(consumer_id), Bytes::from(body))
        .await
    {
        Ok(answer) => Ok(answer),
        Err(e) => {
            tracing::warn!(consumer_id, error = %e, "no node answered for a consumer; its ack is dropped");
            Ok(None)
        }
    }
}

/// An ack that counts for a confirmation (`confirm=N`), sent to the node where the
/// publisher waits: on a shared backend, the consumers may be on other nodes.
#[derive(Debug, Serialize, Deserialize)]
struct Confirmation {
    consumer: String,
    zone: Option<String>,
}

/// The relay subject of the confirmations of `event_id`.
fn confirmations_subject(event_id: &str) -> String {
    format!("$BUS.confirm.{event_id}")
}

/// Tells the other nodes that `consumer` (in `zone`) acknowledged `event_id`: a publisher
/// may wait for its confirmations there.
pub(super) async fn send_confirmation(
    relay: &dyn Relay,
    event_id: &str,
    consumer: &str,
    zone: Option<&str>,
) {
    let confirmation = Confirmation {
        consumer: consumer.to_owned(),
        zone: zone.map(str::to_owned),
    };
    let Ok(body) = serde_json::to_vec(&confirmation) else {
        return;
    };
    if let Err(e) = relay
        .publish(&confirmations_subject(event_id), Bytes::from(body))
        .await
    {
        tracing::warn!(event_id, error = %e, "a confirmation could not be sent to the other nodes");
    }
}

/// Counts the confirmations of `event_id` that other nodes send, while the handle lives.
pub(super) async fn hear_confirmations(
    relay: &Arc<dyn Relay>,
    confirmations: &Arc<Confirmations>,
    event_id: &str,
) -> Result<Listening, StorageError> {
    let mut listener = relay.listen(&confirmations_subject(event_id)).await?;
    let (confirmations, event_id) = (Arc::clone(confirmations), event_id.to_owned());
    Ok(Listening(tokio::spawn(async move {
        while let Some((body, _)) = listener.next().await {
            match serde_json::from_slice::<Confirmation>(&body) {
                Ok(c) => confirmations.record(&event_id, &c.consumer, c.zone.as_deref()),
                Err(e) => {
                    tracing::warn!(event_id, error = %e, "a relayed confirmation that is not one is ignored")
                }
            }
        }
    })))
}
