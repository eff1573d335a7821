//! Manual-ack consumers that the storage runs itself ([`ServedConsumers`]: JetStream
//! consumers). The storage keeps what each consumer was delivered and has acknowledged,
//! redelivers what is not acknowledged within the redelivery time, and honours a negative
//! ack's delay; the broker checks owners, patterns and limits, and runs one task per
//! connection (a member) that pulls what its window has room for, hands it to the
//! connection and settles what the connection acknowledges.
//!
//! What a member promises, as the dispatcher of [`super::consumer`] does:
//! - **Windows per connection**: a member holds at most its `max_inflight` events and
//!   about `max_inflight_bytes` of them (always at least one), because it only pulls what
//!   it has room for. The members of a durable consumer (a queue group) share its events.
//! - **Redelivery and dead letters**: an event comes back after the redelivery time, to
//!   whichever member pulls next. A delivery past `max_deliveries` is not handed out: a
//!   durable consumer appends the event to its dead-letter subject, then the event is
//!   terminated (an ephemeral one just moves on). The storage counts deliveries, so this
//!   holds whichever member, or node, gets that delivery; a node that dies between the
//!   dead letter and the termination gives the event a second dead letter, never none.
//! - **Leaving hands back**: a member that leaves gives back what it held (negative acks
//!   without delay), so the others get it within seconds (once its pull requests have
//!   ended, see the store), not after the redelivery time; a node that dies gives it back
//!   by the redelivery time.
//! - **Replies** are claimed once per delivery to a connection: the claim is the member's
//!   (in memory), not the storage's.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::confirm::Confirmations;
use super::consumer::{self, give_up_event, sleep_until, Input, Redelivery, ReplyRefused};
use super::durable::DurableKey;
use super::relayed::send_confirmation;
use super::relayed_members;
use super::subscription::{self, next_outage};
use super::{
    Broker, BrokerError, ConsumerBackend, ConsumerInfo, ConsumerName, Delivery, Owner, Skipped,
    SubscribeRequest,
};
use crate::event::StoredEvent;
use crate::store::{
    ErrorKind, EventLog, Relay, Served, ServedConsumers, ServedMember, ServedSpec, Settle,
    StorageError,
};

/// The most unacknowledged events a consumer may have out in the storage, across its
/// members. Each member's window is its own, kept by what it pulls; this is only a
/// ceiling. It cannot be the window: an event given back with a delay (a negative ack)
/// stays unacknowledged in JetStream until it is redelivered, while its slot in the
/// window is free at once.
const MAX_ACK_PENDING: usize = 10 * super::MAX_INFLIGHT;
/// How often a member that stops at a position checks whether it is done, while it holds
/// nothing (acks it sent may not have been counted at its last check).
const DONE_CHECK: Duration = Duration::from_millis(200);

/// A member's connection, and what it is.
pub(super) struct Joining {
    pub member: u64,
    pub max_inflight: usize,
    pub redelivery: Redelivery,
    pub deliveries: mpsc::Sender<Delivery>,
    /// Where it stops: the committed watermark when it was opened (`until=now`).
    pub stop_at: Option<u64>,
}

impl Broker {
    /// Opens a member of the served consumer `request` names (an ephemeral one without a
    /// name), creating the consumer if needed, and starts its task; the sender takes the
    /// member's inputs (acks, naks, replies).
    pub(super) async fn join_served(
        &self,
        served: &Arc<dyn ServedConsumers>,
        log: &Arc<dyn EventLog>,
        request: &SubscribeRequest,
        start: subscription::From,
        joining: Joining,
    ) -> Result<mpsc::Sender<Input>, BrokerError> {
        let namespace = log.namespace();
        let pattern = request.pattern.as_str();
        let (inputs, receiver) = mpsc::channel(consumer::INPUT_QUEUE);
        let start = match subscription::resolve(log.as_ref(), start).await {
            Ok(position) => position,
            Err(message) => {
                // Told on the stream, as on the file store; the stream then ends.
                let _ = joining.deliveries.try_send(Delivery::Error(message));
                return Ok(inputs);
            }
        };
        let first = log.first_position();
        let notice = (start < first).then(|| Skipped {
            first: start,
            last: first - 1,
            next: first,
        });
        let spec = ServedSpec {
            namespace,
            name: request.consumer.as_ref(),
            pattern,
            owner: request.owner.as_ref(),
            start: start.max(first),
            ack_wait: joining.redelivery.every,
            max_ack_pending: MAX_ACK_PENDING,
        };
        let member = match &request.consumer {
            None => served.join(spec).await.map_err(storage_failed)?,
            Some(name) => self.join_durable(served, name, request, spec).await?,
        };
        if let Some(skipped) = notice {
            let _ = joining.deliveries.try_send(Delivery::Skipped(skipped));
        }
        let key = request
            .consumer
            .as_ref()
            .map(|name| (namespace.to_owned(), name.clone()));
        if let Some(key) = &key {
            self.served_members
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.clone())
                .or_default()
                .insert(joining.member, inputs.clone());
            self.answer_member_counts().await;
        }
        let member_loop = MemberLoop {
            member,
            log: Arc::clone(log),
            inputs: receiver,
            deliveries: joining.deliveries,
            window: joining.max_inflight.max(1),
            max_bytes: self.max_inflight_bytes,
            redelivery: joining.redelivery.every,
            max_deliveries: joining.redelivery.max_deliveries,
            consumer: request.consumer.clone(),
            stop_at: joining.stop_at,
            held: HashMap::new(),
            held_bytes: 0,
            confirmations: Arc::clone(&self.confirmations),
            relay: self.relay.clone(),
            counts: Arc::clone(&self.delivery_counts),
            shutdown: self.shutdown.subscribe(),
            outage: log.watch_outage(),
        };
        let members = Arc::clone(&self.served_members);
        let id = joining.member;
        self.run_dispatcher(async move {
            member_loop.run().await;
            if let Some(key) = key {
                let mut members = members.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(of_consumer) = members.get_mut(&key) {
                    of_consumer.remove(&id);
                    if of_consumer.is_empty() {
                        members.remove(&key);
                    }
                }
            }
        });
        Ok(inputs)
    }

    /// Joins durable consumer `name`, creating it within the limits if it does not exist;
    /// its owner and pattern are checked first.
    async fn join_durable(
        &self,
        served: &Arc<dyn ServedConsumers>,
        name: &ConsumerName,
        request: &SubscribeRequest,
        spec: ServedSpec<'_>,
    ) -> Result<Box<dyn ServedMember>, BrokerError> {
        let namespace = spec.namespace;
        let key = (namespace.to_owned(), name.clone());
        let _changing = self.lock_changes(&key).await;
        let stored = served.find(namespace, name).await.map_err(storage_failed)?;
        match stored {
            Some(stored) => {
                check_owner(name, stored.owner.as_ref(), request)?;
                if stored.pattern != spec.pattern {
                    return Err(super::durable::pattern_conflict(
                        name,
                        &stored.pattern,
                        spec.pattern,
                    ));
                }
                let mut owner = stored.owner;
                if owner.is_none() {
                    if let Some(caller) = &request.owner {
                        tracing::info!(consumer = %name, "a durable consumer without an owner now belongs to the token that attached to it");
                        served
                            .set_owner(namespace, name, caller)
                            .await
                            .map_err(storage_failed)?;
                        owner = Some(caller.clone());
                    }
                }
                self.registry.insert(namespace, name.clone(), owner);
                served.join(spec).await.map_err(storage_failed)
            }
            None => {
                self.registry
                    .create(namespace, name, request.owner.as_ref())
                    .map_err(|refusal| super::durable::too_many_consumers(namespace, refusal))?;
                let joined = served.join(spec).await;
                if joined.is_err() {
                    self.registry.remove(namespace, name);
                }
                joined.map_err(storage_failed)
            }
        }
    }

    /// The durable consumers of `namespace` as the storage keeps them, with this node's
    /// members.
    pub(super) async fn served_consumers(
        &self,
        served: &Arc<dyn ServedConsumers>,
        log: &Arc<dyn EventLog>,
    ) -> Result<Vec<ConsumerInfo>, BrokerError> {
        let namespace = log.namespace();
        let listed = served.list(namespace).await.map_err(|e| {
            tracing::error!(namespace, error = %e, "listing the durable consumers failed");
            BrokerError::Storage(format!(
                "the durable consumers of {namespace} cannot be listed (see the server's log)"
            ))
        })?;
        let committed = log.committed();
        let members = self
            .served_members
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok(listed
            .into_iter()
            .map(|stored| {
                let floor = if stored.pending == 0 && stored.undelivered == 0 {
                    committed
                } else {
                    stored.floor.min(committed)
                };
                let key = (namespace.to_owned(), stored.name.clone());
                ConsumerInfo {
                    dead_letter_subject: consumer::dead_letter_subject(namespace, &stored.name),
                    name: stored.name.to_string(),
                    pattern: stored.pattern,
                    acked_floor: floor,
                    pending: stored.pending,
                    lag: committed.saturating_sub(floor),
                    members: members.get(&key).map_or(0, |m| m.len() as u64),
                }
            })
            .collect())
    }

    /// From now on, answers other nodes (on a shared backend) asking how many members
    /// this node has of each durable consumer.
    async fn answer_member_counts(&self) {
        let Some(relay) = &self.relay else {
            return;
        };
        let answering = self.members_answering.get_or_try_init(|| async {
            let members = Arc::clone(&self.served_members);
            let count = move |namespace: &str| {
                let members = members.lock().unwrap_or_else(|p| p.into_inner());
                members
                    .iter()
                    .filter(|((ns, _), _)| ns == namespace)
                    .map(|((_, name), of_consumer)| (name.to_string(), of_consumer.len() as u64))
                    .collect()
            };
            relayed_members::listen(relay, count).await
        });
        // Tried again when the next member joins.
        if let Err(e) = answering.await {
            tracing::warn!(error = %e, "other nodes do not count this node's members of durable consumers yet");
        }
    }

    /// Adds to `consumers` (the durable consumers of `namespace`, as listed by
    /// [`Broker::consumers`]) their members on other nodes, when the storage serves
    /// consumers to several nodes.
    pub async fn add_members_elsewhere(&self, namespace: &str, consumers: &mut [ConsumerInfo]) {
        if let (Some(relay), ConsumerBackend::Served(_)) = (&self.relay, &self.consumers) {
            relayed_members::add_members_elsewhere(relay.as_ref(), namespace, consumers).await;
        }
    }

    /// Deletes durable consumer `name` from the storage; this node's members' streams end.
    pub(super) async fn delete_served(
        &self,
        served: &Arc<dyn ServedConsumers>,
        namespace: &str,
        name: &ConsumerName,
    ) -> Result<(), BrokerError> {
        let key = (namespace.to_owned(), name.clone());
        let _changing = self.lock_changes(&key).await;
        let existed = served.delete(namespace, name).await.map_err(|e| {
            tracing::error!(consumer = %name, namespace, error = %e, "deleting a consumer failed");
            BrokerError::Storage(format!(
                "consumer {name} could not be deleted (see the server's log)"
            ))
        })?;
        let members: Vec<mpsc::Sender<Input>> = self
            .served_members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key)
            .map(|members| members.into_values().collect())
            .unwrap_or_default();
        for member in members {
            let _ = member.send(Input::Delete).await;
        }
        let counted = self.registry.remove(namespace, name);
        if !existed && !counted {
            return Err(BrokerError::NotFound(format!(
                "namespace {namespace} has no consumer {name:?}"
            )));
        }
        Ok(())
    }
}

/// Refuses a caller that does not own durable consumer `name` (unless it is an admin).
fn check_owner(
    name: &ConsumerName,
    owner: Option<&Owner>,
    request: &SubscribeRequest,
) -> Result<(), BrokerError> {
    match (owner, &request.owner) {
        (Some(owner), Some(caller)) if owner != caller && !request.admin => {
            Err(super::durable::not_the_owner(name))
        }
        _ => Ok(()),
    }
}

/// The storage failed: logged, told without its details.
fn storage_failed(error: StorageError) -> BrokerError {
    tracing::error!(error = %error, "opening a consumer failed");
    match error.kind {
        ErrorKind::Unavailable => BrokerError::Storage(
            "the storage is unavailable; retry when it is back (see the server's log)".into(),
        ),
        _ => BrokerError::Storage("the consumer could not be opened (see the server's log)".into()),
    }
}

/// An event a member holds: delivered to its connection, not acknowledged yet.
struct Held {
    event: StoredEvent,
    token: String,
    deliveries: u32,
    /// When the storage delivers it again: its slot in the window is free from then on.
    due: Instant,
    /// A reply to it was claimed.
    replied: bool,
}

/// One connection's member of a served consumer.
struct MemberLoop {
    member: Box<dyn ServedMember>,
    log: Arc<dyn EventLog>,
    inputs: mpsc::Receiver<Input>,
    deliveries: mpsc::Sender<Delivery>,
    window: usize,
    max_bytes: usize,
    redelivery: Duration,
    max_deliveries: Option<u32>,
    /// The durable consumer's name (`None`: ephemeral).
    consumer: Option<ConsumerName>,
    stop_at: Option<u64>,
    /// What the connection holds, by event id.
    held: HashMap<String, Held>,
    held_bytes: usize,
    confirmations: Arc<Confirmations>,
    /// Where the confirmations go for publishers on other nodes, on a shared backend.
    relay: Option<Arc<dyn Relay>>,
    counts: Arc<consumer::DeliveryCounts>,
    shutdown: watch::Receiver<bool>,
    outage: watch::Receiver<Option<String>>,
}

/// Why a member's loop ends.
enum End {
    /// The connection left, or the server shuts down: what it holds goes back.
    Left,
    /// The stream ends with this error.
    Error(String),
    /// It reached its stop position.
    Done,
}

impl MemberLoop {
    async fn run(mut self) {
        let end = self.serve().await;
        if matches!(end, End::Left) {
            // Acks the connection sent before it left count (they were answered 202):
            // what is given back below must not include them.
            while let Ok(input) = self.inputs.try_recv() {
                let _ = self.take(input).await;
            }
        }
        match &end {
            End::Left => {}
            End::Error(message) => {
                let _ = self.deliveries.try_send(Delivery::Error(message.clone()));
            }
            End::Done => {
                let _ = self.deliveries.send(Delivery::End).await;
            }
        }
        // What it held goes to the other members now rather than after the redelivery
        // time. After an error (the consumer deleted, the storage out of reach) there is
        // no one to give it to, or no way to: the redelivery time brings it back.
        let held = match end {
            End::Error(_) => Vec::new(),
            _ => {
                // In log order: they come back in the order they are given back.
                let mut held: Vec<Held> = std::mem::take(&mut self.held).into_values().collect();
                held.sort_unstable_by_key(|held| held.event.position());
                held.into_iter().map(|held| held.token).collect()
            }
        };
        self.member.close(held).await;
    }

    async fn serve(&mut self) -> End {
        let mut done_check = tokio::time::interval(DONE_CHECK);
        loop {
            if *self.shutdown.borrow() {
                return End::Left;
            }
            if self.stop_at.is_some() && self.held.is_empty() && self.done().await {
                return End::Done;
            }
            let room = self.window.saturating_sub(self.held.len());
            if room > 0 {
                let bytes = self.max_bytes.saturating_sub(self.held_bytes);
                if let Err(e) = self.member.want(room, bytes, self.held.len()).await {
                    return End::Error(failed(&e));
                }
            }
            let next_due = self.next_due();
            tokio::select! {
                _ = self.shutdown.changed() => return End::Left,
                why = next_outage(&mut self.outage) => {
                    return End::Error(format!("{why}; reconnect to resume"));
                }
                _ = self.deliveries.closed() => return End::Left,
                input = self.inputs.recv() => {
                    let Some(input) = input else { return End::Left };
                    if let Some(end) = self.take(input).await {
                        return end;
                    }
                }
                served = self.member.next() => match served {
                    Ok(served) => self.deliver(served).await,
                    Err(e) if e.kind == ErrorKind::NotFound => {
                        return End::Error("the consumer was deleted".into());
                    }
                    Err(e) => return End::Error(failed(&e)),
                },
                _ = done_check.tick(), if self.stop_at.is_some() => {}
                _ = sleep_until(next_due) => {
                    if let Err(e) = self.expire().await {
                        return End::Error(failed(&e));
                    }
                }
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.held.values().map(|held| held.due).min()
    }

    /// Events not acknowledged within the redelivery time leave this member's window and
    /// are given back at once (rather than left to JetStream's own timer, which may fire
    /// after this member's next pull): an unacknowledged event comes back before later
    /// ones, to whichever member pulls first. A late ack for one is ignored, as one for
    /// any redelivered event is once the new delivery is acknowledged.
    async fn expire(&mut self) -> Result<(), StorageError> {
        let now = Instant::now();
        let mut due: Vec<(u64, String)> = self
            .held
            .iter()
            .filter(|(_, held)| held.due <= now)
            .map(|(id, held)| (held.event.position(), id.clone()))
            .collect();
        due.sort_unstable();
        for (_, id) in due {
            if let Some(held) = self.release(&id) {
                self.member
                    .settle(&held.token, Settle::Nak(Duration::ZERO))
                    .await?;
            }
        }
        Ok(())
    }

    /// Whether a member that stops at a position is done: everything before it was
    /// delivered and settled.
    async fn done(&self) -> bool {
        let Some(stop_at) = self.stop_at else {
            return false;
        };
        match self.member.state().await {
            Ok(state) => {
                state.unsettled == 0 && (state.undelivered == 0 || state.delivered_to >= stop_at)
            }
            Err(_) => false,
        }
    }

    /// Hands what came to the connection (in deliveries of up to `DELIVERY_BYTES`, a
    /// larger event alone), after giving up what is past its last delivery.
    async fn deliver(&mut self, served: Vec<Served>) {
        let now = Instant::now();
        let mut chunk: Vec<StoredEvent> = Vec::new();
        let mut chunk_bytes = 0;
        for Served {
            event,
            deliveries,
            token,
        } in served
        {
            if self.stop_at.is_some_and(|stop| event.position() >= stop) {
                // Past where this member stops: not its to deliver.
                let _ = self.member.settle(&token, Settle::Ack).await;
                continue;
            }
            if self.max_deliveries.is_some_and(|max| deliveries > max) {
                self.give_up(&event, deliveries - 1, &token).await;
                continue;
            }
            if deliveries > 1 {
                self.counts.redeliveries.fetch_add(1, Ordering::Relaxed);
            }
            let size = event.sse_frame().len();
            self.held_bytes += size;
            self.held.insert(
                event.id().to_owned(),
                Held {
                    event: event.clone(),
                    token,
                    deliveries,
                    due: consumer::later(now, self.redelivery),
                    replied: false,
                },
            );
            if !chunk.is_empty() && chunk_bytes + size > consumer::DELIVERY_BYTES {
                self.send(std::mem::take(&mut chunk)).await;
                chunk_bytes = 0;
            }
            chunk.push(event);
            chunk_bytes += size;
        }
        if !chunk.is_empty() {
            self.send(chunk).await;
        }
    }

    /// The connection's queue has room for its window: this waits only while it reads.
    async fn send(&self, events: Vec<StoredEvent>) {
        let _ = self.deliveries.send(Delivery::Events(events)).await;
    }

    /// An event delivered `deliveries` times without an ack: its dead letter, then it is
    /// never delivered again.
    async fn give_up(&mut self, event: &StoredEvent, deliveries: u32, token: &str) {
        give_up_event(
            self.log.as_ref(),
            self.consumer.as_ref(),
            event,
            deliveries,
            &self.counts,
        )
        .await;
        let _ = self.member.settle(token, Settle::Term).await;
    }

    fn release(&mut self, event_id: &str) -> Option<Held> {
        let held = self.held.remove(event_id)?;
        self.held_bytes = self.held_bytes.saturating_sub(held.event.sse_frame().len());
        Some(held)
    }

    /// Takes an input; what ends the loop, if it does.
    async fn take(&mut self, input: Input) -> Option<End> {
        match input {
            Input::Join { .. } => {}
            Input::Leave { .. } => return Some(End::Left),
            Input::Delete => return Some(End::Error("the consumer was deleted".into())),
            Input::Ack {
                event_ids,
                consumer_id,
                zone,
            } => {
                // A durable consumer confirms as one, whichever member acked.
                let confirmer = match &self.consumer {
                    Some(name) => name.to_string(),
                    None => consumer_id,
                };
                for id in event_ids {
                    // Late, repeated or unknown acks are ignored: acks are idempotent.
                    let Some(held) = self.release(&id) else {
                        continue;
                    };
                    if let Err(e) = self.member.settle(&held.token, Settle::Ack).await {
                        return Some(End::Error(failed(&e)));
                    }
                    self.confirmations.record(&id, &confirmer, zone.as_deref());
                    if let Some(relay) = &self.relay {
                        send_confirmation(relay.as_ref(), &id, &confirmer, zone.as_deref()).await;
                    }
                }
            }
            Input::Nak { event_id, delay } => {
                let held = self.release(&event_id)?;
                if self
                    .max_deliveries
                    .is_some_and(|max| held.deliveries >= max)
                {
                    // Its last delivery failed: given up at once, as on a timeout.
                    self.give_up(&held.event, held.deliveries, &held.token)
                        .await;
                } else if let Err(e) = self.member.settle(&held.token, Settle::Nak(delay)).await {
                    return Some(End::Error(failed(&e)));
                }
            }
            Input::ClaimReply {
                event_id, answer, ..
            } => {
                let claimed = match self.held.get_mut(&event_id) {
                    None => Err(ReplyRefused::NotDelivered),
                    Some(held) if held.replied => Err(ReplyRefused::Replied),
                    Some(held) => {
                        held.replied = true;
                        Ok(held.event.clone())
                    }
                };
                let _ = answer.send(claimed);
            }
            Input::ReleaseReply { event_id } => {
                if let Some(held) = self.held.get_mut(&event_id) {
                    held.replied = false;
                }
            }
        }
        None
    }
}

/// A stream's error for a storage failure.
fn failed(error: &StorageError) -> String {
    tracing::warn!(error = %error, "a consumer's member stopped");
    match error.kind {
        ErrorKind::Unavailable => "the storage is unavailable; reconnect to resume".to_owned(),
        _ => format!("the consumer failed: {error}"),
    }
}

/// The durable consumers of a node whose storage serves them: the members on this node,
/// by consumer.
pub(super) type ServedMembers =
    std::sync::Mutex<HashMap<DurableKey, HashMap<u64, mpsc::Sender<Input>>>>;
