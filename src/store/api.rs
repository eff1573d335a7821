//! The storage interface: everything the broker, the HTTP layer and the server need from
//! a storage backend, and nothing more.
//!
//! - [`EventLog`]: one namespace's log — append a batch atomically, read from a position,
//!   the committed watermark and a way to wait for it, outages of remote storage, the
//!   first retained position, find
//!   an id or a time, the recent keyed events (to rebuild the deduplication window), and
//!   its health, statistics, storage usage and retention.
//! - [`ConsumerStore`]: durable consumers' progress — load, save, remove, list — for a
//!   backend whose consumers the broker runs itself.
//! - [`ServedConsumers`]: consumers the backend runs itself (JetStream consumers): it
//!   keeps what each was delivered and acknowledged, redelivers what is not acknowledged
//!   in time, and hands events to the [`ServedMember`]s that pull them.
//! - [`Relay`]: messages between the nodes that share a backend, for what is never stored.
//! - [`StorageError`]: one backend-neutral error, a [kind](ErrorKind) for the front end to
//!   answer with and a message with the details for the server's log.
//!
//! Two backends implement them: the file store ([`super::Log`], [`super::FileConsumers`],
//! opened by [`super::Store`]) and the in-memory one ([`super::memory`]), which the
//! broker's own tests run on. What only a backend has (segments, encryption, recovery
//! reports, offline inspection) stays behind it. Whatever another backend could not offer
//! does not belong here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::consumers::{ConsumerName, ConsumerProgress, Owner};
use crate::event::{PendingEvent, StoredEvent};
use crate::metrics::Histogram;
use crate::timestamp::Timestamp;

/// A boxed future, so that the traits can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What kind of failure a storage operation met, whatever the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No room: a full disk, a stream at its limits. Retrying later may work.
    Full,
    /// The operation cannot be done now: the storage is closing, stopped after a failure,
    /// or unreachable.
    Unavailable,
    /// What was asked for does not exist.
    NotFound,
    /// It contradicts what is stored: an event id that exists, or one of the form the
    /// store assigns itself.
    Conflict,
    /// An event larger than the store can hold.
    TooLarge,
    /// Stored data is damaged.
    Corrupt,
    /// Anything else.
    Internal,
}

/// A failed storage operation: its kind, and what happened, with the file, offset or id a
/// person needs to act (for the server's log; only conflicts and sizes are the caller's to
/// read).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StorageError {
    pub kind: ErrorKind,
    pub message: String,
}

impl StorageError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> StorageError {
        StorageError {
            kind,
            message: message.into(),
        }
    }
}

/// What the log assigned to an appended event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub position: u64,
    pub id: String,
    pub created_at: Timestamp,
}

/// A stored event that carries a deduplication key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedEvent {
    pub subject: String,
    pub key: String,
    /// When the store committed it (never a time the client chose).
    pub committed_at: Timestamp,
}

/// Counters of a log since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Events in the log.
    pub events: u64,
    /// Group commits written (each one write call).
    pub groups: u64,
    /// Syncs to stable storage.
    pub syncs: u64,
    /// Reads served from storage rather than the in-memory tail.
    pub disk_reads: u64,
}

/// What a log takes in storage now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageUsage {
    /// Events kept.
    pub events: u64,
    /// Bytes, as the backend counts them (the file store: its files on disk).
    pub bytes: u64,
    /// The files the log is kept in; `None` for a backend without files of its own.
    pub segments: Option<u64>,
}

/// How a log's commits went since it was opened.
pub struct CommitTimings<'a> {
    /// Events per commit (its count: the commits; its sum: the events appended).
    pub group_events: &'a Histogram,
    /// Duration of each sync to stable storage, in µs.
    pub sync_micros: &'a Histogram,
}

/// One namespace's log, as the broker, the HTTP layer and the server use it.
pub trait EventLog: Send + Sync {
    fn namespace(&self) -> &str;

    /// Appends a batch atomically. Client-supplied ids must not exist yet in the log.
    fn append(
        &self,
        batch: Vec<PendingEvent>,
    ) -> BoxFuture<'_, Result<Vec<Appended>, StorageError>>;

    /// Up to `max_events` committed events starting at position `from`, in order. It may
    /// return fewer (it stops at a segment's end or after about 256 KiB), but never none
    /// while an event is stored between `from` and the committed watermark; at or past
    /// it, none. Positions where a store keeps nothing are skipped (a clustered JetStream
    /// stream skips the sequence of an append refused after it was proposed; the file
    /// and memory stores have no such gaps).
    fn read(
        &self,
        from: u64,
        max_events: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEvent>, StorageError>>;

    /// The committed watermark: the number of committed events, i.e. the next position.
    fn committed(&self) -> u64;

    /// A receiver that changes whenever the watermark advances.
    fn watch_committed(&self) -> watch::Receiver<u64>;

    /// Why the storage is out of reach while it is (reads that need it and appends fail
    /// until it is back), `None` while it is not: a receiver that changes when that
    /// changes. A backend that cannot be out of reach (local files, memory) keeps the
    /// default, a receiver that stays `None` (its sender is gone).
    fn watch_outage(&self) -> watch::Receiver<Option<String>> {
        watch::channel(None).1
    }

    /// The position of the oldest event kept (0 unless retention removed older ones).
    fn first_position(&self) -> u64;

    /// The position of the committed event with this id.
    fn find_id<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<u64>, StorageError>>;

    /// The position of the first event committed at or after `time`, by the log's own
    /// commit times (never a `created_at` a client chose); the committed watermark if
    /// there is none.
    fn first_committed_at_or_after(
        &self,
        time: Timestamp,
    ) -> BoxFuture<'_, Result<u64, StorageError>>;

    /// Calls `visit` with the events among the last `events` that carry a key of at most
    /// `max_key_len` bytes, oldest first. Blocking.
    fn visit_recent_keys(
        &self,
        events: u64,
        max_key_len: usize,
        visit: &mut dyn FnMut(KeyedEvent),
    ) -> Result<(), StorageError>;

    /// The broker's deduplication window forgot these (subject, key) pairs: a backend that
    /// also holds keys, across the nodes that share it, lets them go too, so that a key is
    /// refused exactly while it is in the window of the node that took it. Others ignore
    /// it.
    fn forget_keys(&self, _keys: Vec<(String, String)>) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Why the log takes no appends any more, if it stopped after a failure.
    fn halted(&self) -> Option<String>;

    fn stats(&self) -> LogStats;

    fn commit_timings(&self) -> CommitTimings<'_>;

    /// What the log keeps and takes in storage. Blocking.
    fn usage(&self) -> Result<StorageUsage, StorageError>;

    /// Removes the oldest events while the log holds more than `max_bytes` or they were
    /// committed longer than `max_age` ago (as whole units of the backend's storage, never
    /// the one being written); returns the (first position, events) of each unit removed.
    /// Blocking.
    fn enforce_retention(
        &self,
        max_age: Option<Duration>,
        max_bytes: Option<u64>,
    ) -> Result<Vec<(u64, u64)>, StorageError>;

    /// Commits what is queued, syncs, and closes: appends fail afterwards, reads go on.
    fn close(&self) -> BoxFuture<'_, Result<(), StorageError>>;
}

/// Durable consumers' stored progress, by namespace and name. Every call blocks: call it
/// from a blocking thread.
pub trait ConsumerStore: Send + Sync {
    fn load(
        &self,
        namespace: &str,
        name: &ConsumerName,
    ) -> Result<Option<ConsumerProgress>, StorageError>;

    /// Replaces the stored progress atomically: after a crash, the old or the new.
    fn save(
        &self,
        namespace: &str,
        name: &ConsumerName,
        progress: &ConsumerProgress,
    ) -> Result<(), StorageError>;

    /// Forgets a consumer (nothing to do if it has no stored progress).
    fn remove(&self, namespace: &str, name: &ConsumerName) -> Result<(), StorageError>;

    /// Every stored consumer of the namespace, by name; damaged entries are left out (and
    /// logged).
    fn list(&self, namespace: &str) -> Result<Vec<(ConsumerName, ConsumerProgress)>, StorageError>;
}

/// A consumer that the backend runs, as it is to be created.
#[derive(Debug, Clone)]
pub struct ServedSpec<'a> {
    pub namespace: &'a str,
    /// A durable consumer's name; `None` for an ephemeral one, which has one member and
    /// ends with it.
    pub name: Option<&'a ConsumerName>,
    pub pattern: &'a str,
    pub owner: Option<&'a Owner>,
    /// The first position it reads, when it is created (an existing durable consumer
    /// goes on where it stands).
    pub start: u64,
    /// How long a delivered event waits for its ack before it is delivered again.
    pub ack_wait: Duration,
    /// Unacknowledged events the consumer may have out at once, across its members.
    pub max_ack_pending: usize,
}

/// A durable consumer as the backend keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedConsumer {
    pub name: ConsumerName,
    pub pattern: String,
    pub owner: Option<Owner>,
    /// The first position that is not done (acknowledged, given up or not matching).
    pub floor: u64,
    /// Events delivered and not acknowledged yet.
    pub pending: u64,
    /// Matching events not delivered yet.
    pub undelivered: u64,
}

/// An event a served consumer delivers.
#[derive(Debug, Clone)]
pub struct Served {
    pub event: StoredEvent,
    /// Its deliveries so far, this one included.
    pub deliveries: u32,
    /// What settles this delivery ([`ServedMember::settle`]).
    pub token: String,
}

/// What becomes of a delivered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done with: acknowledged.
    Ack,
    /// To be delivered again after the delay (to any member).
    Nak(Duration),
    /// Never to be delivered again, unacknowledged (given up).
    Term,
}

/// Where a served consumer stands, for a member that stops at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedState {
    /// Events delivered and not settled.
    pub unsettled: u64,
    /// Matching events not delivered yet.
    pub undelivered: u64,
    /// The position after the last event delivered.
    pub delivered_to: u64,
}

/// Durable and ephemeral consumers that the backend runs itself. The broker checks
/// owners, patterns and limits; the backend keeps the rest.
pub trait ServedConsumers: Send + Sync {
    /// Durable consumer `name` of `namespace`, if it exists.
    fn find<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a ConsumerName,
    ) -> BoxFuture<'a, Result<Option<ServedConsumer>, StorageError>>;

    /// Creates the consumer of `spec` unless it exists (a durable one is then left as it
    /// is), and opens a member of it.
    fn join<'a>(
        &'a self,
        spec: ServedSpec<'a>,
    ) -> BoxFuture<'a, Result<Box<dyn ServedMember>, StorageError>>;

    /// Gives durable consumer `name` an owner.
    fn set_owner<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a ConsumerName,
        owner: &'a Owner,
    ) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Removes durable consumer `name`; whether it existed. Its members' next pulls fail
    /// ([`ErrorKind::NotFound`]).
    fn delete<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a ConsumerName,
    ) -> BoxFuture<'a, Result<bool, StorageError>>;

    /// The durable consumers of `namespace`, by name.
    fn list<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ServedConsumer>, StorageError>>;
}

/// One member of a served consumer: it pulls events up to its window.
pub trait ServedMember: Send + Sync {
    /// Makes sure that up to `events` events more than this member holds, of at most
    /// `bytes` in all, are on their way (when it holds none, the first is sent whatever
    /// its size).
    fn want(
        &mut self,
        events: usize,
        bytes: usize,
        holding: usize,
    ) -> BoxFuture<'_, Result<(), StorageError>>;

    /// The next events for this member: those that arrived together, in order; none when
    /// nothing came but the member should ask again ([`ServedMember::want`]).
    /// Cancel-safe.
    fn next(&mut self) -> BoxFuture<'_, Result<Vec<Served>, StorageError>>;

    /// Settles a delivery.
    fn settle<'a>(&'a self, token: &'a str, how: Settle)
        -> BoxFuture<'a, Result<(), StorageError>>;

    /// Where the consumer stands.
    fn state(&self) -> BoxFuture<'_, Result<ServedState, StorageError>>;

    /// Leaves the consumer: stops taking deliveries, then gives back those it holds
    /// (`held`, tokens) and those on their way, for the other members to take at once.
    /// An ephemeral consumer is removed.
    fn close(self: Box<Self>, held: Vec<String>) -> BoxFuture<'static, ()>;
}

/// Messages between the nodes that share a backend, for what is never stored (an ack that
/// reaches another node than the connection's, an inbox event): messages and requests on
/// subjects, heard by the other nodes that listen there (a node never hears its own).
/// Only a backend that several nodes share has one.
pub trait Relay: Send + Sync {
    /// Sends `body` to whoever listens on `subject`, if anyone; no answer.
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        body: Bytes,
    ) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Sends `body` to whoever listens on `subject` and waits for the answer; `None` when
    /// nobody listens.
    fn request<'a>(
        &'a self,
        subject: &'a str,
        body: Bytes,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StorageError>>;

    /// Sends `body` to every other node listening on `subject`; their answers, as they
    /// come in until none has come for a moment (nodes on one NATS answer within
    /// milliseconds of each other), none when nobody listens.
    fn gather<'a>(
        &'a self,
        subject: &'a str,
        body: Bytes,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, StorageError>>;

    /// Listens on `subject` until the listener is dropped.
    fn listen<'a>(
        &'a self,
        subject: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn RelayListener>, StorageError>>;
}

/// Requests arriving on a subject ([`Relay::listen`]).
pub trait RelayListener: Send {
    /// The next message: its body, and where its answer goes if it is a request. `None`
    /// once the relay is gone.
    fn next(&mut self) -> BoxFuture<'_, Option<(Bytes, Option<String>)>>;

    /// Answers a request.
    fn answer(&self, to: String, body: Bytes) -> BoxFuture<'_, ()>;
}

/// Who runs a backend's consumers.
#[derive(Clone)]
pub enum Consumers {
    /// The broker, storing their progress here.
    Dispatched(Arc<dyn ConsumerStore>),
    /// The backend itself.
    Served(Arc<dyn ServedConsumers>),
}

/// A backend opened for the declared namespaces: what the server hands to the broker.
#[derive(Clone)]
pub struct Storage {
    pub logs: Vec<Arc<dyn EventLog>>,
    pub consumers: Consumers,
    /// How this node reaches the others on the same backend, if it is shared.
    pub relay: Option<Arc<dyn Relay>>,
}

impl Storage {
    /// The log of `namespace`.
    pub fn log(&self, namespace: &str) -> Option<&Arc<dyn EventLog>> {
        self.logs.iter().find(|log| log.namespace() == namespace)
    }
}
