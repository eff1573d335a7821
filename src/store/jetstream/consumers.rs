//! Consumers on the JetStream store: every manual-ack consumer is a JetStream consumer, so
//! that what it was delivered and has acknowledged lives in JetStream, with the events,
//! and any node can serve its members.
//!
//! The mapping:
//! - A durable consumer `<name>` of namespace `<ns>` is the durable JetStream consumer
//!   `<name>` on stream `BUS_<ns>`; an ephemeral one (a manual-ack subscription without a
//!   name) is an ephemeral JetStream consumer, removed when its member leaves (or by
//!   JetStream after [`EPHEMERAL_INACTIVE`] if its node died).
//! - Its pattern is the consumer's filter subject (our syntax is NATS's); the pattern and
//!   the owner are also in its metadata (`bus_pattern`, `bus_owner`), which is where the
//!   broker reads them back.
//! - Acks are explicit; the redelivery time is the ack wait; a negative ack's delay is a
//!   `-NAK` with that delay; an event given up after its last delivery is terminated
//!   (`+TERM`). JetStream's `max_deliver` is left unlimited: the broker gives an event up
//!   itself when a delivery comes past the count (see its dead letters), so that an event
//!   is never dropped by JetStream before its dead letter is written.
//! - Members pull: each asks for as many events as its own window has room for, in
//!   events and in bytes, so windows are per connection as on the file store. JetStream's
//!   `max_ack_pending` is the consumer's ceiling across its members.
//!
//! A member holds one inbox subscription; its pull requests expire after
//! [`PULL_EXPIRES`] and carry idle heartbeats, so that a request JetStream lost (a
//! reconnect, a new consumer leader) is noticed and made again. A member that leaves
//! listens until its requests have ended (JetStream cannot be told to drop them, and
//! would send into the void), then gives back what it holds: within `PULL_EXPIRES`.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;

use super::connection::{header_u64, stream_name, unavailable, REQUEST_TIMEOUT};
use super::sealing::Sealing;
use crate::store::api::{
    BoxFuture, ErrorKind, Served, ServedConsumer, ServedConsumers, ServedMember, ServedSpec,
    ServedState, Settle, StorageError,
};
use crate::store::consumers::{ConsumerName, Owner};

/// The metadata entry with a consumer's pattern…
const PATTERN_KEY: &str = "bus_pattern";
/// …and the one with its owner.
const OWNER_KEY: &str = "bus_owner";
/// How long a pull request waits for events before JetStream ends it (it is made again).
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How often JetStream tells a member with a waiting pull request that it is alive.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// The most events [`ServedMember::next`] hands over at once.
const NEXT_EVENTS: usize = 256;
/// The smallest byte budget a bounded pull request is made with.
const MIN_PULL_BYTES: usize = 64 << 10;
/// How long JetStream keeps an ephemeral consumer whose member stopped pulling without
/// removing it (its node died).
const EPHEMERAL_INACTIVE: Duration = Duration::from_secs(60);

/// The consumers of the namespaces' streams.
pub struct JetStreamConsumers {
    client: async_nats::Client,
    context: jetstream::Context,
    /// How each namespace's messages are opened.
    sealings: HashMap<String, Sealing>,
}

impl JetStreamConsumers {
    /// The consumers of the namespaces whose logs are given as (namespace, sealing).
    pub fn new(
        client: async_nats::Client,
        context: jetstream::Context,
        sealings: HashMap<String, Sealing>,
    ) -> JetStreamConsumers {
        JetStreamConsumers {
            client,
            context,
            sealings,
        }
    }

    fn sealing(&self, namespace: &str) -> Result<&Sealing, StorageError> {
        self.sealings.get(namespace).ok_or_else(|| {
            StorageError::new(
                ErrorKind::NotFound,
                format!("namespace {namespace} is not open on this node"),
            )
        })
    }

    async fn stream(&self, namespace: &str) -> Result<jetstream::stream::Stream<()>, StorageError> {
        self.context
            .get_stream_no_info(stream_name(namespace))
            .await
            .map_err(|e| unavailable(&format!("reaching the stream of {namespace}"), e))
    }

    async fn info(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<consumer::Info>, StorageError> {
        consumer_info(&self.context, &stream_name(namespace), name).await
    }

    async fn create(&self, spec: &ServedSpec<'_>) -> Result<consumer::Info, StorageError> {
        let mut metadata = HashMap::from([(PATTERN_KEY.to_owned(), spec.pattern.to_owned())]);
        if let Some(owner) = spec.owner {
            metadata.insert(OWNER_KEY.to_owned(), owner.0.clone());
        }
        let config = consumer::Config {
            durable_name: spec.name.map(|name| name.as_str().to_owned()),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: spec.start + 1,
            },
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: spec.ack_wait,
            max_deliver: -1,
            filter_subject: spec.pattern.to_owned(),
            max_ack_pending: i64::try_from(spec.max_ack_pending).unwrap_or(i64::MAX),
            inactive_threshold: if spec.name.is_some() {
                Duration::ZERO
            } else {
                EPHEMERAL_INACTIVE
            },
            metadata,
            ..Default::default()
        };
        let created = self
            .context
            .create_consumer_strict_on_stream(config, stream_name(spec.namespace))
            .await;
        match created {
            Ok(mut consumer) => consumer
                .info()
                .await
                .cloned()
                .map_err(|e| unavailable("reading a new consumer", e)),
            // Created meanwhile (by another node): that one is joined.
            Err(e)
                if e.kind() == jetstream::stream::ConsumerCreateStrictErrorKind::AlreadyExists =>
            {
                let name = spec.name.map(ConsumerName::as_str).unwrap_or_default();
                self.info(spec.namespace, name).await?.ok_or_else(|| {
                    unavailable(&format!("creating consumer {name}"), "it came and went")
                })
            }
            Err(e) => Err(unavailable(
                &format!("creating a consumer of {}", spec.namespace),
                e,
            )),
        }
    }
}

/// Consumer `name` of `stream`, if it exists.
async fn consumer_info(
    context: &jetstream::Context,
    stream: &str,
    name: &str,
) -> Result<Option<consumer::Info>, StorageError> {
    let stream = context
        .get_stream_no_info(stream)
        .await
        .map_err(|e| unavailable(&format!("reaching stream {stream}"), e))?;
    match stream.consumer_info(name).await {
        Ok(info) => Ok(Some(info)),
        Err(e) if not_found(&e.to_string()) => Ok(None),
        Err(e) => Err(unavailable(&format!("reading consumer {name}"), e)),
    }
}

/// Whether a JetStream error says that the consumer does not exist.
fn not_found(error: &str) -> bool {
    error.contains("consumer not found") || error.contains("10014")
}

/// What a member is told when its consumer is gone.
fn deleted() -> StorageError {
    StorageError::new(ErrorKind::NotFound, "the consumer was deleted")
}

/// A durable consumer as listed, from its JetStream info (`None` if bus did not create
/// it).
fn served_consumer(info: &consumer::Info) -> Option<ServedConsumer> {
    let name = ConsumerName::parse(info.config.durable_name.as_deref()?).ok()?;
    let pattern = info.config.metadata.get(PATTERN_KEY)?.clone();
    let owner = info.config.metadata.get(OWNER_KEY).cloned().map(Owner);
    // The ack floor is the last sequence up to which all is acknowledged: the position
    // after it is the first not done.
    let floor = info.ack_floor.stream_sequence;
    Some(ServedConsumer {
        name,
        pattern,
        owner,
        floor,
        pending: info.num_ack_pending as u64,
        undelivered: info.num_pending,
    })
}

impl ServedConsumers for JetStreamConsumers {
    fn find<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a ConsumerName,
    ) -> BoxFuture<'a, Result<Option<ServedConsumer>, StorageError>> {
        Box::pin(async move {
            Ok(self
                .info(namespace, name.as_str())
                .await?
                .as_ref()
                .and_then(served_consumer))
        })
    }

    fn join<'a>(
        &'a self,
        spec: ServedSpec<'a>,
    ) -> BoxFuture<'a, Result<Box<dyn ServedMember>, StorageError>> {
        Box::pin(async move {
            let sealing = self.sealing(spec.namespace)?.clone();
            let existing = match spec.name {
                Some(name) => self.info(spec.namespace, name.as_str()).await?,
                None => None,
            };
            let info = match existing {
                Some(info) => info,
                None => self.create(&spec).await?,
            };
            let inbox = self.client.new_inbox();
            let answers = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| unavailable("subscribing to a consumer's deliveries", e))?;
            Ok(Box::new(JetStreamMember {
                client: self.client.clone(),
                context: self.context.clone(),
                stream: info.stream_name.clone(),
                consumer: info.name.clone(),
                ephemeral: spec.name.is_none(),
                sealing,
                inbox,
                answers,
                outstanding: 0,
                outstanding_bytes: 0,
                oversized: false,
                heard: Instant::now(),
            }) as Box<dyn ServedMember>)
        })
    }

    fn set_owner<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a ConsumerName,
        owner: &'a Owner,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let Some(info) = self.info(namespace, name.as_str()).await? else {
                return Err(StorageError::new(
                    ErrorKind::NotFound,
                    format!("consumer {name} of {namespace} does not exist"),
                ));
            };
            let mut config = info.config;
            config
                .metadata
                .insert(OWNER_KEY.to_owned(), owner.0.clone());
            self.context
                .update_consumer_on_stream(config, stream_name(namespace))
                .await
                .map(drop)
                .map_err(|e| unavailable(&format!("giving consumer {name} an owner"), e))
        })
    }

    fn delete<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a ConsumerName,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(async move {
            match self
                .context
                .delete_consumer_from_stream(name.as_str(), stream_name(namespace))
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if not_found(&e.to_string()) => Ok(false),
                Err(e) => Err(unavailable(&format!("deleting consumer {name}"), e)),
            }
        })
    }

    fn list<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ServedConsumer>, StorageError>> {
        Box::pin(async move {
            let stream = self.stream(namespace).await?;
            let mut infos = stream.consumers();
            let mut listed = Vec::new();
            while let Some(info) = infos.next().await {
                let info = info.map_err(|e| {
                    unavailable(&format!("listing the consumers of {namespace}"), e)
                })?;
                listed.extend(served_consumer(&info));
            }
            listed.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(listed)
        })
    }
}

/// One member of a JetStream consumer.
struct JetStreamMember {
    client: async_nats::Client,
    context: jetstream::Context,
    stream: String,
    consumer: String,
    ephemeral: bool,
    sealing: Sealing,
    /// Where its pull requests are answered.
    inbox: String,
    answers: async_nats::Subscriber,
    /// Events asked for and not yet received, across its pull requests in flight…
    outstanding: usize,
    /// …and the bytes they may still bring (at most: the budget a request filled by
    /// count did not use is counted until no request is left).
    outstanding_bytes: usize,
    /// The next event is larger than what a bounded pull may bring: only a pull while the
    /// member holds nothing (unbounded, for one event) takes it.
    oversized: bool,
    /// When JetStream was last heard from (an event, a status, a heartbeat).
    heard: Instant,
}

impl JetStreamMember {
    async fn pull(&mut self, events: usize, bytes: Option<usize>) -> Result<(), StorageError> {
        let mut request = serde_json::json!({
            "batch": events,
            "expires": PULL_EXPIRES.as_nanos() as u64,
            "idle_heartbeat": HEARTBEAT.as_nanos() as u64,
        });
        if let Some(bytes) = bytes {
            request["max_bytes"] = bytes.into();
        }
        self.client
            .publish_with_reply(
                format!(
                    "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
                    self.stream, self.consumer
                ),
                self.inbox.clone(),
                Bytes::from(request.to_string()),
            )
            .await
            .map_err(|e| unavailable("asking a consumer for events", e))?;
        if self.outstanding == 0 {
            // The heartbeat clock starts with the first request in flight.
            self.heard = Instant::now();
        }
        self.outstanding += events;
        self.outstanding_bytes = self.outstanding_bytes.saturating_add(bytes.unwrap_or(0));
        Ok(())
    }

    async fn consumer_info(&self) -> Result<Option<consumer::Info>, StorageError> {
        consumer_info(&self.context, &self.stream, &self.consumer).await
    }

    /// What a message on the inbox is: an event delivered, or the state of the pulls.
    async fn take(&mut self, message: async_nats::Message) -> Result<Option<Served>, StorageError> {
        if let Some(status) = message.status {
            let description = message.description.clone().unwrap_or_default();
            return match status.as_u16() {
                // Idle heartbeat.
                100 => Ok(None),
                409 if description.to_lowercase().contains("consumer deleted") => Err(deleted()),
                409 => {
                    if description.contains("Exceeds MaxBytes") {
                        self.oversized = true;
                    }
                    self.ended(&message);
                    Ok(None)
                }
                // 404, 408 (the request expired) and anything else end a request.
                _ => {
                    self.ended(&message);
                    Ok(None)
                }
            };
        }
        self.outstanding = self.outstanding.saturating_sub(1);
        self.outstanding_bytes = if self.outstanding == 0 {
            // Every request is done: none can bring more (a request filled by count
            // ends without a word, its unused bytes with it).
            0
        } else {
            self.outstanding_bytes.saturating_sub(message.length)
        };
        let message = jetstream::Message {
            message,
            context: self.context.clone(),
        };
        let (token, deliveries) = match message.info() {
            Ok(info) => (
                message
                    .reply
                    .as_ref()
                    .map(|r| r.to_string())
                    .unwrap_or_default(),
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
            ),
            Err(e) => {
                tracing::warn!(consumer = self.consumer, error = %e, "a delivery without a JetStream ack subject is skipped");
                return Ok(None);
            }
        };
        match self.sealing.event(message.message.payload.clone()) {
            Ok(event) => Ok(Some(Served {
                event,
                deliveries,
                token,
            })),
            Err(e) => {
                // Not an event of bus: terminated, never delivered again.
                tracing::warn!(consumer = self.consumer, error = %e, "a message that is not an event is skipped");
                let _ = self.client.publish(token, settle_body(Settle::Term)).await;
                Ok(None)
            }
        }
    }

    /// A pull request ended (expired, or ended by JetStream) with this much unfilled.
    fn ended(&mut self, message: &async_nats::Message) {
        let events = header_u64(message, "Nats-Pending-Messages").unwrap_or(0);
        let bytes = header_u64(message, "Nats-Pending-Bytes").unwrap_or(0);
        self.outstanding = self
            .outstanding
            .saturating_sub(usize::try_from(events).unwrap_or(usize::MAX));
        self.outstanding_bytes = self
            .outstanding_bytes
            .saturating_sub(usize::try_from(bytes).unwrap_or(usize::MAX));
        if self.outstanding == 0 {
            self.outstanding_bytes = 0;
        }
    }
}

/// What a member publishes to a delivery's ack subject to settle it.
fn settle_body(how: Settle) -> Bytes {
    match how {
        Settle::Ack => Bytes::from_static(b"+ACK"),
        Settle::Term => Bytes::from_static(b"+TERM"),
        Settle::Nak(Duration::ZERO) => Bytes::from_static(b"-NAK"),
        Settle::Nak(delay) => Bytes::from(format!(
            "-NAK {{\"delay\":{}}}",
            u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX)
        )),
    }
}

impl ServedMember for JetStreamMember {
    fn want(
        &mut self,
        events: usize,
        bytes: usize,
        holding: usize,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            if holding == 0 && self.outstanding == 0 {
                // Nothing held, nothing asked: the first event comes whatever its size.
                self.oversized = false;
                self.pull(1, None).await?;
            }
            if self.oversized || events <= self.outstanding {
                return Ok(());
            }
            // A request that could bring only a sliver of bytes would end at the next
            // event: the requests in flight bring the events meanwhile, and their budget
            // comes back when they end.
            let budget = bytes.saturating_sub(self.outstanding_bytes);
            if budget < MIN_PULL_BYTES.min(bytes) {
                return Ok(());
            }
            self.pull(events - self.outstanding, Some(budget)).await
        })
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Vec<Served>, StorageError>> {
        Box::pin(async move {
            let message = if self.outstanding > 0 {
                // Two heartbeats missed: the requests are lost (they are made again), or
                // the consumer is gone (JetStream does not answer pulls of a deleted one).
                let deadline = self.heard + 2 * HEARTBEAT + Duration::from_secs(1);
                match tokio::time::timeout_at(deadline, self.answers.next()).await {
                    Ok(message) => message,
                    Err(_) => {
                        self.outstanding = 0;
                        self.outstanding_bytes = 0;
                        if self.consumer_info().await?.is_none() {
                            return Err(deleted());
                        }
                        return Ok(Vec::new());
                    }
                }
            } else {
                self.answers.next().await
            };
            let Some(message) = message else {
                return Err(unavailable(
                    "receiving a consumer's events",
                    "the connection closed",
                ));
            };
            self.heard = Instant::now();
            let mut served = Vec::new();
            served.extend(self.take(message).await?);
            // What arrived with it goes along, without waiting for more.
            while served.len() < NEXT_EVENTS {
                let Some(Some(message)) = self.answers.next().now_or_never() else {
                    break;
                };
                served.extend(self.take(message).await?);
            }
            Ok(served)
        })
    }

    fn settle<'a>(
        &'a self,
        token: &'a str,
        how: Settle,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let body = settle_body(how);
            match how {
                // An ack is sent and not waited for: one JetStream did not take is
                // followed by a redelivery, never by a loss.
                Settle::Ack => self
                    .client
                    .publish(token.to_owned(), body)
                    .await
                    .map_err(|e| unavailable("acknowledging a delivery", e)),
                // Waited for, so that the member's next pull comes after it: an event given
                // back without delay is the next one delivered.
                Settle::Nak(_) | Settle::Term => {
                    let answer = self.client.request(token.to_owned(), body);
                    match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(unavailable("settling a delivery", e)),
                        Err(_) => Err(unavailable("settling a delivery", "no answer in time")),
                    }
                }
            }
        })
    }

    fn state(&self) -> BoxFuture<'_, Result<ServedState, StorageError>> {
        Box::pin(async move {
            let info = self.consumer_info().await?.ok_or_else(deleted)?;
            Ok(ServedState {
                unsettled: info.num_ack_pending as u64,
                undelivered: info.num_pending,
                delivered_to: info.delivered.stream_sequence,
            })
        })
    }

    fn close(self: Box<Self>, held: Vec<String>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut member = *self;
            if member.ephemeral {
                let _ = member.answers.unsubscribe().await;
                if let Err(e) = member
                    .context
                    .delete_consumer_from_stream(&member.consumer, &member.stream)
                    .await
                {
                    tracing::debug!(consumer = member.consumer, error = %e, "removing an ephemeral consumer failed; JetStream removes it when it has been inactive");
                }
                return;
            }
            // JetStream cannot be told to forget a pull request, and what it sends to an
            // inbox nobody listens to any more waits for the ack wait. So the member keeps
            // listening until its requests have ended (each within PULL_EXPIRES), takes
            // what still comes, and gives everything back only then: given back earlier,
            // it could come straight back to one of these requests.
            let mut give_back = held;
            let deadline = tokio::time::Instant::now() + PULL_EXPIRES + Duration::from_secs(1);
            while member.outstanding > 0 {
                let Ok(Some(message)) =
                    tokio::time::timeout_at(deadline, member.answers.next()).await
                else {
                    break;
                };
                if message.status.is_some() {
                    if matches!(message.status.map(|s| s.as_u16()), Some(404 | 408 | 409)) {
                        member.ended(&message);
                    }
                    continue;
                }
                member.outstanding = member.outstanding.saturating_sub(1);
                give_back.extend(message.reply.map(|reply| reply.to_string()));
            }
            let _ = member.answers.unsubscribe().await;
            let nak = settle_body(Settle::Nak(Duration::ZERO));
            for token in give_back {
                let _ = member.client.publish(token, nak.clone()).await;
            }
        })
    }
}
