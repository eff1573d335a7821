//! The broker: the semantics of the bus on top of the logs, independent of HTTP.
//!
//! - **Publish**: validates a batch (subjects, namespaces, batch rules), checks and
//!   reserves deduplication keys, appends to the namespace's log (or hands an inbox event
//!   to its subscribers) and reports what was assigned.
//! - **Subscribe**: a subscription is a cursor over a log, not a queue. It reads from the
//!   log's in-memory tail or, if it has fallen behind, from disk, filters by pattern and
//!   yields ready-made frames; catching up and following live are the same loop, so there
//!   is no gap and no duplicate between them. A reader that stops reading stops the loop
//!   (nothing is buffered for it) and resumes where it left off.
//! - **Manual ack**: a window of unacknowledged events per connection (one by default,
//!   the reference's stop-and-wait; bounded in bytes too), each redelivered after
//!   `redelivery` until acknowledged or delivered `redelivery_count` times; durable named
//!   consumers shared by queue groups, limited in number per namespace and per owner, and
//!   running only while they have members ([`consumer`]; counts in `registry`).
//! - **Inbox subjects** (`_bus_.…`) live in memory only ([`inbox`]).
//!
//! Everything ends when the broker is shut down.

pub mod acks;
pub mod confirm;
pub mod consumer;
pub mod dedup;
pub mod inbox;
mod registry;
mod settling;
mod subscription;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use self::acks::{Acks, Registration};
use self::confirm::{ConfirmWait, Confirmations};
use self::consumer::{ConsumerStats, Dispatcher, Input, ReplyRefused, Retired};
use self::dedup::Dedup;
use self::inbox::InboxSubscription;
use self::inbox::Inboxes;
use self::registry::{Refusal, Registry};
use self::settling::Settling;
use crate::event::{self, EventDraft, JsonLayout, PendingEvent, StoredEvent};
use crate::store::{
    ids, ConsumerProgress as Progress, ConsumerStore, ErrorKind, EventLog, KeyedEvent, Storage,
    StorageError,
};
pub use crate::store::{ConsumerName, Owner};
use crate::subject::{Pattern, Subject};
use crate::timestamp::Timestamp;

/// Defaults of the reference server, used when a client leaves a parameter empty.
pub const DEFAULT_REDELIVERY: Duration = Duration::from_secs(5);
pub const DEFAULT_REDELIVERY_COUNT: i64 = 3;
/// The longest redelivery time a subscriber may ask for.
pub const MAX_REDELIVERY: Duration = Duration::from_secs(24 * 3600);
/// The longest a negative ack may delay an event's redelivery.
pub const MAX_NAK_DELAY: Duration = Duration::from_secs(24 * 3600);

/// Events a subscription reads from its log at a time.
const READ_BATCH: usize = 256;
/// How far back the deduplication window is rebuilt at start-up, in events per namespace.
const DEDUP_REBUILD_EVENTS: u64 = 1_000_000;

/// An event as a publisher sends it, parsed but not yet validated.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub id: Option<String>,
    pub trace_id: String,
    pub key: String,
    pub subject: String,
    pub response_subject: String,
    pub created_at: Option<Timestamp>,
    /// Compact JSON.
    pub payload: Option<Vec<u8>>,
}

impl NewEvent {
    /// The event's fields as the log's encoder takes them.
    pub fn draft(&self) -> EventDraft<'_> {
        EventDraft {
            subject: &self.subject,
            trace_id: &self.trace_id,
            key: &self.key,
            response_subject: &self.response_subject,
            payload: self.payload.as_deref(),
            id: self.id.as_deref(),
            created_at: self.created_at,
        }
    }
}

/// What a publisher sends: one event, or a batch (a JSON array, even of one event) that
/// is committed atomically.
#[derive(Debug, Clone)]
pub enum Publication {
    One(NewEvent),
    Batch(Vec<NewEvent>),
}

/// What a published event was assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub created_at: Timestamp,
    /// The position in the namespace's log; -1 for inbox events, which are not stored.
    pub index: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The request is malformed; the message says how.
    #[error("{0}")]
    Invalid(String),
    /// A key or id was already used.
    #[error("{0}")]
    Duplicate(String),
    /// The log could not store the events.
    #[error("{0}")]
    Storage(StorageError),
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    Oldest,
    Newest,
    /// Strictly after the event with this id.
    After(String),
    /// At this position of the log (the oldest kept one if it is older).
    Position(u64),
    /// At the first event created at or after this time.
    Time(Timestamp),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    None,
    /// Up to `window` unacknowledged events at a time (1: stop-and-wait), each
    /// redelivered after `redelivery`; given up after `max_deliveries` deliveries
    /// (`None`: never).
    Manual {
        redelivery: Duration,
        max_deliveries: Option<u32>,
        window: usize,
    },
}

/// The largest `max_inflight` a connection may ask for.
pub const MAX_WINDOW: usize = 10_000;

#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    pub pattern: Pattern,
    pub start: Start,
    pub ack: AckMode,
    /// End the subscription, with [`Delivery::End`], once it has passed the events that
    /// were committed when it was opened (for exports and catch-up reads). Inbox
    /// subscriptions ignore it.
    pub until_now: bool,
    /// Who opens the subscription, if requests are authenticated: only they may ack its
    /// deliveries, and a durable consumer it creates belongs to them.
    pub owner: Option<Owner>,
    /// The caller may attach to durable consumers that belong to others (the admin
    /// grant).
    pub admin: bool,
    /// The durable consumer to create or attach to (manual ack only).
    pub consumer: Option<ConsumerName>,
    /// The zone this connection is in, for `confirm_zones` (manual ack only).
    pub zone: Option<String>,
}

/// Why the broker refused or could not do what it was asked (apart from publishing, see
/// [`PublishError`]). Each variant is a kind of answer; its message says what to fix and
/// never shows a server path (details of storage failures go to the server's log).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The request is malformed or names what does not exist (a namespace).
    #[error("{0}")]
    Invalid(String),
    /// The caller may not do this (a durable consumer that belongs to someone else).
    #[error("{0}")]
    Forbidden(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It contradicts what exists (a durable consumer's pattern, an event already
    /// acknowledged or replied to).
    #[error("{0}")]
    Conflict(String),
    /// Storage failed; the server's log has the details.
    #[error("{0}")]
    Storage(String),
}

/// A durable consumer as the admin listing shows it: the client's type, so that the two
/// sides of `GET /consumers/{namespace}` cannot drift apart.
pub use crate::client::ConsumerInfo;

/// A durable consumer: (namespace, name).
type DurableKey = (String, ConsumerName);

/// A durable consumer whose dispatcher runs.
struct DurableEntry {
    /// Tells this start of the consumer from a later one.
    generation: u64,
    inputs: mpsc::Sender<Input>,
    pattern: String,
    owner: Option<Owner>,
    stats: Arc<ConsumerStats>,
}

/// What a subscription hands to its reader.
#[derive(Debug)]
pub enum Delivery {
    /// Matching events, in log order.
    Events(Vec<StoredEvent>),
    /// The subscription cannot continue; the stream ends after this.
    Error(String),
    /// The subscription reached the end it was asked to stop at; the stream ends after
    /// this.
    End,
    /// Something the subscriber should know that is not an event (events it asked for
    /// were removed by retention); sent as an SSE comment.
    Notice(String),
}

pub type Deliveries = Pin<Box<dyn Stream<Item = Delivery> + Send>>;

pub struct Subscription {
    pub consumer_id: String,
    pub deliveries: Deliveries,
}

/// Settings of the broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Keys remembered per subject for deduplication (0 disables it).
    pub dup_size: usize,
    /// How long a key is remembered (`None`: until pushed out).
    pub dup_ttl: Option<Duration>,
    /// Bytes the deduplication window may hold across all subjects.
    pub dup_memory: usize,
    /// Longest key a publish may carry (longer ones in the log are not restored).
    pub max_key_len: usize,
    /// Durable consumers a namespace may have.
    pub max_consumers: usize,
    /// Durable consumers one owner (token) may have, when requests are authenticated.
    pub max_consumers_per_owner: usize,
    /// Bytes of unacknowledged events one manual-ack connection may hold (at least one
    /// event is always delivered).
    pub max_inflight_bytes: usize,
}

impl Default for BrokerConfig {
    /// The server's defaults.
    fn default() -> BrokerConfig {
        BrokerConfig {
            dup_size: 1000,
            dup_ttl: None,
            dup_memory: dedup::DEFAULT_BUDGET,
            max_key_len: 1024,
            max_consumers: 1000,
            max_consumers_per_owner: 100,
            max_inflight_bytes: 16 << 20,
        }
    }
}

pub struct Broker {
    logs: BTreeMap<String, Arc<dyn EventLog>>,
    /// Durable consumers' stored progress.
    consumers: Arc<dyn ConsumerStore>,
    dedup: Dedup,
    inboxes: Inboxes,
    acks: Arc<Acks>,
    shutdown: watch::Sender<bool>,
    /// Events sent to subscribers since the server started, by namespace (inboxes under
    /// [`INBOX_NAMESPACE`]).
    delivered: BTreeMap<String, Arc<AtomicU64>>,
    /// Deliveries repeated because no ack came in time.
    redeliveries: Arc<AtomicU64>,
    /// Running durable consumers, by (namespace, name): those with members. An idle one
    /// (its last member left) stores its progress and leaves this map
    /// ([`consumer::Retire`]); joins are sent under its lock.
    durables: Arc<Mutex<HashMap<DurableKey, DurableEntry>>>,
    /// The last saves of durable consumers that retired, not yet waited for: the next
    /// start or delete of the consumer, and shutdown, wait for them.
    settling: Arc<Settling>,
    /// Every durable consumer, running or not, and the limits on their numbers.
    registry: Registry,
    /// Bytes of unacknowledged events one manual-ack connection may hold.
    max_inflight_bytes: usize,
    /// One lock per durable consumer being started or deleted: both read or remove its
    /// stored progress on the blocking pool, with no lock of `durables` held meanwhile,
    /// and must not interleave. An entry lives while someone holds or waits for it (or,
    /// if a request was dropped while it waited, until that consumer's next change).
    changing: Mutex<HashMap<DurableKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Stores durable consumers' progress.
    saver: Arc<consumer::Saver>,
    /// The dispatchers of manual-ack consumers, awaited at shutdown (they store progress
    /// and append dead letters).
    dispatchers: Mutex<Vec<JoinHandle<()>>>,
    next_member: AtomicU64,
    confirmations: Arc<Confirmations>,
}

/// How a refusal of a duplicate key starts: the words of the reference server, which its
/// clients match.
pub const DUPLICATE_KEY: &str = "key was processed before";

/// The namespace of inbox subjects in the broker's counters.
pub const INBOX_NAMESPACE: &str = "_bus_";

/// What the broker counted since the server started (see [`crate::metrics`]).
pub struct BrokerCounts {
    /// Events sent to subscribers, by namespace.
    pub delivered: Vec<(String, u64)>,
    pub redeliveries: u64,
    pub inbox_published: u64,
    pub inbox_dropped: u64,
}

impl Broker {
    /// A broker over a storage backend's logs and consumers. Rebuilds the deduplication
    /// window from each log's newest events and counts the stored durable consumers
    /// (blocking reads: call it from a blocking thread).
    pub fn new(storage: Storage, config: &BrokerConfig) -> Broker {
        let logs: BTreeMap<String, Arc<dyn EventLog>> = storage
            .logs
            .into_iter()
            .map(|log| (log.namespace().to_owned(), log))
            .collect();
        let consumers = storage.consumers;
        let dedup = Dedup::new(config.dup_size, config.dup_ttl, config.dup_memory);
        if dedup.enabled() {
            for log in logs.values() {
                rebuild_dedup(log.as_ref(), &dedup, config.max_key_len);
            }
        }
        // Stored consumers are counted once, here (blocking reads, at start-up).
        let registry = Registry::new(config.max_consumers, config.max_consumers_per_owner);
        for namespace in logs.keys() {
            match consumers.list(namespace) {
                Ok(stored) => {
                    for (name, progress) in stored {
                        registry.insert(namespace, name, progress.owner);
                    }
                }
                Err(e) => {
                    tracing::error!(namespace, error = %e, "listing the stored durable consumers failed")
                }
            }
        }
        let delivered = logs
            .keys()
            .map(String::as_str)
            .chain([INBOX_NAMESPACE])
            .map(|namespace| (namespace.to_owned(), Arc::default()))
            .collect();
        Broker {
            logs,
            saver: Arc::new(consumer::Saver::new(
                Arc::clone(&consumers),
                consumer::SAVER_THREADS,
            )),
            consumers,
            dedup,
            inboxes: Inboxes::default(),
            acks: Arc::new(Acks::default()),
            shutdown: watch::channel(false).0,
            delivered,
            redeliveries: Arc::default(),
            durables: Arc::default(),
            settling: Arc::default(),
            registry,
            max_inflight_bytes: config.max_inflight_bytes,
            changing: Mutex::default(),
            dispatchers: Mutex::default(),
            next_member: AtomicU64::new(0),
            confirmations: Arc::default(),
        }
    }

    /// The open logs, by namespace.
    pub fn logs(&self) -> impl Iterator<Item = &Arc<dyn EventLog>> {
        self.logs.values()
    }

    pub fn counts(&self) -> BrokerCounts {
        BrokerCounts {
            delivered: self
                .delivered
                .iter()
                .map(|(namespace, n)| (namespace.clone(), n.load(Ordering::Relaxed)))
                .collect(),
            redeliveries: self.redeliveries.load(Ordering::Relaxed),
            inbox_published: self.inboxes.published(),
            inbox_dropped: self.inboxes.dropped(),
        }
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.logs.keys().map(String::as_str)
    }

    fn log(&self, namespace: &str) -> Result<&Arc<dyn EventLog>, String> {
        self.logs.get(namespace).ok_or_else(|| {
            let known: Vec<&str> = self.namespaces().collect();
            format!(
                "unknown namespace {namespace:?}: this server serves {}",
                known.join(", ")
            )
        })
    }

    /// Publishes one event or an atomic batch (see the module docs).
    pub async fn publish(&self, publication: Publication) -> Result<Vec<Published>, PublishError> {
        let invalid = PublishError::Invalid;
        let (batch, is_batch) = match publication {
            Publication::One(event) => (vec![event], false),
            Publication::Batch(events) => (events, true),
        };
        let Some(first) = batch.first() else {
            return Err(invalid("empty batch: send at least one event".into()));
        };
        let first_subject = Subject::parse(&first.subject).map_err(|e| invalid(e.to_string()))?;
        let namespace = first_subject.namespace().to_owned();
        let inbox_subject = first_subject.is_inbox().then(|| first.subject.clone());
        // The events are consumed as they are encoded, so that a large batch is not held
        // in both forms; only the deduplication keys (if any) are kept for the check below.
        let keyed = batch.iter().any(|e| !e.key.is_empty());
        let mut keys: Vec<(String, String)> =
            Vec::with_capacity(if keyed { batch.len() } else { 0 });
        let mut pending = Vec::with_capacity(batch.len());
        for event in batch {
            let subject = Subject::parse(&event.subject).map_err(|e| invalid(e.to_string()))?;
            if subject.namespace() != namespace {
                return Err(invalid(format!(
                    "a batch must stay in one namespace: {:?} and {:?} differ",
                    namespace,
                    subject.namespace()
                )));
            }
            if !event.response_subject.is_empty() {
                if is_batch {
                    return Err(invalid(
                        "events in a batch cannot have a response_subject; publish them one by one"
                            .into(),
                    ));
                }
                Subject::parse(&event.response_subject)
                    .map_err(|e| invalid(format!("response_subject: {e}")))?;
            }
            pending.push(PendingEvent::new(&event.draft()).map_err(|e| invalid(e.to_string()))?);
            if keyed {
                keys.push((event.subject, event.key));
            }
        }

        if let Some(subject) = inbox_subject {
            if is_batch {
                return Err(invalid(
                    "inbox subjects (_bus_.…) take one event at a time, not batches".into(),
                ));
            }
            return Ok(vec![self.publish_to_inbox(&subject, &pending[0])]);
        }
        let log = self.log(&namespace).map_err(invalid)?;

        let reservation = self
            .dedup
            .reserve(
                keys.iter()
                    .map(|(subject, key)| (subject.as_str(), key.as_str())),
            )
            .map_err(|duplicate| {
                // The reference's clients match the first words.
                let which = if is_batch {
                    format!(" (event {} of the batch)", duplicate.event)
                } else {
                    String::new()
                };
                PublishError::Duplicate(format!(
                    "{DUPLICATE_KEY}: {:?} was already published to this subject{which}",
                    duplicate.key
                ))
            })?;
        drop(keys);
        let appended = if reservation.is_empty() {
            log.append(pending).await
        } else {
            // The keys must stay reserved exactly when the events are stored. Once they
            // are reserved the append runs to its end on its own task, so that a request
            // dropped while it waits (the client left, shutdown) neither keeps keys for
            // events that were never stored nor releases those of events that were.
            let log = Arc::clone(log);
            tokio::spawn(async move {
                let appended = log.append(pending).await;
                if appended.is_ok() {
                    reservation.commit();
                }
                appended
            })
            .await
            .unwrap_or_else(|e| {
                Err(StorageError::new(
                    ErrorKind::Internal,
                    format!("the append task failed: {e}"),
                ))
            })
        };
        match appended {
            Ok(appended) => Ok(appended
                .into_iter()
                .map(|a| Published {
                    id: a.id,
                    created_at: a.created_at,
                    index: a.position as i64,
                })
                .collect()),
            Err(e) if e.kind == ErrorKind::Conflict => Err(PublishError::Duplicate(e.message)),
            Err(other) => Err(PublishError::Storage(other)),
        }
    }

    fn publish_to_inbox(&self, subject: &str, pending: &PendingEvent) -> Published {
        let id = match pending.client_id() {
            Some(id) => id.to_owned(),
            None => random_id("e_"),
        };
        let created_at = pending.created_at.unwrap_or_else(Timestamp::now);
        let mut json = Vec::with_capacity(pending.encoded_len_hint());
        let layout: JsonLayout = pending.write_json(&mut json, &id, &created_at.format(), -1);
        let mut frame = BytesMut::with_capacity(event::sse_frame_len(&id, &json));
        event::push_sse_frame(&mut frame, &id, &json);
        let stored = StoredEvent::new(0, frame.freeze(), &layout);
        self.inboxes.publish(subject, &stored);
        Published {
            id,
            created_at,
            index: -1,
        }
    }

    /// Opens a subscription. Its stream starts right away; a start id that does not exist
    /// is reported as the stream's only delivery, an [`Delivery::Error`]. Attaching to a
    /// durable consumer that is not running reads its stored progress first (on the
    /// blocking pool), since whether the caller may attach, and with which pattern, is
    /// stored there.
    pub async fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription, BrokerError> {
        let consumer_id = random_id("c_");
        let shutdown = self.shutdown.subscribe();
        let namespace = if request.pattern.is_inbox() {
            INBOX_NAMESPACE
        } else {
            request.pattern.namespace()
        };
        let delivered = self.delivered.get(namespace).cloned().unwrap_or_default();
        let count = move |delivery: &Delivery| {
            if let Delivery::Events(events) = delivery {
                delivered.fetch_add(events.len() as u64, Ordering::Relaxed);
            }
        };
        if request.pattern.is_inbox() {
            let inbox = self.inboxes.subscribe(request.pattern.as_str());
            return Ok(Subscription {
                consumer_id,
                deliveries: Box::pin(subscription::inbox(inbox, shutdown).inspect(count)),
            });
        }
        let log = Arc::clone(
            self.log(request.pattern.namespace())
                .map_err(BrokerError::Invalid)?,
        );
        // "newest" means: what is published from now on.
        let start = match &request.start {
            Start::Newest => subscription::From::Position(log.committed()),
            Start::Oldest => subscription::From::Position(log.first_position()),
            Start::After(id) => subscription::From::After(id.clone()),
            Start::Position(position) => subscription::From::Position(*position),
            Start::Time(time) => subscription::From::Time(*time),
        };
        let stop_at = request.until_now.then(|| log.committed());
        let AckMode::Manual {
            redelivery,
            max_deliveries,
            window,
        } = request.ack
        else {
            let deliveries = subscription::follow(log, request.pattern, start, stop_at, shutdown);
            return Ok(Subscription {
                consumer_id,
                deliveries: Box::pin(deliveries.inspect(count)),
            });
        };
        let redelivery = consumer::Redelivery {
            every: redelivery,
            max_deliveries,
        };
        let window = window.clamp(1, MAX_WINDOW);
        let member = self.next_member.fetch_add(1, Ordering::Relaxed);
        let (member_tx, member_rx) = mpsc::channel(window);
        let join = Input::Join {
            member,
            window,
            deliveries: member_tx.clone(),
        };
        let inputs = match &request.consumer {
            None => {
                let (inputs, receiver) = mpsc::channel(consumer::INPUT_QUEUE);
                let _ = inputs.try_send(join);
                self.spawn_ephemeral(
                    log,
                    request.pattern.clone(),
                    start,
                    stop_at,
                    redelivery,
                    receiver,
                    member_tx,
                );
                inputs
            }
            Some(name) => {
                if request.until_now {
                    return Err(BrokerError::Invalid(
                        "until=now cannot be combined with consumer=: a durable consumer has no end".into(),
                    ));
                }
                self.attach(&log, name, &request, start, redelivery, join, member_tx)
                    .await?
            }
        };
        let registration = self.acks.register(
            &consumer_id,
            member,
            namespace,
            request.owner.clone(),
            request.zone.clone(),
            inputs.clone(),
        );
        let leave = LeaveOnDrop {
            inputs,
            member,
            _registration: registration,
        };
        let deliveries =
            futures_util::stream::unfold((member_rx, leave), |(mut rx, leave)| async move {
                let delivery = rx.recv().await?;
                Some((delivery, (rx, leave)))
            });
        Ok(Subscription {
            consumer_id,
            deliveries: Box::pin(deliveries.inspect(count)),
        })
    }

    /// Attaches a connection to durable consumer `name`, starting it if it is not running
    /// (creating it, within the limits on their numbers, if it does not exist). A running
    /// consumer is joined at once; starting one reads its stored progress on the blocking
    /// pool and opens its dispatcher, holding the consumer's lock against a concurrent
    /// start or delete: an idle consumer's dispatcher has stored its progress before it
    /// left the running ones, so a start never reads an older one.
    #[allow(clippy::too_many_arguments)]
    async fn attach(
        &self,
        log: &Arc<dyn EventLog>,
        name: &ConsumerName,
        request: &SubscribeRequest,
        start: subscription::From,
        redelivery: consumer::Redelivery,
        join: Input,
        member_tx: mpsc::Sender<Delivery>,
    ) -> Result<mpsc::Sender<Input>, BrokerError> {
        let pattern = request.pattern.as_str();
        let namespace = log.namespace();
        let conflict = |stored: &str| {
            BrokerError::Conflict(format!(
                "consumer {name:?} reads {stored:?}, not {pattern:?}: attach with its pattern, or delete it first"
            ))
        };
        // Ownership is checked before anything about the consumer is told.
        let check_owner = |owner: &Option<Owner>| match (owner, &request.owner) {
            (Some(owner), Some(caller)) if owner != caller && !request.admin => {
                Err(BrokerError::Forbidden(format!(
                    "consumer {name:?} belongs to another token; attach with the token that \
                     created it (or one with the admin grant)"
                )))
            }
            _ => Ok(()),
        };
        let key = (namespace.to_owned(), name.clone());
        // Joins the consumer if it runs; gives `join` back if it does not.
        let join_running = |join: &mut Option<Input>| {
            let mut durables = self.durables.lock().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = durables.get(&key) else {
                return Ok(None);
            };
            check_owner(&entry.owner)?;
            if entry.pattern != pattern {
                return Err(conflict(&entry.pattern));
            }
            let Some(input) = join.take() else {
                return Ok(None);
            };
            match entry.inputs.try_send(input) {
                Ok(()) => Ok(Some(entry.inputs.clone())),
                Err(mpsc::error::TrySendError::Full(_)) => Err(BrokerError::Conflict(format!(
                    "consumer {name:?} is too busy to take a new member; retry"
                ))),
                // Its dispatcher ended (a read failed), after its last save: start it again.
                Err(mpsc::error::TrySendError::Closed(returned)) => {
                    *join = Some(returned);
                    durables.remove(&key);
                    Ok(None)
                }
            }
        };
        let mut join = Some(join);
        if let Some(inputs) = join_running(&mut join)? {
            return Ok(inputs);
        }
        let _changing = self.lock_changes(&key).await;
        // Someone may have started it while this waited.
        if let Some(inputs) = join_running(&mut join)? {
            return Ok(inputs);
        }
        // If it retired, its last save lands before its progress is read.
        self.settling.settle(&key).await;
        let stored = {
            let (consumers, ns, file) = (
                Arc::clone(&self.consumers),
                namespace.to_owned(),
                name.clone(),
            );
            tokio::task::spawn_blocking(move || consumers.load(&ns, &file)).await
        };
        let stored = match stored {
            Ok(loaded) => loaded.map_err(|e| progress_unreadable(name, &e))?,
            Err(e) => return Err(blocking_task_failed(name, &e)),
        };
        if let Some(progress) = &stored {
            check_owner(&progress.owner)?;
        }
        let mut creating = Creating {
            registry: &self.registry,
            namespace,
            name,
            created: false,
        };
        let (from, progress) = match stored {
            Some(progress) if progress.pattern != pattern => {
                return Err(conflict(&progress.pattern))
            }
            Some(mut progress) => {
                // A consumer created while requests were not authenticated belongs to the
                // first token that attaches to it once they are.
                if progress.owner.is_none() && request.owner.is_some() {
                    tracing::info!(consumer = %name, "a durable consumer without an owner now belongs to the token that attached to it");
                    progress.owner = request.owner.clone();
                }
                // Counted as it is stored (also if its file was put there while the
                // server ran).
                self.registry
                    .insert(namespace, name.clone(), progress.owner.clone());
                (subscription::From::Position(progress.next), progress)
            }
            None => {
                self.registry
                    .create(namespace, name, request.owner.as_ref())
                    .map_err(|refusal| too_many_consumers(namespace, refusal))?;
                creating.created = true;
                (
                    start,
                    Progress {
                        pattern: pattern.to_owned(),
                        owner: request.owner.clone(),
                        ..Progress::default()
                    },
                )
            }
        };
        let owner = progress.owner.clone();
        let stats = Arc::new(ConsumerStats::default());
        stats.floor.store(progress.floor(), Ordering::Relaxed);
        let (inputs, receiver) = mpsc::channel(consumer::INPUT_QUEUE);
        let generation = self.next_member.fetch_add(1, Ordering::Relaxed);
        let durable = consumer::Durable {
            name: name.clone(),
            progress,
            stats: Arc::clone(&stats),
            saver: Arc::clone(&self.saver),
            retire: self.retire(key.clone(), generation),
            landed: {
                let (settling, key) = (Arc::clone(&self.settling), key.clone());
                Arc::new(move || settling.forget_landed(&key))
            },
        };
        let opened = Dispatcher::open(
            Arc::clone(log),
            request.pattern.clone(),
            from,
            None,
            redelivery,
            self.max_inflight_bytes,
            receiver,
            self.shutdown.subscribe(),
            Some(durable),
            Arc::clone(&self.redeliveries),
            Arc::clone(&self.confirmations),
        )
        .await;
        let dispatcher = match opened {
            Ok(dispatcher) => dispatcher,
            Err(message) => {
                // Nothing was stored: a consumer this attachment created does not exist
                // (`creating` uncounts it).
                // Told on the stream, as an unknown start id is; the stream then ends
                // (the dispatcher's queue is closed).
                let _ = member_tx.try_send(Delivery::Error(message));
                return Ok(inputs);
            }
        };
        if let Some(join) = join {
            let _ = inputs.try_send(join);
        }
        // Running before its dispatcher can retire.
        self.durables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                key,
                DurableEntry {
                    generation,
                    inputs: inputs.clone(),
                    pattern: pattern.to_owned(),
                    owner,
                    stats,
                },
            );
        self.run_dispatcher(async move { dispatcher.run().await });
        creating.created = false;
        Ok(inputs)
    }

    /// How the dispatcher of start `generation` of durable consumer `key` leaves the
    /// running ones when it is idle (see [`consumer::Retire`]).
    fn retire(&self, key: DurableKey, generation: u64) -> consumer::Retire {
        let durables = Arc::clone(&self.durables);
        let settling = Arc::clone(&self.settling);
        Box::new(
            move |inputs: &mut mpsc::Receiver<Input>, save: &mut Option<consumer::Save>| {
                let mut durables = durables.lock().unwrap_or_else(|p| p.into_inner());
                if durables
                    .get(&key)
                    .is_none_or(|entry| entry.generation != generation)
                {
                    return Retired::NotRunning;
                }
                // Joins are sent under this lock: none can come between this look and the
                // close.
                if !inputs.is_empty() {
                    return Retired::InputsQueued;
                }
                // Waited for before anyone reads the progress again, so taken before the
                // consumer stops being running.
                if let Some(save) = save.take() {
                    if let Some(entry) = durables.get(&key) {
                        settling.add(&key, save, &entry.pattern, &entry.stats);
                    }
                }
                durables.remove(&key);
                inputs.close();
                Retired::Yes
            },
        )
    }

    /// Starts an ephemeral consumer's dispatcher; an error opening it (an unknown start
    /// id) goes to its member.
    #[allow(clippy::too_many_arguments)]
    fn spawn_ephemeral(
        &self,
        log: Arc<dyn EventLog>,
        pattern: Pattern,
        from: subscription::From,
        stop_at: Option<u64>,
        redelivery: consumer::Redelivery,
        inputs: mpsc::Receiver<Input>,
        member: mpsc::Sender<Delivery>,
    ) {
        let shutdown = self.shutdown.subscribe();
        let redeliveries = Arc::clone(&self.redeliveries);
        let confirmations = Arc::clone(&self.confirmations);
        let max_bytes = self.max_inflight_bytes;
        self.run_dispatcher(async move {
            let opened = Dispatcher::open(
                log,
                pattern,
                from,
                stop_at,
                redelivery,
                max_bytes,
                inputs,
                shutdown,
                None,
                redeliveries,
                confirmations,
            )
            .await;
            match opened {
                Ok(dispatcher) => dispatcher.run().await,
                Err(message) => {
                    let _ = member.send(Delivery::Error(message)).await;
                }
            }
        });
    }

    /// Runs a dispatcher on its own task, awaited at shutdown.
    fn run_dispatcher(&self, dispatcher: impl std::future::Future<Output = ()> + Send + 'static) {
        let task = tokio::spawn(dispatcher);
        let mut dispatchers = self.dispatchers.lock().unwrap_or_else(|p| p.into_inner());
        dispatchers.retain(|task| !task.is_finished());
        dispatchers.push(task);
    }

    /// The durable consumers of `namespace`: running ones and stored ones. Reads the stored
    /// progress: blocking, for the blocking pool (`tokio::task::spawn_blocking`), never an
    /// async worker.
    pub fn consumers(&self, namespace: &str) -> Result<Vec<ConsumerInfo>, BrokerError> {
        let log = self.log(namespace).map_err(BrokerError::Invalid)?;
        let committed = log.committed();
        // Figures newer than what is stored: those of the running consumers, and of those
        // that retired before their last save landed (without members).
        let mut running: HashMap<ConsumerName, (String, Arc<ConsumerStats>, bool)> = self
            .settling
            .listed(namespace)
            .into_iter()
            .map(|(name, pattern, stats)| (name, (pattern, stats, false)))
            .collect();
        running.extend(
            self.durables
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|((ns, _), _)| ns == namespace)
                .map(|((_, name), entry)| {
                    (
                        name.clone(),
                        (entry.pattern.clone(), Arc::clone(&entry.stats), true),
                    )
                }),
        );
        let members = |stats: &ConsumerStats, running: bool| {
            if running {
                stats.members.load(Ordering::Relaxed)
            } else {
                0
            }
        };
        let stored = self.consumers.list(namespace).map_err(|e| {
            tracing::error!(namespace, error = %e, "listing the stored durable consumers failed");
            BrokerError::Storage(format!(
                "the durable consumers of {namespace} cannot be listed (see the server's log)"
            ))
        })?;
        let mut all: Vec<ConsumerInfo> = stored
            .into_iter()
            .map(|(name, progress)| {
                let (floor, pending, members) = match running.get(&name) {
                    Some((_, stats, running)) => (
                        stats.floor.load(Ordering::Relaxed),
                        stats.pending.load(Ordering::Relaxed),
                        members(stats, *running),
                    ),
                    None => (progress.floor(), progress.unacked.len() as u64, 0),
                };
                ConsumerInfo {
                    dead_letter_subject: consumer::dead_letter_subject(namespace, &name),
                    name: name.to_string(),
                    pattern: progress.pattern,
                    acked_floor: floor,
                    pending,
                    lag: committed.saturating_sub(floor),
                    members,
                }
            })
            .collect();
        // A consumer started a moment ago may not have stored its progress yet.
        for (name, (pattern, stats, running)) in running {
            if all.iter().any(|c| c.name == name.as_str()) {
                continue;
            }
            let floor = stats.floor.load(Ordering::Relaxed);
            all.push(ConsumerInfo {
                dead_letter_subject: consumer::dead_letter_subject(namespace, &name),
                name: name.to_string(),
                pattern,
                acked_floor: floor,
                pending: stats.pending.load(Ordering::Relaxed),
                lag: committed.saturating_sub(floor),
                members: members(&stats, running),
            });
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Deletes durable consumer `name` of `namespace`: its members' streams end and its
    /// progress is removed (on the blocking pool, after the dispatcher's last save).
    pub async fn delete_consumer(
        &self,
        namespace: &str,
        name: &ConsumerName,
    ) -> Result<(), BrokerError> {
        self.log(namespace).map_err(BrokerError::Invalid)?;
        let key = (namespace.to_owned(), name.clone());
        let _changing = self.lock_changes(&key).await;
        // If it retired, its last save lands first: it would bring the file back.
        self.settling.settle(&key).await;
        // A damaged progress file is deleted like any other.
        let stored = {
            let (consumers, ns, file) = (
                Arc::clone(&self.consumers),
                namespace.to_owned(),
                name.clone(),
            );
            tokio::task::spawn_blocking(move || !matches!(consumers.load(&ns, &file), Ok(None)))
                .await
                .map_err(|e| blocking_task_failed(name, &e))?
        };
        let running = self
            .durables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        if let Some(entry) = &running {
            // Its dispatcher ends its members' streams and waits for its running save; its
            // queue closes when it has ended.
            let _ = entry.inputs.send(Input::Delete).await;
            entry.inputs.closed().await;
        }
        // It may have retired meanwhile.
        self.settling.settle(&key).await;
        let removed = {
            let (consumers, ns, file) = (
                Arc::clone(&self.consumers),
                namespace.to_owned(),
                name.clone(),
            );
            tokio::task::spawn_blocking(move || consumers.remove(&ns, &file))
                .await
                .map_err(|e| blocking_task_failed(name, &e))?
        };
        removed.map_err(|e| {
            tracing::error!(consumer = %name, namespace, error = %e, "removing a consumer's stored progress failed");
            BrokerError::Storage(format!(
                "consumer {name}'s stored progress could not be removed (see the server's log)"
            ))
        })?;
        let counted = self.registry.remove(namespace, name);
        if running.is_none() && !stored && !counted {
            return Err(BrokerError::NotFound(format!(
                "namespace {namespace} has no consumer {name:?}"
            )));
        }
        Ok(())
    }

    /// Holds durable consumer `key` against other starts and deletes until dropped (see
    /// `changing`).
    async fn lock_changes(&self, key: &DurableKey) -> ChangeGuard<'_> {
        let lock = Arc::clone(
            self.changing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.clone())
                .or_default(),
        );
        ChangeGuard {
            changing: &self.changing,
            key: key.clone(),
            guard: Some(lock.lock_owned().await),
        }
    }

    /// Waits for the consumers' dispatchers to store their progress and end, and for the
    /// last saves of those that retired (after [`Broker::shut_down`]).
    pub async fn wait_for_consumers(&self) {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.dispatchers.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
        self.settling.settle_all().await;
    }

    /// Starts counting the consumers that acknowledge `event_id` (before it is published;
    /// see [`confirm`]).
    pub fn expect_confirmations(&self, event_id: &str) -> ConfirmWait {
        self.confirmations.expect(event_id)
    }

    /// A fresh inbox subject, already subscribed, for a reply to come to.
    pub fn reply_inbox(&self) -> (String, InboxSubscription) {
        let subject = format!("{INBOX_NAMESPACE}.{}", random_id("r_"));
        let inbox = self.inboxes.subscribe(&subject);
        (subject, inbox)
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
            self.publish_to_inbox(&claim.subject, &reply);
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

    /// The namespace and owner of a connected manual-ack consumer.
    pub fn consumer(&self, consumer_id: &str) -> Option<(String, Option<Owner>)> {
        self.acks.consumer(consumer_id)
    }

    /// Passes acknowledgements to the consumer waiting for them (if it is connected).
    pub fn ack(&self, consumer_id: &str, event_ids: Vec<String>) -> bool {
        self.acks.ack(consumer_id, event_ids)
    }

    /// A negative ack: deliver the event again after `delay` (to any member).
    pub fn nak(&self, consumer_id: &str, event_id: String, delay: Duration) -> bool {
        self.acks.nak(consumer_id, event_id, delay)
    }

    /// Ends every subscription.
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
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

/// A durable consumer held against other starts and deletes ([`Broker::lock_changes`]).
struct ChangeGuard<'a> {
    changing: &'a Mutex<HashMap<DurableKey, Arc<tokio::sync::Mutex<()>>>>,
    key: DurableKey,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        // The lock goes when no one else holds or waits for it: they hold a clone.
        if changing
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            changing.remove(&self.key);
        }
    }
}

/// A durable consumer this attachment counted as created, uncounted if it is dropped
/// before the consumer runs (an error, or the request went away): nothing was stored.
struct Creating<'a> {
    registry: &'a Registry,
    namespace: &'a str,
    name: &'a ConsumerName,
    created: bool,
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        if self.created {
            self.registry.remove(self.namespace, self.name);
        }
    }
}

/// A new durable consumer would pass a limit on their numbers. The message names the
/// server's flag that sets the limit, for the operator.
fn too_many_consumers(namespace: &str, refusal: Refusal) -> BrokerError {
    BrokerError::Conflict(match refusal {
        Refusal::Namespace { limit } => format!(
            "namespace {namespace} has reached its limit of {limit} durable consumers \
             (--max-consumers): delete one (DELETE /consumers/{namespace}/<name>) or raise the limit"
        ),
        Refusal::Owner { limit } => format!(
            "this token owns {limit} durable consumers, its limit (--max-consumers-per-token): \
             delete one or raise the limit"
        ),
    })
}

/// A blocking task reading or removing a consumer's progress failed (panicked or was
/// cancelled at shutdown).
fn blocking_task_failed(name: &ConsumerName, error: &tokio::task::JoinError) -> BrokerError {
    tracing::error!(consumer = %name, error = %error, "a task storing a consumer's progress failed");
    BrokerError::Storage(format!(
        "consumer {name}'s stored progress could not be read or written (see the server's log)"
    ))
}

/// The stored progress of a durable consumer could not be read: logged with its path, told
/// to the client without it.
fn progress_unreadable(name: &ConsumerName, error: &StorageError) -> BrokerError {
    tracing::error!(consumer = %name, error = %error, "reading a consumer's stored progress failed");
    BrokerError::Storage(format!(
        "consumer {name}'s stored progress cannot be read (see the server's log)"
    ))
}

/// Held by a manual-ack connection's stream: when the stream is dropped (the client left
/// or the server shut down), its consumer id stops taking acks and its dispatcher hands
/// what it held to others.
struct LeaveOnDrop {
    inputs: mpsc::Sender<Input>,
    member: u64,
    _registration: Registration,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        // A full queue means a busy dispatcher, which notices the closed stream on its
        // next delivery to it.
        let _ = self.inputs.try_send(Input::Leave {
            member: self.member,
        });
    }
}

/// An id for an event published with server-side confirmation or reply, fixed before it
/// is appended (a client-style id, so the log accepts it).
pub fn new_event_id() -> String {
    random_id("e_")
}

/// `prefix` followed by 20 random lowercase base32hex characters, like the reference's
/// xid-based ids.
fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // Without the OS's randomness, fall back on time and a counter: still unique.
        let nanos = Timestamp::now().unix_nanos() as u128;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u128;
        bytes = (nanos ^ (n << 64)).to_le_bytes();
    }
    let value = u128::from_le_bytes(bytes);
    let generation = (value >> 60) as u64 & ids::GENERATION_MASK;
    let rest = value as u64 & ids::MAX_POSITION;
    let encoded = ids::encode(generation, rest);
    format!("{prefix}{}", String::from_utf8_lossy(&encoded[2..]))
}

/// Refills the deduplication window from the newest events of a log.
///
/// What is gathered is bounded like the window itself: keys longer than `max_key_len`
/// (which no publish can use again) are skipped, and of the rest only the newest that fit
/// the window's budget are kept while scanning.
fn rebuild_dedup(log: &dyn EventLog, dedup: &Dedup, max_key_len: usize) {
    let mut keyed: std::collections::VecDeque<KeyedEvent> = Default::default();
    let mut bytes = 0;
    let cost = |event: &KeyedEvent| event.subject.len() + event.key.len() + dedup::ENTRY_OVERHEAD;
    let scanned = log.visit_recent_keys(DEDUP_REBUILD_EVENTS, max_key_len, &mut |event| {
        bytes += cost(&event);
        keyed.push_back(event);
        while bytes > dedup.budget() {
            match keyed.pop_front() {
                Some(oldest) => bytes -= cost(&oldest),
                None => break,
            }
        }
    });
    if let Err(e) = scanned {
        tracing::warn!(namespace = log.namespace(), error = %e, "cannot rebuild the deduplication window from the log");
        return;
    }
    let now = Timestamp::now();
    let mut restored = HashMap::<String, usize>::new();
    for event in keyed.into_iter().rev() {
        let age = Duration::from_nanos(
            now.unix_nanos()
                .saturating_sub(event.committed_at.unix_nanos())
                .max(0) as u64,
        );
        if dedup.restore(&event.subject, &event.key, age) {
            *restored.entry(event.subject).or_default() += 1;
        }
    }
    if !restored.is_empty() {
        tracing::info!(
            namespace = log.namespace(),
            keys = restored.values().sum::<usize>(),
            subjects = restored.len(),
            "deduplication window rebuilt from the log"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::store::memory::MemoryConsumers;
    use crate::store::{Log, StoreConfig};

    fn keyed(key: &str) -> Publication {
        Publication::One(NewEvent {
            subject: "orders.paid".into(),
            key: key.into(),
            payload: Some(b"1".to_vec()),
            ..NewEvent::default()
        })
    }

    /// Polls `future` once, then drops it: a request abandoned at that await point.
    fn poll_once_and_drop<F: Future>(future: F) {
        let mut future = std::pin::pin!(future);
        let mut context = Context::from_waker(Waker::noop());
        assert!(
            matches!(future.as_mut().poll(&mut context), Poll::Pending),
            "the publish must be waiting for the writer"
        );
    }

    /// Events stored with key `key`.
    fn stored_with_key(log: &Log, key: &str) -> usize {
        let mut found = 0;
        log.scan_blocking(0, |_, json, layout| {
            if let Some(range) = layout.key.clone() {
                if json[range] == *format!("\"{key}\"").as_bytes() {
                    found += 1;
                }
            }
        })
        .expect("scan");
        found
    }

    /// A publish dropped while it waits for room in the writer's queue, or for the writer
    /// to commit it, leaves its key reserved exactly when its event is stored: the retry
    /// is refused only if the event is in the log, and the log holds it once either way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_publish_keeps_its_keys_exactly_when_its_event_is_stored() {
        for queue_full in [true, false] {
            let data = tempfile::tempdir().expect("tempdir");
            let config = StoreConfig::new(data.path());
            let log =
                Arc::new(Log::open(&data.path().join("orders"), "orders", &config).expect("open"));
            let storage = Storage {
                logs: vec![Arc::clone(&log) as Arc<dyn EventLog>],
                consumers: Arc::new(MemoryConsumers::default()),
            };
            let broker = Broker::new(
                storage,
                &BrokerConfig {
                    dup_size: 100,
                    ..BrokerConfig::default()
                },
            );
            let resume = log.pause_writer().await;
            let mut fillers = Vec::new();
            if queue_full {
                for _ in 0..log.queue_room() {
                    let log = Arc::clone(&log);
                    let event = PendingEvent::new(&EventDraft {
                        subject: "orders.filler",
                        ..EventDraft::default()
                    })
                    .expect("event");
                    fillers.push(tokio::spawn(async move { log.append(vec![event]).await }));
                }
                while log.queue_room() > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            poll_once_and_drop(broker.publish(keyed("k")));
            // Whatever was started in the background may now finish.
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(resume);
            for filler in fillers {
                filler.await.expect("join").expect("filler stored");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;

            let before = stored_with_key(&log, "k");
            let retry = broker.publish(keyed("k")).await;
            let after = stored_with_key(&log, "k");
            match retry {
                Err(PublishError::Duplicate(message)) => {
                    assert!(message.starts_with(DUPLICATE_KEY), "{message}");
                    assert_eq!(
                        before, 1,
                        "refused although nothing was stored (queue full: {queue_full})"
                    );
                }
                Ok(_) => assert_eq!(
                    before, 0,
                    "accepted a second copy (queue full: {queue_full})"
                ),
                Err(other) => panic!("{other}"),
            }
            assert_eq!(after, 1, "queue full: {queue_full}");
            log.close().await.expect("close");
        }
    }
}
