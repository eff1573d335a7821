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
//! - **Manual ack**: one event at a time per consumer, redelivered after `redelivery`
//!   until acknowledged or delivered `redelivery_count` times.
//! - **Inbox subjects** (`_bus_.…`) live in memory only ([`inbox`]).
//!
//! Everything ends when the broker is shut down.

pub mod acks;
pub mod dedup;
pub mod inbox;
mod subscription;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;

use self::acks::Acks;
use self::dedup::Dedup;
use self::inbox::Inboxes;
use crate::event::{self, EventDraft, JsonLayout, PendingEvent, StoredEvent};
use crate::store::{ids, Log, StoreError};
use crate::subject::{Pattern, Subject};
use crate::timestamp::Timestamp;

/// Defaults of the reference server, used when a client leaves a parameter empty.
pub const DEFAULT_REDELIVERY: Duration = Duration::from_secs(5);
pub const DEFAULT_REDELIVERY_COUNT: i64 = 3;

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
    Storage(StoreError),
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    Oldest,
    Newest,
    /// Strictly after the event with this id.
    After(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    None,
    /// Stop-and-wait: redeliver after `redelivery`; give up after `max_deliveries`
    /// deliveries (`None`: never).
    Manual {
        redelivery: Duration,
        max_deliveries: Option<u32>,
    },
}

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
    /// deliveries.
    pub owner: Option<u32>,
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
}

pub struct Broker {
    logs: BTreeMap<String, Arc<Log>>,
    dedup: Dedup,
    inboxes: Inboxes,
    acks: Arc<Acks>,
    shutdown: watch::Sender<bool>,
    /// Events sent to subscribers since the server started, by namespace (inboxes under
    /// [`INBOX_NAMESPACE`]).
    delivered: BTreeMap<String, Arc<AtomicU64>>,
    /// Deliveries repeated because no ack came in time.
    redeliveries: Arc<AtomicU64>,
}

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
    /// A broker over open logs. Rebuilds the deduplication window from each log's newest
    /// events (blocking reads).
    pub fn new(logs: impl IntoIterator<Item = Arc<Log>>, config: &BrokerConfig) -> Broker {
        let logs: BTreeMap<String, Arc<Log>> = logs
            .into_iter()
            .map(|log| (log.namespace().to_owned(), log))
            .collect();
        let dedup = Dedup::new(config.dup_size, config.dup_ttl);
        if dedup.enabled() {
            for log in logs.values() {
                rebuild_dedup(log, &dedup);
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
            dedup,
            inboxes: Inboxes::default(),
            acks: Arc::new(Acks::default()),
            shutdown: watch::channel(false).0,
            delivered,
            redeliveries: Arc::default(),
        }
    }

    /// The open logs, by namespace.
    pub fn logs(&self) -> impl Iterator<Item = &Arc<Log>> {
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

    fn log(&self, namespace: &str) -> Result<&Arc<Log>, String> {
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
        let mut pending = Vec::with_capacity(batch.len());
        for event in &batch {
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
            pending.push(
                PendingEvent::new(&EventDraft {
                    subject: &event.subject,
                    trace_id: &event.trace_id,
                    key: &event.key,
                    response_subject: &event.response_subject,
                    payload: event.payload.as_deref(),
                    id: event.id.as_deref(),
                    created_at: event.created_at,
                })
                .map_err(|e| invalid(e.to_string()))?,
            );
        }

        if first_subject.is_inbox() {
            if is_batch {
                return Err(invalid(
                    "inbox subjects (_bus_.…) take one event at a time, not batches".into(),
                ));
            }
            return Ok(vec![self.publish_to_inbox(&first.subject, &pending[0])]);
        }
        let log = self.log(&namespace).map_err(invalid)?;

        let reservation = self
            .dedup
            .reserve(batch.iter().map(|e| (e.subject.as_str(), e.key.as_str())))
            .map_err(|key| {
                PublishError::Duplicate(format!(
                    "duplicate key {key:?}: an event with this key was already published to this subject"
                ))
            })?;
        match log.append(pending).await {
            Ok(appended) => Ok(appended
                .into_iter()
                .map(|a| Published {
                    id: a.id,
                    created_at: a.created_at,
                    index: a.position as i64,
                })
                .collect()),
            Err(e) => {
                self.dedup.release(reservation);
                Err(match e {
                    StoreError::DuplicateId(_) | StoreError::ReservedId(_) => {
                        PublishError::Duplicate(e.to_string())
                    }
                    other => PublishError::Storage(other),
                })
            }
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
    /// is reported as the stream's only delivery, an [`Delivery::Error`].
    pub fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription, String> {
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
        let log = Arc::clone(self.log(request.pattern.namespace())?);
        // "newest" means: what is published from now on.
        let start = match request.start {
            Start::Newest => subscription::From::Position(log.committed()),
            Start::Oldest => subscription::From::Position(0),
            Start::After(id) => subscription::From::After(id),
        };
        let stop_at = request.until_now.then(|| log.committed());
        let deliveries: Deliveries = match request.ack {
            AckMode::None => Box::pin(subscription::follow(
                log,
                request.pattern,
                start,
                stop_at,
                shutdown,
            )),
            AckMode::Manual {
                redelivery,
                max_deliveries,
            } => {
                let acks = self.acks.register(&consumer_id, namespace, request.owner);
                Box::pin(subscription::manual(
                    log,
                    request.pattern,
                    start,
                    stop_at,
                    subscription::Redelivery {
                        every: redelivery,
                        max_deliveries,
                        redeliveries: Arc::clone(&self.redeliveries),
                    },
                    acks,
                    shutdown,
                ))
            }
        };
        Ok(Subscription {
            consumer_id,
            deliveries: Box::pin(deliveries.inspect(count)),
        })
    }

    /// The namespace and owner of a connected manual-ack consumer.
    pub fn consumer(&self, consumer_id: &str) -> Option<(String, Option<u32>)> {
        self.acks.consumer(consumer_id)
    }

    /// Passes an acknowledgement to the consumer waiting for it (if it is connected).
    pub fn ack(&self, consumer_id: &str, event_id: &str) -> bool {
        self.acks.ack(consumer_id, event_id)
    }

    /// Ends every subscription.
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }
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
fn rebuild_dedup(log: &Log, dedup: &Dedup) {
    let end = log.committed();
    let mut keyed: Vec<(String, String, Timestamp)> = Vec::new();
    let scanned = log.scan_blocking(
        end.saturating_sub(DEDUP_REBUILD_EVENTS),
        |_, json, layout| {
            if let Some(entry) = keyed_entry(json, &layout) {
                keyed.push(entry);
            }
        },
    );
    if let Err(e) = scanned {
        tracing::warn!(namespace = log.namespace(), error = %e, "cannot rebuild the deduplication window from the log");
        return;
    }
    let now = Timestamp::now();
    let mut restored = HashMap::<String, usize>::new();
    for (subject, key, created_at) in keyed.into_iter().rev() {
        let age = Duration::from_nanos(
            now.unix_nanos()
                .saturating_sub(created_at.unix_nanos())
                .max(0) as u64,
        );
        if dedup.restore(&subject, key, age) {
            *restored.entry(subject).or_default() += 1;
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

/// (subject, key, created_at) of a stored event that has a key.
fn keyed_entry(json: &[u8], layout: &JsonLayout) -> Option<(String, String, Timestamp)> {
    let key: String = serde_json::from_slice(&json[layout.key.clone()?]).ok()?;
    // The subject's range is its text without quotes (subjects need no escapes).
    let subject = std::str::from_utf8(&json[layout.subject.clone()])
        .ok()?
        .to_owned();
    let created_at =
        Timestamp::parse(std::str::from_utf8(&json[layout.created_at.clone()]).ok()?).ok()?;
    Some((subject, key, created_at))
}
