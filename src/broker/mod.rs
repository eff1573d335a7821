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
//! - **Manual ack**: a window of `max_inflight` unacknowledged events per connection (one
//!   by default, the reference's stop-and-wait; bounded in bytes too), each redelivered
//!   after `redelivery` until acknowledged or delivered `max_deliveries` times; durable named
//!   consumers shared by queue groups, limited in number per namespace and per owner, and
//!   running only while they have members ([`consumer`]; counts in `registry`).
//! - **Inbox subjects** (`_bus_.…`) live in memory only ([`inbox`]).
//! - **Namespace information** for operators: what a log keeps, its durable consumers
//!   (`namespaces`).
//!
//! Everything ends when the broker is shut down.

pub mod acks;
pub mod confirm;
pub mod consumer;
pub mod dedup;
mod durable;
pub mod inbox;
mod listening;
mod namespaces;
mod publish;
mod registry;
mod relayed;
mod relayed_inboxes;
mod relayed_members;
mod reply;
mod reply_claim;
mod served;
mod settling;
mod subscribe;
mod subscription;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::acks::{Acks, Registration};
use self::confirm::{ConfirmWait, Confirmations};
use self::dedup::Dedup;
use self::durable::{DurableEntry, DurableKey};
use self::inbox::InboxSubscription;
use self::inbox::Inboxes;
use self::publish::rebuild_dedup;
use self::registry::Registry;
pub use self::reply_claim::ReplyClaim;
use self::settling::Settling;
use crate::event::{EventDraft, StoredEvent};
pub use crate::store::{ConsumerName, Owner};
use crate::store::{
    ConsumerStore, Consumers, EventLog, Relay, ServedConsumers, Storage, StorageError,
};
use crate::subject::Pattern;
use crate::timestamp::Timestamp;

/// Defaults of the reference server, used when a client leaves a parameter empty.
pub const DEFAULT_REDELIVERY: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_DELIVERIES: i64 = 3;
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
    /// Up to `max_inflight` unacknowledged events at a time (1: stop-and-wait), each
    /// redelivered after `redelivery`; given up after `max_deliveries` deliveries
    /// (`None`: never).
    Manual {
        redelivery: Duration,
        max_deliveries: Option<u32>,
        max_inflight: usize,
    },
}

/// The largest `max_inflight` a connection may ask for.
pub const MAX_INFLIGHT: usize = 10_000;

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

/// A durable consumer as the admin listing shows it: the wire's type, so that the two
/// sides of `GET /consumers/{namespace}` cannot drift apart.
pub use crate::wire::ConsumerInfo;

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
    /// Events the subscriber asked for were removed by retention before it read them.
    Skipped(Skipped),
}

/// Events a subscription was to read that retention removed first: positions `first` to
/// `last`; it goes on from `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    pub first: u64,
    pub last: u64,
    pub next: u64,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "events {} to {} were removed by retention; continuing from position {}",
            self.first, self.last, self.next
        )
    }
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
    /// Who runs the manual-ack consumers.
    consumers: ConsumerBackend,
    dedup: Dedup,
    inboxes: Arc<Inboxes>,
    /// Inbox events to and from the other nodes on a shared backend.
    relayed_inboxes: Option<relayed_inboxes::RelayedInboxes>,
    acks: Arc<Acks>,
    shutdown: watch::Sender<bool>,
    /// Permits for the reads that subscriptions make of the logs, shared by all of them.
    reads: Arc<tokio::sync::Semaphore>,
    /// Events sent to subscribers since the server started, by namespace (inboxes under
    /// [`INBOX_NAMESPACE`]).
    delivered: BTreeMap<String, Arc<AtomicU64>>,
    /// Redeliveries and dead letters of the manual-ack consumers.
    delivery_counts: Arc<consumer::DeliveryCounts>,
    /// Publishes refused as duplicates (a deduplication key seen, or an id stored).
    duplicates: AtomicU64,
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
    /// How this node reaches the others on a shared backend (relayed acks).
    relay: Option<Arc<dyn Relay>>,
    /// The members on this node of durable consumers that the storage serves.
    served_members: Arc<served::ServedMembers>,
    /// Answers other nodes' questions about `served_members`, once this node has some.
    members_answering: tokio::sync::OnceCell<listening::Listening>,
    /// The dispatchers of manual-ack consumers, awaited at shutdown (they store progress
    /// and append dead letters).
    dispatchers: Mutex<Vec<JoinHandle<()>>>,
    next_member: AtomicU64,
    confirmations: Arc<Confirmations>,
}

/// Who runs the manual-ack consumers.
enum ConsumerBackend {
    /// The broker's dispatchers ([`consumer`]), storing durable consumers' progress in
    /// `store` through the `saver`.
    Dispatched {
        store: Arc<dyn ConsumerStore>,
        saver: Arc<consumer::Saver>,
    },
    /// The storage ([`served`]).
    Served(Arc<dyn ServedConsumers>),
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
    /// Events durable consumers appended to their dead-letter subjects.
    pub dead_letters: u64,
    /// Events ephemeral consumers gave up after their last delivery.
    pub given_up: u64,
    /// Publishes refused `409` as duplicates.
    pub duplicates: u64,
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
        let dedup = Dedup::new(config.dup_size, config.dup_ttl, config.dup_memory);
        if dedup.enabled() {
            for log in logs.values() {
                rebuild_dedup(log.as_ref(), &dedup, config.max_key_len);
            }
        }
        // Existing consumers are counted once, here (blocking reads, at start-up).
        let registry = Registry::new(config.max_consumers, config.max_consumers_per_owner);
        for namespace in logs.keys() {
            let existing = match &storage.consumers {
                Consumers::Dispatched(store) => store.list(namespace).map(|stored| {
                    stored
                        .into_iter()
                        .map(|(name, progress)| (name, progress.owner))
                        .collect()
                }),
                Consumers::Served(served) => match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => runtime.block_on(served.list(namespace)).map(|listed| {
                        listed
                            .into_iter()
                            .map(|consumer| (consumer.name, consumer.owner))
                            .collect::<Vec<_>>()
                    }),
                    Err(_) => Ok(Vec::new()),
                },
            };
            match existing {
                Ok(existing) => {
                    for (name, owner) in existing {
                        registry.insert(namespace, name, owner);
                    }
                }
                Err(e) => {
                    tracing::error!(namespace, error = %e, "listing the durable consumers failed")
                }
            }
        }
        let inboxes = Arc::new(Inboxes::default());
        let relayed_inboxes = storage.relay.clone();
        let consumers = match storage.consumers {
            Consumers::Dispatched(store) => ConsumerBackend::Dispatched {
                saver: Arc::new(consumer::Saver::new(
                    Arc::clone(&store),
                    consumer::SAVER_THREADS,
                )),
                store,
            },
            Consumers::Served(served) => ConsumerBackend::Served(served),
        };
        let delivered = logs
            .keys()
            .map(String::as_str)
            .chain([INBOX_NAMESPACE])
            .map(|namespace| (namespace.to_owned(), Arc::default()))
            .collect();
        Broker {
            logs,
            consumers,
            relay: storage.relay,
            served_members: Arc::default(),
            members_answering: tokio::sync::OnceCell::new(),
            dedup,
            relayed_inboxes: relayed_inboxes
                .map(|relay| relayed_inboxes::RelayedInboxes::new(relay, Arc::clone(&inboxes))),
            inboxes,
            acks: Arc::new(Acks::default()),
            shutdown: watch::channel(false).0,
            reads: Arc::new(tokio::sync::Semaphore::new(subscription::CONCURRENT_READS)),
            delivered,
            delivery_counts: Arc::default(),
            duplicates: AtomicU64::new(0),
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
            redeliveries: self.delivery_counts.redeliveries.load(Ordering::Relaxed),
            dead_letters: self.delivery_counts.dead_letters.load(Ordering::Relaxed),
            given_up: self.delivery_counts.given_up.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
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

/// An id for an event published with server-side confirmation or reply, fixed before it
/// is appended (a client-style id, so the log accepts it).
pub fn new_event_id() -> String {
    random_id("e_")
}

/// `prefix` followed by 20 random lowercase base32hex characters, like the reference's
/// xid-based ids.
fn random_id(prefix: &str) -> String {
    format!("{prefix}{}", crate::random::token(20))
}
