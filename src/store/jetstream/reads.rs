//! Reading a JetStream log, shared by all its readers on a node.
//!
//! - **The watermark**: how far the log is known to be committed, moved by this node's
//!   appends and by what [`super::follow`] learns of other writers' appends.
//! - **The tail**: the events this node committed last, kept in memory (as the file
//!   store's tail) before the watermark moves past them, so live subscribers of a
//!   namespace — one or ten thousand — read them from memory and never ask JetStream.
//!   What other nodes append is fetched once per node, as a run.
//! - **Runs**: older events are fetched in runs of a few thousand by one direct get
//!   without headers (the position is the `index` every event's JSON ends with; headers
//!   would cost JetStream more than the events themselves), and kept in a bounded cache,
//!   so readers of the same history share one fetch ([`Reads::read`] joins a fetch in
//!   flight instead of starting another).
//! - **Read-ahead**: when a reader takes from a run, the run after it is fetched in the
//!   background, so a replay does not wait for a round trip per run.
//!
//! No JetStream consumer is created for reading: the number of subscribers costs memory on
//! the node, not state in JetStream.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::watch;

use super::connection::direct_get;
use super::sealing::Sealing;
use crate::event::{self, JsonLayout, StoredEvent};
use crate::store::api::{ErrorKind, StorageError};
use crate::store::tail::Tail;

/// Events a read hands out stop after about this many bytes, as on the file store.
const READ_BYTES: usize = 256 << 10;
/// A run is at most this many events…
const RUN_EVENTS: usize = 4096;
/// …and about this many bytes of messages (at least one message, however large).
const RUN_BYTES: usize = 1 << 20;
/// Bytes of fetched runs kept per log (the tail has a budget of its own).
const CACHE_BYTES: usize = 8 << 20;

/// Events of a log from `start`: those JetStream had from there when fetched, in order.
struct Run {
    events: Vec<StoredEvent>,
    /// Where the next run starts: after the last event, or `start` if there was none.
    end: u64,
    bytes: usize,
}

impl Run {
    /// The events from `from` below `until`: at most `max`, and about [`READ_BYTES`].
    fn slice(&self, from: u64, until: u64, max: usize) -> Vec<StoredEvent> {
        let first = self.events.partition_point(|e| e.position() < from);
        let mut bytes = 0;
        self.events[first..]
            .iter()
            .take_while(|e| e.position() < until)
            .take(max)
            .take_while(|e| {
                let fits = bytes == 0 || bytes + e.sse_frame().len() <= READ_BYTES;
                bytes += e.sse_frame().len();
                fits
            })
            .cloned()
            .collect()
    }
}

type Fetch = Shared<BoxFuture<'static, Result<Arc<Run>, StorageError>>>;

struct Cache {
    tail: Tail,
    /// Fetched runs by the position they were fetched from.
    runs: BTreeMap<u64, Arc<Run>>,
    /// The runs' starts, oldest fetch first (the order they leave in).
    order: VecDeque<u64>,
    bytes: usize,
    /// Fetches in flight, by start: a reader of the same run waits for it.
    fetching: HashMap<u64, Fetch>,
}

impl Cache {
    /// The run holding `from`, if any.
    fn run_at(&self, from: u64) -> Option<Arc<Run>> {
        let (_, run) = self.runs.range(..=from).next_back()?;
        (from < run.end).then(|| run.clone())
    }

    fn insert(&mut self, start: u64, run: Arc<Run>) {
        if let Some(old) = self.runs.insert(start, run.clone()) {
            self.bytes -= old.bytes;
            self.order.retain(|&s| s != start);
        }
        self.bytes += run.bytes;
        self.order.push_back(start);
        while self.bytes > CACHE_BYTES && self.order.len() > 1 {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(old) = self.runs.remove(&oldest) {
                self.bytes -= old.bytes;
            }
        }
    }
}

/// The reads of one log.
pub struct Reads {
    client: async_nats::Client,
    stream: String,
    sealing: Sealing,
    cache: Arc<Mutex<Cache>>,
    fetches: Arc<std::sync::atomic::AtomicU64>,
    watermark: watch::Sender<u64>,
    /// Why JetStream is out of reach, while it is.
    outage: watch::Sender<Option<String>>,
}

impl Reads {
    /// Reads of `stream`, whose next position is `next`, keeping `tail_bytes` of this
    /// node's appends in memory.
    pub fn new(
        client: async_nats::Client,
        stream: &str,
        sealing: Sealing,
        next: u64,
        tail_bytes: usize,
    ) -> Reads {
        Reads {
            client,
            stream: stream.to_owned(),
            sealing,
            cache: Arc::new(Mutex::new(Cache {
                tail: Tail::new(next, tail_bytes),
                runs: BTreeMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                fetching: HashMap::new(),
            })),
            fetches: Arc::default(),
            watermark: watch::Sender::new(next),
            outage: watch::Sender::new(None),
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a group of events this node committed, then moves the watermark past them.
    /// A group that does not follow the tail (other writers appended in between) starts
    /// it anew.
    pub fn keep(&self, events: Vec<StoredEvent>) {
        let (Some(first), Some(end)) = (
            events.first().map(StoredEvent::position),
            events.last().map(|e| e.position() + 1),
        ) else {
            return;
        };
        {
            let mut cache = self.cache();
            if first != cache.tail.end() {
                cache.tail = Tail::new(first, cache.tail.max_bytes());
            }
            cache.tail.extend(events);
        }
        self.learn_end(end);
    }

    /// Moves the watermark up to `end`, a stream end just learned (never down).
    pub fn learn_end(&self, end: u64) {
        self.watermark.send_if_modified(|w| {
            let moved = *w < end;
            *w = (*w).max(end);
            moved
        });
    }

    /// The committed watermark: the position after the last event known to be stored.
    pub fn committed(&self) -> u64 {
        *self.watermark.borrow()
    }

    pub fn watch_committed(&self) -> watch::Receiver<u64> {
        self.watermark.subscribe()
    }

    /// Records whether JetStream is out of reach (and why).
    pub fn set_outage(&self, why: Option<String>) {
        self.outage.send_if_modified(|now| {
            let changed = *now != why;
            *now = why;
            changed
        });
    }

    pub fn watch_outage(&self) -> watch::Receiver<Option<String>> {
        self.outage.subscribe()
    }

    /// Direct gets of runs so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Up to `max` events from `from`, below `until` (the committed watermark), as JetStream
    /// has them: the first may be after `from` if the stream's limits removed it.
    pub async fn read(
        &self,
        from: u64,
        until: u64,
        max: usize,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        let fetch = {
            let mut cache = self.cache();
            if let Some(events) = cache.tail.read(from, until, max, READ_BYTES) {
                if !events.is_empty() {
                    return Ok(events);
                }
            }
            if let Some(run) = cache.run_at(from) {
                self.read_ahead(&mut cache, run.end, until);
                return Ok(run.slice(from, until, max));
            }
            self.fetch(&mut cache, from)
        };
        let run = fetch.await?;
        self.read_ahead(&mut self.cache(), run.end, until);
        Ok(run.slice(from, until, max))
    }

    /// Fetches the run at `end` in the background, unless it is known or in memory already.
    fn read_ahead(&self, cache: &mut Cache, end: u64, until: u64) {
        if end >= until
            || end >= cache.tail.start()
            || cache.runs.contains_key(&end)
            || cache.fetching.contains_key(&end)
        {
            return;
        }
        // A failed read-ahead is tried again by the reader that needs the run.
        drop(self.fetch(cache, end));
    }

    /// The fetch of the run at `from`: the one in flight, or a new one. It runs as a task
    /// of its own, so that it completes (and leaves `fetching`) even if every reader
    /// waiting for it goes away.
    fn fetch(&self, cache: &mut Cache, from: u64) -> Fetch {
        if let Some(fetch) = cache.fetching.get(&from) {
            return fetch.clone();
        }
        let client = self.client.clone();
        let stream = self.stream.clone();
        let sealing = self.sealing.clone();
        let shared = self.cache.clone();
        let fetches = self.fetches.clone();
        let fetch = async move {
            let run = fetch_run(&client, &stream, &sealing, from)
                .await
                .map(Arc::new);
            fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut cache = shared.lock().unwrap_or_else(|p| p.into_inner());
            cache.fetching.remove(&from);
            if let Ok(run) = &run {
                cache.insert(from, run.clone());
            }
            run
        }
        .boxed()
        .shared();
        cache.fetching.insert(from, fetch.clone());
        tokio::spawn(fetch.clone());
        fetch
    }
}

/// The run of `stream` at position `from`: one direct get of a batch, without headers.
async fn fetch_run(
    client: &async_nats::Client,
    stream: &str,
    sealing: &Sealing,
    from: u64,
) -> Result<Run, StorageError> {
    let request = serde_json::json!({
        "seq": from + 1,
        "batch": RUN_EVENTS,
        "max_bytes": RUN_BYTES,
        "no_hdr": true,
    });
    let messages = direct_get(client, stream, request).await?;
    let corrupt =
        |what: String| StorageError::new(ErrorKind::Corrupt, format!("stream {stream}: {what}"));
    let mut jsons = Vec::with_capacity(messages.len());
    let mut frames_len = 0;
    for message in messages {
        let json = sealing.open(message.payload)?;
        let layout = JsonLayout::parse(&json).ok_or_else(|| {
            corrupt(format!(
                "a message after position {from} is not an event of bus"
            ))
        })?;
        let id = std::str::from_utf8(&json[layout.id.clone()]).unwrap_or_default();
        frames_len += event::sse_frame_len(id, &json);
        jsons.push((json, layout));
    }
    // One buffer for the run's frames, each event a view of it.
    let mut buffer = BytesMut::with_capacity(frames_len);
    let mut events = Vec::with_capacity(jsons.len());
    let mut next = from;
    for (json, layout) in jsons {
        let position = event::index_of_json(&json)
            .ok_or_else(|| corrupt(format!("an event after position {from} has no index")))?;
        if position < next {
            return Err(corrupt(format!(
                "the event at position {position} is out of place (expected {next} or later)"
            )));
        }
        // A run is the events from `from` without a gap: the stream's limits remove events
        // from its start only, so a missing one was not served (a replica behind its
        // leader answered); the run ends before it and the reader asks again there.
        if position > next {
            break;
        }
        next = position + 1;
        let id = std::str::from_utf8(&json[layout.id.clone()]).unwrap_or_default();
        event::push_sse_frame(&mut buffer, id, &json);
        events.push(StoredEvent::new(position, buffer.split().freeze(), &layout));
    }
    Ok(Run {
        events,
        end: next,
        bytes: frames_len,
    })
}
