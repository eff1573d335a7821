//! A storage backend in memory: the [`EventLog`] and [`ConsumerStore`] of [`super::api`]
//! without a disk, for the broker's own tests (and for anyone who wants a bus that forgets
//! everything when it stops).
//!
//! It keeps the promises of the interface that do not concern durability: gapless
//! positions, atomic batches, ids unique in the namespace (server-assigned ones encode
//! their position, as the file store's do), commit times that never go backwards, and a
//! watermark that wakes readers. Retention removes single events. Nothing survives the
//! process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::watch;

use super::api::{
    Appended, BoxFuture, CommitTimings, ConsumerStore, ErrorKind, EventLog, KeyedEvent, LogStats,
    StorageError, StorageUsage,
};
use super::consumers::{ConsumerName, ConsumerProgress};
use super::error::StoreError;
use super::ids;
use crate::event::{self, PendingEvent, StoredEvent};
use crate::metrics::{self, Histogram};
use crate::timestamp::Timestamp;

/// About what one read returns at most (at least one event), as in the file store.
const READ_BYTES: usize = 256 << 10;

/// One event kept in memory, with what the interface asks of it besides its frame.
struct Kept {
    event: StoredEvent,
    committed_at: Timestamp,
    /// Its subject and deduplication key, if it has a key.
    keyed: Option<(String, String)>,
}

struct Events {
    /// The position of `kept[0]`.
    first: u64,
    kept: Vec<Kept>,
    /// Client-supplied ids, by position.
    client_ids: HashMap<String, u64>,
    last_commit: Timestamp,
    closed: bool,
}

/// A namespace's log in memory.
pub struct MemoryLog {
    namespace: String,
    /// Server-assigned ids encode it with the position, as in the file store.
    generation: u64,
    events: RwLock<Events>,
    watermark: watch::Sender<u64>,
    groups: AtomicU64,
    group_events: Histogram,
    sync_micros: Histogram,
}

impl MemoryLog {
    pub fn new(namespace: &str) -> MemoryLog {
        MemoryLog {
            namespace: namespace.to_owned(),
            generation: ids::random_generation(),
            events: RwLock::new(Events {
                first: 0,
                kept: Vec::new(),
                client_ids: HashMap::new(),
                last_commit: Timestamp::from_unix_nanos(i64::MIN),
                closed: false,
            }),
            watermark: watch::Sender::new(0),
            groups: AtomicU64::new(0),
            group_events: Histogram::new(metrics::GROUP_BOUNDS),
            sync_micros: Histogram::new(metrics::DURATION_BOUNDS_MICROS),
        }
    }

    fn read_events(&self) -> std::sync::RwLockReadGuard<'_, Events> {
        self.events.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_events(&self) -> std::sync::RwLockWriteGuard<'_, Events> {
        self.events.write().unwrap_or_else(|p| p.into_inner())
    }

    fn append_now(&self, batch: Vec<PendingEvent>) -> Result<Vec<Appended>, StorageError> {
        let mut events = self.write_events();
        if events.closed {
            return Err(StoreError::Closed(self.namespace.clone()).into());
        }
        let mut in_batch = HashSet::new();
        for id in batch.iter().filter_map(PendingEvent::client_id) {
            if events.client_ids.contains_key(id) || !in_batch.insert(id) {
                return Err(StoreError::DuplicateId(id.to_owned()).into());
            }
            if ids::decode(id).is_some() {
                return Err(StoreError::ReservedId(id.to_owned()).into());
            }
        }
        let committed_at = Timestamp::now().max(events.last_commit);
        events.last_commit = committed_at;
        let mut position = events.first + events.kept.len() as u64;
        let mut appended = Vec::with_capacity(batch.len());
        for pending in &batch {
            let id = match pending.client_id() {
                Some(id) => id.to_owned(),
                None => ids::text(self.generation, position),
            };
            let created_at = pending.created_at.unwrap_or(committed_at);
            let mut json = Vec::with_capacity(pending.encoded_len_hint());
            let layout = pending.write_json(&mut json, &id, &created_at.format(), position as i64);
            let keyed = layout.key.clone().and_then(|range| {
                let key = serde_json::from_slice::<String>(&json[range]).ok()?;
                let subject = std::str::from_utf8(&json[layout.subject.clone()]).ok()?;
                Some((subject.to_owned(), key))
            });
            let mut frame = BytesMut::with_capacity(event::sse_frame_len(&id, &json));
            event::push_sse_frame(&mut frame, &id, &json);
            if pending.client_id().is_some() {
                events.client_ids.insert(id.clone(), position);
            }
            events.kept.push(Kept {
                event: StoredEvent::new(position, frame.freeze(), &layout),
                committed_at,
                keyed,
            });
            appended.push(Appended {
                position,
                id,
                created_at,
            });
            position += 1;
        }
        // Published under the lock: appends racing each other must not move the watermark
        // back.
        self.watermark.send_replace(position);
        drop(events);
        self.groups.fetch_add(1, Ordering::Relaxed);
        self.group_events.observe(appended.len() as u64);
        Ok(appended)
    }
}

impl EventLog for MemoryLog {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn append(
        &self,
        batch: Vec<PendingEvent>,
    ) -> BoxFuture<'_, Result<Vec<Appended>, StorageError>> {
        Box::pin(async move { self.append_now(batch) })
    }

    fn read(
        &self,
        from: u64,
        max_events: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEvent>, StorageError>> {
        Box::pin(async move {
            let events = self.read_events();
            if from < events.first {
                return Err(StorageError::new(
                    ErrorKind::NotFound,
                    format!("position {from} was removed by retention"),
                ));
            }
            let start = usize::try_from(from - events.first).unwrap_or(usize::MAX);
            // As the file store does: about one read's worth, and at least one event.
            let mut bytes = 0;
            Ok(events
                .kept
                .iter()
                .skip(start)
                .take(max_events)
                .take_while(|kept| {
                    let first = bytes == 0;
                    bytes += kept.event.sse_frame().len();
                    first || bytes <= READ_BYTES
                })
                .map(|kept| kept.event.clone())
                .collect())
        })
    }

    fn committed(&self) -> u64 {
        *self.watermark.borrow()
    }

    fn watch_committed(&self) -> watch::Receiver<u64> {
        self.watermark.subscribe()
    }

    fn first_position(&self) -> u64 {
        self.read_events().first
    }

    fn find_id<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<u64>, StorageError>> {
        Box::pin(async move {
            let events = self.read_events();
            if let Some(&position) = events.client_ids.get(id) {
                return Ok(Some(position));
            }
            let end = events.first + events.kept.len() as u64;
            Ok(ids::decode(id)
                .filter(|&(generation, position)| generation == self.generation && position < end)
                .map(|(_, position)| position))
        })
    }

    fn first_committed_at_or_after(
        &self,
        time: Timestamp,
    ) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(async move {
            let events = self.read_events();
            let index = events.kept.partition_point(|kept| kept.committed_at < time);
            Ok(events.first + index as u64)
        })
    }

    fn visit_recent_keys(
        &self,
        events: u64,
        max_key_len: usize,
        visit: &mut dyn FnMut(KeyedEvent),
    ) -> Result<(), StorageError> {
        let kept = self.read_events();
        let skip = kept
            .kept
            .len()
            .saturating_sub(usize::try_from(events).unwrap_or(usize::MAX));
        for event in &kept.kept[skip..] {
            if let Some((subject, key)) = &event.keyed {
                if key.len() <= max_key_len {
                    visit(KeyedEvent {
                        subject: subject.clone(),
                        key: key.clone(),
                        committed_at: event.committed_at,
                    });
                }
            }
        }
        Ok(())
    }

    fn halted(&self) -> Option<String> {
        None
    }

    fn stats(&self) -> LogStats {
        LogStats {
            events: self.committed(),
            groups: self.groups.load(Ordering::Relaxed),
            syncs: 0,
            disk_reads: 0,
        }
    }

    fn commit_timings(&self) -> CommitTimings<'_> {
        CommitTimings {
            group_events: &self.group_events,
            sync_micros: &self.sync_micros,
        }
    }

    fn usage(&self) -> Result<StorageUsage, StorageError> {
        let events = self.read_events();
        Ok(StorageUsage {
            events: events.kept.len() as u64,
            bytes: events
                .kept
                .iter()
                .map(|k| k.event.sse_frame().len() as u64)
                .sum(),
            segments: None,
        })
    }

    fn enforce_retention(
        &self,
        max_age: Option<Duration>,
        max_bytes: Option<u64>,
    ) -> Result<Vec<(u64, u64)>, StorageError> {
        let mut events = self.write_events();
        let mut bytes: u64 = events
            .kept
            .iter()
            .map(|k| k.event.sse_frame().len() as u64)
            .sum();
        let oldest_kept = max_age.map(|age| {
            Timestamp::now()
                .unix_nanos()
                .saturating_sub(i64::try_from(age.as_nanos()).unwrap_or(i64::MAX))
        });
        let mut removed = 0;
        // Never the newest event: it is where appends go on.
        while removed + 1 < events.kept.len() {
            let oldest = &events.kept[removed];
            let too_big = max_bytes.is_some_and(|max| bytes > max);
            let too_old = oldest_kept.is_some_and(|limit| oldest.committed_at.unix_nanos() < limit);
            if !(too_big || too_old) {
                break;
            }
            bytes -= oldest.event.sse_frame().len() as u64;
            removed += 1;
        }
        if removed == 0 {
            return Ok(Vec::new());
        }
        let first = events.first;
        events.kept.drain(..removed);
        events.first += removed as u64;
        let first_kept = events.first;
        events
            .client_ids
            .retain(|_, position| *position >= first_kept);
        Ok(vec![(first, removed as u64)])
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            self.write_events().closed = true;
            Ok(())
        })
    }
}

type Progresses = BTreeMap<(String, ConsumerName), ConsumerProgress>;

/// Durable consumers' progress in memory.
#[derive(Default)]
pub struct MemoryConsumers {
    progress: Mutex<Progresses>,
}

impl MemoryConsumers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progresses> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ConsumerStore for MemoryConsumers {
    fn load(
        &self,
        namespace: &str,
        name: &ConsumerName,
    ) -> Result<Option<ConsumerProgress>, StorageError> {
        Ok(self
            .lock()
            .get(&(namespace.to_owned(), name.clone()))
            .cloned())
    }

    fn save(
        &self,
        namespace: &str,
        name: &ConsumerName,
        progress: &ConsumerProgress,
    ) -> Result<(), StorageError> {
        self.lock()
            .insert((namespace.to_owned(), name.clone()), progress.clone());
        Ok(())
    }

    fn remove(&self, namespace: &str, name: &ConsumerName) -> Result<(), StorageError> {
        self.lock().remove(&(namespace.to_owned(), name.clone()));
        Ok(())
    }

    fn list(&self, namespace: &str) -> Result<Vec<(ConsumerName, ConsumerProgress)>, StorageError> {
        Ok(self
            .lock()
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, name), progress)| (name.clone(), progress.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventDraft;

    fn event(subject: &str, key: &str, id: Option<&str>) -> PendingEvent {
        PendingEvent::new(&EventDraft {
            subject,
            key,
            id,
            payload: Some(b"1"),
            ..EventDraft::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn keeps_the_promises_of_a_log_without_durability() {
        let log = MemoryLog::new("orders");
        let mut watermark = log.watch_committed();
        let appended = log
            .append(vec![
                event("orders.a", "k1", None),
                event("orders.b", "", Some("e_mine")),
            ])
            .await
            .unwrap();
        let positions: Vec<u64> = appended.iter().map(|a| a.position).collect();
        assert_eq!(positions, [0, 1]);
        assert!(watermark.has_changed().unwrap());
        assert_eq!(*watermark.borrow_and_update(), 2);
        let read = log.read(0, 10).await.unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].id(), "e_mine");
        assert_eq!(log.find_id(&appended[0].id).await.unwrap(), Some(0));
        assert_eq!(log.find_id("e_mine").await.unwrap(), Some(1));
        assert_eq!(log.find_id("e_nope").await.unwrap(), None);
        let duplicate = log
            .append(vec![event("orders.c", "", Some("e_mine"))])
            .await;
        assert_eq!(duplicate.unwrap_err().kind, ErrorKind::Conflict);
        let mut keys = Vec::new();
        log.visit_recent_keys(10, 100, &mut |keyed| keys.push(keyed.key))
            .unwrap();
        assert_eq!(keys, ["k1"]);
        let committed = appended[1].created_at;
        assert_eq!(log.first_committed_at_or_after(committed).await.unwrap(), 0);
        let removed = log.enforce_retention(None, Some(0)).unwrap();
        assert_eq!(removed, vec![(0, 1)]);
        assert_eq!(log.first_position(), 1);
        assert_eq!(log.read(0, 1).await.unwrap_err().kind, ErrorKind::NotFound);
        log.close().await.unwrap();
        let closed = log.append(vec![event("orders.d", "", None)]).await;
        assert_eq!(closed.unwrap_err().kind, ErrorKind::Unavailable);
    }
}
