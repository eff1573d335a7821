//! One namespace's log in its JetStream stream: appends (group commits as atomic batches
//! at claimed positions), ids, searches by time, retention as the stream's limits, and
//! the health of the connection. Reads go through [`super::reads`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use futures_util::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::connection::{
    body_at, direct_get, header_u64, open_bucket, stream_name, unavailable, REQUEST_TIMEOUT,
};
use super::follow;
use super::keys::Keys;
use super::reads::Reads;
use super::sealing::Sealing;
use crate::event::{self, JsonLayout, PendingEvent, StoredEvent};
use crate::metrics::{self, Histogram};
use crate::store::api::{
    Appended, BoxFuture, CommitTimings, ErrorKind, EventLog, KeyedEvent, LogStats, StorageError,
    StorageUsage,
};
use crate::store::cipher::Cipher;
use crate::store::error::StoreError;
use crate::store::ids;
use crate::timestamp::Timestamp;

/// Events committed together at most: appends queued behind one in flight are joined up
/// to this many (JetStream's limit on an atomic batch is 1,000 messages).
const MAX_GROUP_EVENTS: usize = 1000;
/// How long an append keeps trying when other writers (other nodes) keep getting in
/// before it (its expected last sequence was wrong) before it fails: long enough that
/// the busiest other node's queue drains, short of a client's timeout.
const APPEND_CONTENDED_FOR: Duration = Duration::from_secs(10);

/// How long an append waits for JetStream's acknowledgement before it asks the stream's
/// leader whether the events are there (an acknowledgement is lost when the server the
/// node is connected to goes away, or the stream's leader does).
const APPEND_ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// The stream metadata entry that holds the id generation.
const GENERATION_KEY: &str = "bus_generation";
/// The header with the time the log committed a message (Unix nanoseconds).
const COMMITTED_AT: &str = "Bus-Committed-At";

/// How long a read waits for the replicas of a stream to serve an event its leader holds
/// (any replica answers direct gets; one that was behind catches up within moments of a
/// leader change).
const LAGGING_REPLICA_WAIT: Duration = Duration::from_secs(5);

/// A namespace's log in a JetStream stream.
pub struct JetStreamLog {
    namespace: String,
    stream: String,
    /// Positions of the ids clients chose.
    client_ids: kv::Store,
    /// Deduplication keys claimed across writers (`None`: deduplication is off).
    keys: Option<Keys>,
    client: async_nats::Client,
    context: jetstream::Context,
    runtime: Handle,
    generation: u64,
    /// Appends waiting for their turn.
    queue: Mutex<VecDeque<Queued>>,
    /// Held by the append in flight, which claims the positions after the last it knows of.
    append: tokio::sync::Mutex<AppendState>,
    first: AtomicU64,
    closed: AtomicBool,
    /// The stream's limits as last set, so that retention updates them only on change.
    limits: Mutex<Option<(Option<Duration>, Option<u64>)>>,
    groups: AtomicU64,
    reads: Arc<Reads>,
    /// The task that learns what other writers append ([`super::follow`]).
    follower: JoinHandle<()>,
    /// Who this log is in its announcements of commits.
    writer: String,
    sealing: Sealing,
    group_events: Histogram,
    ack_micros: Histogram,
}

/// A group of events encoded for the stream.
struct Encoded {
    messages: Vec<(String, Bytes)>,
    appended: Vec<Appended>,
    events: Vec<StoredEvent>,
}

/// An append waiting to be committed, and where its answer goes.
struct Queued {
    batch: Vec<PendingEvent>,
    done: oneshot::Sender<Result<Vec<Appended>, StorageError>>,
}

struct AppendState {
    /// The next position: the stream's last sequence as far as this log knows.
    next: u64,
    /// The last creation time handed out, so that times never go back.
    last_created: Timestamp,
}

impl JetStreamLog {
    /// Opens the namespace's stream, creating it with `replicas` copies if it does not
    /// exist (events may be as large as the server's `max_payload` allows). With a
    /// `cipher`, events are sealed before they are sent, and the stream must be encrypted
    /// with the same key (or never written to). The newest `tail_bytes` of this node's
    /// appends are kept in memory for readers.
    pub async fn open(
        client: &async_nats::Client,
        context: &jetstream::Context,
        namespace: &str,
        replicas: usize,
        cipher: Option<&Cipher>,
        tail_bytes: usize,
        key_window: Option<Duration>,
    ) -> Result<JetStreamLog, StorageError> {
        let name = stream_name(namespace);
        let mut metadata = HashMap::from([(
            GENERATION_KEY.to_owned(),
            ids::generation_text(ids::random_generation()),
        )]);
        Sealing::add_key_check(cipher, &mut metadata)?;
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![namespace.to_owned(), format!("{namespace}.>")],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            allow_direct: true,
            allow_atomic_publish: true,
            metadata,
            ..Default::default()
        };
        let mut stream = match context.get_or_create_stream(config).await {
            Ok(stream) => stream,
            // Another node created it at the same moment, with a generation of its own
            // (JetStream refuses a second creation with another configuration): that
            // stream is the namespace's.
            Err(creating) => context
                .get_stream(&name)
                .await
                .map_err(|_| unavailable(&format!("opening stream {name}"), creating))?,
        };
        let mut info = stream
            .info()
            .await
            .map_err(|e| unavailable(&format!("reading stream {name}"), e))?
            .clone();
        if cipher.is_some()
            && !Sealing::is_encrypted(&info.config.metadata)
            && info.state.last_sequence == 0
        {
            // Never written to: it becomes encrypted.
            Sealing::add_key_check(cipher, &mut info.config.metadata)?;
            info = context
                .update_stream(info.config.clone())
                .await
                .map_err(|e| unavailable(&format!("encrypting stream {name}"), e))?;
        }
        Sealing::check(cipher, &name, &info.config.metadata)?;
        let generation = info
            .config
            .metadata
            .get(GENERATION_KEY)
            .and_then(|text| ids::parse_generation(text))
            .ok_or_else(|| {
                StorageError::new(
                    ErrorKind::Corrupt,
                    format!("stream {name} has no {GENERATION_KEY} in its metadata: it was not created by bus"),
                )
            })?;
        let next = info.state.last_sequence;
        let first = info.state.first_sequence.saturating_sub(1).min(next);
        let sealing = Sealing::new(cipher.cloned(), generation, &name);
        let reads = Arc::new(Reads::new(
            client.clone(),
            &name,
            sealing.clone(),
            next,
            tail_bytes,
        ));
        let writer = crate::random::token(16);
        let follower = follow::start(
            client.clone(),
            context.clone(),
            namespace,
            name.clone(),
            writer.clone(),
            reads.clone(),
        );
        let client_ids = open_bucket(
            context,
            &format!("BUS_IDS_{namespace}"),
            replicas,
            Duration::ZERO,
            stream::StorageType::File,
        )
        .await?;
        let keys = match key_window {
            Some(window) => {
                // In memory (replicated): a claim is an arbiter between appends in flight,
                // not a record; the events themselves are the record.
                let bucket = open_bucket(
                    context,
                    &format!("BUS_KEYS_{namespace}"),
                    replicas,
                    window,
                    stream::StorageType::Memory,
                )
                .await?;
                Some(Keys::new(bucket, client.clone(), &name, sealing.clone()))
            }
            None => None,
        };
        Ok(JetStreamLog {
            namespace: namespace.to_owned(),
            stream: name,
            client_ids,
            keys,
            client: client.clone(),
            context: context.clone(),
            runtime: Handle::current(),
            generation,
            queue: Mutex::new(VecDeque::new()),
            append: tokio::sync::Mutex::new(AppendState {
                next,
                last_created: Timestamp::from_unix_nanos(i64::MIN),
            }),
            first: AtomicU64::new(first),
            closed: AtomicBool::new(false),
            limits: Mutex::new(None),
            groups: AtomicU64::new(0),
            reads,
            follower,
            writer,
            sealing,
            group_events: Histogram::new(metrics::GROUP_BOUNDS),
            ack_micros: Histogram::new(metrics::DURATION_BOUNDS_MICROS),
        })
    }

    /// How this log's messages are sealed and opened.
    pub fn sealing(&self) -> &Sealing {
        &self.sealing
    }

    fn closed_error(&self) -> StorageError {
        StoreError::Closed(self.namespace.clone()).into()
    }

    /// Queues the batch, and commits what is queued once this append's turn comes:
    /// appends that arrive while one is in flight are committed together, as one atomic
    /// batch (a group commit, as the file store's writer does).
    async fn append_batch(&self, batch: Vec<PendingEvent>) -> Result<Vec<Appended>, StorageError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if batch.len() > MAX_GROUP_EVENTS {
            return Err(StorageError::new(
                ErrorKind::TooLarge,
                format!(
                    "a batch of {} events is more than JetStream stores as one atomic batch ({MAX_GROUP_EVENTS} at most): send it in smaller batches",
                    batch.len()
                ),
            ));
        }
        let (done, answer) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(Queued { batch, done });
        // Until answered, the caller takes turns at committing what is queued (its own
        // append among it, or older ones first); an append in flight when this one was
        // queued may answer it meanwhile. Each turn commits at least one append.
        let mut answer = std::pin::pin!(answer);
        loop {
            tokio::select! {
                answered = &mut answer => {
                    return answered.unwrap_or_else(|_| {
                        Err(StorageError::new(
                            ErrorKind::Internal,
                            "the append was dropped before it was committed",
                        ))
                    });
                }
                mut state = self.append.lock() => {
                    let group = self.take_group();
                    if !group.is_empty() {
                        self.commit_group(&mut state, group).await;
                    }
                }
            }
        }
    }

    /// The appends queued, oldest first, up to [`MAX_GROUP_EVENTS`] events (at least one
    /// append); those whose caller is gone are dropped unstored.
    fn take_group(&self) -> Vec<Queued> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut group = Vec::new();
        let mut events = 0;
        while let Some(front) = queue.front() {
            if !group.is_empty() && events + front.batch.len() > MAX_GROUP_EVENTS {
                break;
            }
            let Some(queued) = queue.pop_front() else {
                break;
            };
            if queued.done.is_closed() {
                continue;
            }
            events += queued.batch.len();
            group.push(queued);
        }
        group
    }

    /// Commits a group of appends as one, answering each; an append whose client ids or
    /// deduplication keys are refused is answered alone and left out.
    async fn commit_group(&self, state: &mut AppendState, group: Vec<Queued>) {
        if self.closed.load(Ordering::Acquire) {
            for queued in group {
                let _ = queued.done.send(Err(self.closed_error()));
            }
            return;
        }
        let mut checked = Vec::with_capacity(group.len());
        let mut ids_in_group = std::collections::HashSet::new();
        for queued in group {
            let ids = match self.check_client_ids(&queued.batch).await {
                Ok(()) => queued
                    .batch
                    .iter()
                    .filter_map(PendingEvent::client_id)
                    .find(|id| ids_in_group.contains(*id))
                    .map_or(Ok(()), |id| {
                        Err(StoreError::DuplicateId(id.to_owned()).into())
                    }),
                Err(e) => Err(e),
            };
            match ids {
                Ok(()) => {
                    ids_in_group.extend(
                        queued
                            .batch
                            .iter()
                            .filter_map(PendingEvent::client_id)
                            .map(str::to_owned),
                    );
                    checked.push(queued);
                }
                Err(e) => {
                    let _ = queued.done.send(Err(e));
                }
            }
        }
        // Keys are claimed across writers last, once nothing else refuses an append, and
        // for all the group's appends at once.
        let claimed = match &self.keys {
            Some(keys) => join_all(checked.iter().map(|queued| keys.claim(&queued.batch))).await,
            None => checked.iter().map(|_| Ok(Vec::new())).collect(),
        };
        let mut accepted = Vec::with_capacity(checked.len());
        for (queued, claims) in checked.into_iter().zip(claimed) {
            match claims {
                Ok(claims) => accepted.push((queued, claims)),
                Err(e) => {
                    let _ = queued.done.send(Err(e));
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        let events: Vec<&PendingEvent> = accepted
            .iter()
            .flat_map(|(queued, _)| queued.batch.iter())
            .collect();
        match self.commit(state, &events).await {
            Ok(appended) => {
                let mut appended = appended.into_iter();
                let mut answers = Vec::with_capacity(accepted.len());
                let mut stored = Vec::new();
                for (queued, claims) in accepted {
                    let part: Vec<Appended> = appended.by_ref().take(queued.batch.len()).collect();
                    if !claims.is_empty() {
                        let positions: Vec<u64> = queued
                            .batch
                            .iter()
                            .zip(&part)
                            .filter(|(pending, _)| pending.encoded_key().is_some())
                            .map(|(_, appended)| appended.position)
                            .collect();
                        stored.push((claims, positions));
                    }
                    answers.push((queued.done, part));
                }
                if let Some(keys) = &self.keys {
                    join_all(stored.into_iter().map(|(claims, positions)| async move {
                        keys.stored(claims, &positions).await
                    }))
                    .await;
                }
                for (done, part) in answers {
                    let _ = done.send(Ok(part));
                }
            }
            Err(e) => {
                if let Some(keys) = &self.keys {
                    join_all(
                        accepted
                            .iter_mut()
                            .map(|(_, claims)| keys.release(std::mem::take(claims))),
                    )
                    .await;
                }
                for (queued, _) in accepted {
                    let _ = queued.done.send(Err(e.clone()));
                }
            }
        }
    }

    /// Appends the events as one atomic batch after the positions this log knows of.
    async fn commit(
        &self,
        state: &mut AppendState,
        batch: &[&PendingEvent],
    ) -> Result<Vec<Appended>, StorageError> {
        let contended_until = tokio::time::Instant::now() + APPEND_CONTENDED_FOR;
        for lost in 0u64.. {
            if lost > 0 && tokio::time::Instant::now() >= contended_until {
                break;
            }
            if lost >= 2 {
                // Writers that keep meeting in lockstep are set apart by a random pause of
                // up to a millisecond.
                tokio::time::sleep(Duration::from_micros(crate::random::number() % 1000)).await;
            }
            // Nothing is sent while the connection is down: the client would hold it and
            // send it once reconnected, storing events whose publisher was told they were
            // not.
            if let Some(reason) = self.halted() {
                return Err(StorageError::new(ErrorKind::Unavailable, reason));
            }
            // What the follower saw other writers append is not claimed again.
            state.next = state.next.max(self.reads.committed());
            let created = Timestamp::now().max(state.last_created);
            let Encoded {
                messages,
                appended,
                events,
            } = self.encode(batch, state.next, created)?;
            self.reserve_client_ids(batch, &appended).await?;
            let started = Instant::now();
            match self.publish(messages, state.next, created).await {
                Ok(()) => {
                    self.ack_micros
                        .observe(started.elapsed().as_micros().min(u64::MAX as u128) as u64);
                    self.committed_group(state, created, events).await;
                    return Ok(appended);
                }
                Err(Publish::WrongLastSequence(last)) => {
                    // Another writer appended since: start after what is there now (as
                    // JetStream's refusal says, or its stream info).
                    state.next = match last {
                        Some(last) if last >= state.next => last,
                        _ => self.last_sequence().await?,
                    };
                    self.reads.learn_end(state.next);
                }
                Err(Publish::Failed(error)) => {
                    // The append may have been stored with only its acknowledgement lost:
                    // find out, so that a refusal never hides stored events.
                    if self.stored_at(state.next, &events[0].json()).await == Some(true) {
                        self.committed_group(state, created, events).await;
                        return Ok(appended);
                    }
                    if let Ok(last) = self.last_sequence().await {
                        state.next = last;
                        self.reads.learn_end(last);
                    }
                    return Err(error);
                }
            }
        }
        Err(StorageError::new(
            ErrorKind::Unavailable,
            format!(
                "stream {}: other writers kept appending; the events were not stored",
                self.stream
            ),
        ))
    }

    /// Counts a group of `events` committed at `created`, keeps them in the tail, moves
    /// the watermark and announces the new end to other nodes.
    async fn committed_group(
        &self,
        state: &mut AppendState,
        created: Timestamp,
        events: Vec<StoredEvent>,
    ) {
        self.groups.fetch_add(1, Ordering::Relaxed);
        self.group_events.observe(events.len() as u64);
        state.last_created = created;
        state.next += events.len() as u64;
        self.reads.keep(events);
        // Best effort: other nodes also check the stream's end every second.
        let _ = self
            .client
            .publish(
                follow::subject(&self.namespace),
                follow::announcement(&self.writer, state.next),
            )
            .await;
    }

    /// The events at positions from `next`: as stream messages, what each was given, and
    /// as stored events for the tail.
    fn encode(
        &self,
        batch: &[&PendingEvent],
        next: u64,
        created: Timestamp,
    ) -> Result<Encoded, StorageError> {
        let mut encoded = Encoded {
            messages: Vec::with_capacity(batch.len()),
            appended: Vec::with_capacity(batch.len()),
            events: Vec::with_capacity(batch.len()),
        };
        // One buffer for the group's frames; a clear message body is a view of its frame.
        let mut frames = BytesMut::new();
        let mut json = Vec::new();
        for (offset, pending) in batch.iter().enumerate() {
            let position = next + offset as u64;
            let id = match pending.client_id() {
                Some(id) => id.to_owned(),
                None => ids::text(self.generation, position),
            };
            let created_at = pending.created_at.unwrap_or(created);
            json.clear();
            let layout = pending.write_json(&mut json, &id, &created_at.format(), position as i64);
            frames.reserve(event::sse_frame_len(&id, &json));
            event::push_sse_frame(&mut frames, &id, &json);
            let stored = StoredEvent::new(position, frames.split().freeze(), &layout);
            let body = self.sealing.seal(stored.json())?;
            encoded.messages.push((stored.subject().to_owned(), body));
            encoded.events.push(stored);
            encoded.appended.push(Appended {
                position,
                id,
                created_at,
            });
        }
        Ok(encoded)
    }

    /// Publishes the messages as one append expected right after position `next - 1`.
    async fn publish(
        &self,
        messages: Vec<(String, Bytes)>,
        next: u64,
        committed_at: Timestamp,
    ) -> Result<(), Publish> {
        let count = messages.len();
        let last = count - 1;
        let batch_id = crate::random::token(22);
        let mut ack = None;
        for (n, (subject, body)) in messages.into_iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(COMMITTED_AT, committed_at.unix_nanos().to_string().as_str());
            if n == 0 {
                headers.insert("Nats-Expected-Last-Sequence", next.to_string().as_str());
            }
            if count > 1 {
                headers.insert("Nats-Batch-Id", batch_id.as_str());
                headers.insert("Nats-Batch-Sequence", (n + 1).to_string().as_str());
                if n == last {
                    headers.insert("Nats-Batch-Commit", "1");
                }
            }
            if n == last {
                ack = Some(
                    self.context
                        .publish_with_headers(subject, headers, body)
                        .await
                        .map_err(publish_failed)?,
                );
            } else {
                // The messages before the commit get no answer of their own: the commit's
                // acknowledgement (or error) is the batch's.
                self.client
                    .publish_with_headers(subject, headers, body)
                    .await
                    .map_err(|e| Publish::Failed(unavailable("publishing", e)))?;
            }
        }
        let Some(ack) = ack else {
            return Ok(());
        };
        let ack = tokio::time::timeout(APPEND_ACK_TIMEOUT, ack)
            .await
            .map_err(|_| {
                Publish::Failed(unavailable(
                    &format!("appending to stream {}", self.stream),
                    format!("no acknowledgement within {APPEND_ACK_TIMEOUT:?}"),
                ))
            })?
            .map_err(publish_failed)?;
        let expected = next + count as u64;
        if ack.sequence != expected {
            return Err(Publish::Failed(StorageError::new(
                ErrorKind::Internal,
                format!(
                    "stream {}: the append was stored at sequence {} instead of {expected}",
                    self.stream, ack.sequence
                ),
            )));
        }
        Ok(())
    }

    /// Refuses ids chosen by clients that the namespace has (or that have the form of its
    /// own ids, or that repeat within the batch).
    async fn check_client_ids(&self, batch: &[PendingEvent]) -> Result<(), StorageError> {
        let mut seen = std::collections::HashSet::new();
        for id in batch.iter().filter_map(PendingEvent::client_id) {
            if ids::decode(id).is_some_and(|(generation, _)| generation == self.generation) {
                return Err(StoreError::ReservedId(id.to_owned()).into());
            }
            if !seen.insert(id) || self.find_client_id(id).await?.is_some() {
                return Err(StoreError::DuplicateId(id.to_owned()).into());
            }
        }
        Ok(())
    }

    /// Puts the positions of the batch's client ids in the index, before the append.
    async fn reserve_client_ids(
        &self,
        batch: &[&PendingEvent],
        appended: &[Appended],
    ) -> Result<(), StorageError> {
        for (pending, appended) in batch.iter().zip(appended) {
            if pending.client_id().is_some() {
                self.client_ids
                    .put(
                        id_key(&appended.id),
                        Bytes::from(appended.position.to_string()),
                    )
                    .await
                    .map_err(|e| unavailable(&format!("indexing event id {}", appended.id), e))?;
            }
        }
        Ok(())
    }

    /// The position of the event with this client-chosen id, checked against the event.
    async fn find_client_id(&self, id: &str) -> Result<Option<u64>, StorageError> {
        let entry = self
            .client_ids
            .get(id_key(id))
            .await
            .map_err(|e| unavailable(&format!("looking up event id {id}"), e))?;
        let Some(position) = entry
            .and_then(|bytes| std::str::from_utf8(&bytes).ok()?.parse::<u64>().ok())
            .filter(|&position| position < self.committed())
        else {
            return Ok(None);
        };
        Ok(self.holds(position, id).await?.then_some(position))
    }

    /// Whether the event stored at `position` is the one with `id`.
    async fn holds(&self, position: u64, id: &str) -> Result<bool, StorageError> {
        let Some(body) = body_at(&self.client, &self.stream, position).await? else {
            return Ok(false);
        };
        let json = self.sealing.open(body)?;
        Ok(event::id_of_json(&json) == Some(id))
    }

    /// Whether the event at `position` is `json`, once the connection is up to tell
    /// (within a few seconds); `None` when it cannot be told. A publish sent before a
    /// failure reaches JetStream before a request sent after it on the same connection, so
    /// a position found empty stays empty for that publish. The whole event is compared,
    /// not its id: every node gives the event at a position the same id, so another
    /// node's event there has it too.
    async fn stored_at(&self, position: u64, json: &[u8]) -> Option<bool> {
        let deadline = tokio::time::Instant::now() + 2 * REQUEST_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if self.halted().is_none() {
                if let Ok(stored) = self.leader_message(position).await {
                    return match stored {
                        None => Some(false),
                        Some(body) => self.sealing.open(body).ok().map(|stored| stored == json),
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// The stream, for requests its leader answers (no request is made to get it).
    async fn stream_handle(&self) -> Result<stream::Stream<()>, StorageError> {
        self.context
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| unavailable(&format!("reading stream {}", self.stream), e))
    }

    /// The body of the message at `position` as the stream's leader has it (direct gets,
    /// which any replica answers, may come from one that is behind); `None` if it has
    /// none.
    async fn leader_message(&self, position: u64) -> Result<Option<Bytes>, StorageError> {
        use jetstream::stream::RawMessageErrorKind;
        match self
            .stream_handle()
            .await?
            .get_raw_message(position + 1)
            .await
        {
            Ok(message) => Ok(Some(message.payload)),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(
                &format!("reading position {position} of stream {}", self.stream),
                e,
            )),
        }
    }

    /// The stream's state as its leader has it, with the sequences inside it that hold no
    /// message.
    async fn stream_state_with_gaps(&self) -> Result<stream::State, StorageError> {
        self.stream_handle()
            .await?
            .info_builder()
            .with_deleted(true)
            .fetch()
            .await
            .map(|info| info.info.state)
            .map_err(|e| unavailable(&format!("reading stream {}", self.stream), e))
    }

    async fn stream_info(&self) -> Result<stream::Info, StorageError> {
        self.context
            .get_stream(&self.stream)
            .await
            .map(|stream| stream.cached_info().clone())
            .map_err(|e| unavailable(&format!("reading stream {}", self.stream), e))
    }

    async fn last_sequence(&self) -> Result<u64, StorageError> {
        Ok(self.stream_info().await?.state.last_sequence)
    }

    fn block_on<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }
}

enum Publish {
    /// Another writer appended first; the stream's last sequence, if the refusal said.
    WrongLastSequence(Option<u64>),
    Failed(StorageError),
}

/// The stream's last sequence in JetStream's refusal of an append ("wrong last sequence:
/// 1234 (code 400, error code 10071)").
fn last_sequence_in(refusal: &str) -> Option<u64> {
    let (_, after) = refusal.split_once("last sequence:")?;
    let digits = after.trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

fn publish_failed(error: jetstream::context::PublishError) -> Publish {
    use jetstream::context::PublishErrorKind;
    match error.kind() {
        PublishErrorKind::WrongLastSequence => Publish::WrongLastSequence(
            std::error::Error::source(&error)
                .and_then(|cause| last_sequence_in(&cause.to_string())),
        ),
        PublishErrorKind::MaxPayloadExceeded => Publish::Failed(StorageError::new(
            ErrorKind::TooLarge,
            format!("the event is larger than NATS takes (its max_payload): {error}"),
        )),
        _ => {
            let text = error.to_string();
            // JetStream refuses appends to a stream at its byte limit with "discard new",
            // and any append when its storage is full.
            let kind = if text.contains("insufficient resources")
                || text.contains("maximum bytes exceeded")
            {
                ErrorKind::Full
            } else {
                ErrorKind::Unavailable
            };
            Publish::Failed(StorageError::new(kind, format!("JetStream: {text}")))
        }
    }
}

/// An event id as a bucket key: letters, digits, `_` and `-` as they are, any other byte
/// as `=` and two hex digits (keys take no `~` or `:`, and dots separate their tokens).
fn id_key(id: &str) -> String {
    let mut key = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            key.push(byte as char);
        } else {
            key.push_str(&format!("={byte:02X}"));
        }
    }
    key
}

/// The event's subject and key if it has a key of at most `max_key_len` bytes.
fn keyed_event(json: &[u8], committed_at: Timestamp, max_key_len: usize) -> Option<KeyedEvent> {
    let layout = JsonLayout::parse(json)?;
    Some(KeyedEvent {
        key: layout.key_within(json, max_key_len)?,
        subject: String::from_utf8_lossy(&json[layout.subject]).into_owned(),
        committed_at,
    })
}

/// When the log committed a message: its own time (the same as a server-dated event's
/// `created_at`), else the stream's.
fn committed_at(message: &async_nats::Message) -> Option<Timestamp> {
    let headers = message.headers.as_ref()?;
    match headers.get(COMMITTED_AT) {
        Some(nanos) => nanos.as_str().parse().ok().map(Timestamp::from_unix_nanos),
        None => Timestamp::parse(headers.get("Nats-Time-Stamp")?.as_str()).ok(),
    }
}

impl EventLog for JetStreamLog {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn append(
        &self,
        batch: Vec<PendingEvent>,
    ) -> BoxFuture<'_, Result<Vec<Appended>, StorageError>> {
        Box::pin(self.append_batch(batch))
    }

    fn read(
        &self,
        from: u64,
        max_events: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEvent>, StorageError>> {
        Box::pin(async move {
            let committed = self.committed();
            if from >= committed || max_events == 0 {
                return Ok(Vec::new());
            }
            let first = self.first_position();
            if from < first {
                return Err(StorageError::new(
                    ErrorKind::NotFound,
                    format!("position {from} was removed by retention"),
                ));
            }
            let lagging_until = tokio::time::Instant::now() + LAGGING_REPLICA_WAIT;
            let mut from = from;
            while from < committed {
                let events = self.reads.read(from, committed, max_events).await?;
                if events.first().is_some_and(|event| event.position() == from) {
                    return Ok(events);
                }
                // `from` did not come back: JetStream's limits removed it since the log
                // last looked (readers learn the new start from `first_position`); or the
                // stream has no message there (a clustered stream skips the sequence of an
                // append refused after it was proposed, and lists it as deleted); or the
                // replica that answered the direct get is behind (just after a leader
                // change). The leader's stream info tells which.
                let state = self.stream_state_with_gaps().await?;
                let first = state.first_sequence.saturating_sub(1);
                if from < first {
                    self.first.fetch_max(first.min(committed), Ordering::AcqRel);
                    return Err(StorageError::new(
                        ErrorKind::NotFound,
                        format!("position {from} was removed by retention"),
                    ));
                }
                if state
                    .deleted
                    .as_ref()
                    .is_some_and(|gaps| gaps.contains(&(from + 1)))
                {
                    from += 1;
                    continue;
                }
                if tokio::time::Instant::now() >= lagging_until {
                    return Err(StorageError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "stream {}: position {from} is stored, but no replica served it within {LAGGING_REPLICA_WAIT:?}",
                            self.stream
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Vec::new())
        })
    }

    fn committed(&self) -> u64 {
        self.reads.committed()
    }

    fn watch_committed(&self) -> watch::Receiver<u64> {
        self.reads.watch_committed()
    }

    fn watch_outage(&self) -> watch::Receiver<Option<String>> {
        self.reads.watch_outage()
    }

    fn first_position(&self) -> u64 {
        self.first.load(Ordering::Acquire)
    }

    fn find_id<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<u64>, StorageError>> {
        Box::pin(async move {
            match ids::decode(id) {
                Some((generation, position)) if generation == self.generation => {
                    Ok((position < self.committed()).then_some(position))
                }
                _ if id.is_empty() => Ok(None),
                _ => self.find_client_id(id).await,
            }
        })
    }

    fn first_committed_at_or_after(
        &self,
        time: Timestamp,
    ) -> BoxFuture<'_, Result<u64, StorageError>> {
        // A binary search over positions by the log's own commit times, which never go
        // back along the stream (one direct get a step).
        Box::pin(async move {
            let (mut low, mut high) = (self.first_position(), self.committed());
            while low < high {
                let middle = low + (high - low) / 2;
                let messages = direct_get(
                    &self.client,
                    &self.stream,
                    serde_json::json!({ "seq": middle + 1 }),
                )
                .await?;
                let before = match messages.first() {
                    Some(m) if header_u64(m, "Nats-Sequence") == Some(middle + 1) => {
                        committed_at(m).is_some_and(|at| at < time)
                    }
                    // Removed by the limits meanwhile: older than anything kept.
                    _ => true,
                };
                if before {
                    low = middle + 1;
                } else {
                    high = middle;
                }
            }
            Ok(low)
        })
    }

    fn visit_recent_keys(
        &self,
        events: u64,
        max_key_len: usize,
        visit: &mut dyn FnMut(KeyedEvent),
    ) -> Result<(), StorageError> {
        let end = self.committed();
        let next = end.saturating_sub(events).max(self.first_position());
        if next >= end {
            return Ok(());
        }
        // One pass of a consumer rather than direct gets: JetStream writes each message
        // out as it stored it, where a direct get generates a set of headers per message
        // (most of the time of a direct get with headers, measured).
        self.block_on(async {
            let failed = |e: &dyn std::fmt::Display| {
                unavailable(&format!("reading the recent keys of {}", self.stream), e)
            };
            let stream = self
                .context
                .get_stream(&self.stream)
                .await
                .map_err(|e| failed(&e))?;
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: next + 1,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| failed(&e))?;
            let name = consumer.cached_info().name.clone();
            let visited = async {
                let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
                loop {
                    let message = match tokio::time::timeout(REQUEST_TIMEOUT, messages.next()).await
                    {
                        Ok(Some(Ok(message))) => message,
                        Ok(Some(Err(e))) => return Err(failed(&e)),
                        Ok(None) => return Err(failed(&"the consumer ended")),
                        Err(_) => {
                            // Nothing comes when retention removed the rest meanwhile.
                            let first = self.stream_info().await?.state.first_sequence;
                            return if first > end {
                                Ok(())
                            } else {
                                Err(failed(&"no message in time"))
                            };
                        }
                    };
                    let info = message.info().map_err(|e| failed(&e))?;
                    let position = info.stream_sequence.saturating_sub(1);
                    let stored_at = Timestamp::from_unix_nanos(
                        i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
                    );
                    if position >= end {
                        return Ok(());
                    }
                    let committed = committed_at(&message.message).unwrap_or(stored_at);
                    let json = self.sealing.open(message.message.payload.clone())?;
                    if let Some(keyed) = keyed_event(&json, committed, max_key_len) {
                        visit(keyed);
                    }
                    if position + 1 >= end {
                        return Ok(());
                    }
                }
            }
            .await;
            // Gone at once rather than when JetStream finds it idle.
            let _ = stream.delete_consumer(&name).await;
            visited
        })
    }

    fn forget_keys(&self, keys: Vec<(String, String)>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(claimed) = &self.keys {
                claimed.forget(keys).await;
            }
        })
    }

    fn halted(&self) -> Option<String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => None,
            _ => Some(format!(
                "the connection to NATS is down: stream {} cannot take events until it is back",
                self.stream
            )),
        }
    }

    fn stats(&self) -> LogStats {
        LogStats {
            events: self.committed().saturating_sub(self.first_position()),
            groups: self.groups.load(Ordering::Relaxed),
            syncs: 0,
            disk_reads: self.reads.fetches(),
        }
    }

    fn commit_timings(&self) -> CommitTimings<'_> {
        CommitTimings {
            group_events: &self.group_events,
            sync_micros: &self.ack_micros,
        }
    }

    fn usage(&self) -> Result<StorageUsage, StorageError> {
        let state = self.block_on(self.stream_info())?.state;
        Ok(StorageUsage {
            // The stream's count: a sequence skipped by a refused append holds nothing.
            events: state.messages,
            bytes: state.bytes,
            segments: None,
        })
    }

    fn enforce_retention(
        &self,
        max_age: Option<Duration>,
        max_bytes: Option<u64>,
    ) -> Result<Vec<(u64, u64)>, StorageError> {
        self.block_on(async {
            let wanted = (max_age, max_bytes);
            let set = *self.limits.lock().unwrap_or_else(|p| p.into_inner());
            if set != Some(wanted) {
                // JetStream enforces the limits itself; the log sets them on the stream.
                let mut config = self.stream_info().await?.config;
                config.max_age = max_age.unwrap_or(Duration::ZERO);
                // JetStream wants its duplicate window (unused by bus) within the age limit.
                if let Some(age) = max_age.filter(|age| !age.is_zero()) {
                    config.duplicate_window = config.duplicate_window.min(age);
                }
                config.max_bytes = max_bytes.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
                self.context.update_stream(config).await.map_err(|e| {
                    unavailable(&format!("setting the limits of {}", self.stream), e)
                })?;
                *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = Some(wanted);
            }
            let info = self.stream_info().await?;
            let first = info
                .state
                .first_sequence
                .saturating_sub(1)
                .min(info.state.last_sequence);
            let before = self.first.fetch_max(first, Ordering::AcqRel);
            Ok(if first > before {
                vec![(before, first - before)]
            } else {
                Vec::new()
            })
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            // Waits for an append in flight, and takes none after it.
            let _state = self.append.lock().await;
            self.closed.store(true, Ordering::Release);
            self.follower.abort();
            self.client
                .flush()
                .await
                .map_err(|e| unavailable("flushing the connection", e))
        })
    }
}

impl Drop for JetStreamLog {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::last_sequence_in;

    #[test]
    fn a_refused_append_says_the_last_sequence() {
        assert_eq!(
            last_sequence_in("wrong last sequence: 1234 (code 400, error code 10071)"),
            Some(1234)
        );
        assert_eq!(last_sequence_in("wrong last sequence: 7"), Some(7));
        assert_eq!(last_sequence_in("wrong last sequence"), None);
        assert_eq!(
            last_sequence_in("unknown (code 400, error code 10071)"),
            None
        );
    }
}
