//! The state a log's readers and its writer thread share ([`Shared`]): the segment list,
//! the in-memory tail, the committed watermark and the log's statistics, and the reads and
//! lookups over them.
//!
//! Reads never pass the committed watermark. Recent events come from the in-memory tail;
//! older ones from the segment files, one index read and one data read per chunk.
//! Finding a server-assigned id is a decode; a client-supplied one, a look in each
//! segment's id index (newest first), confirmed by reading the event. Finding a time is a
//! binary search over the segments' last commit times, then over the commit times of one
//! segment (see the module docs of [`super::log`]).
//!
//! Only the writer changes the segment list's last segment and the watermark; retention
//! removes the first segments. This module does not write files.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use tokio::sync::watch;

use super::cipher::Cipher;
use super::error::StoreError;
use super::ids;
use super::meta::Meta;
use super::segment::Segment;
use super::tail::Tail;
use crate::event::StoredEvent;
use crate::metrics::{self, Histogram};
use crate::timestamp::Timestamp;

/// Largest chunk of record bytes one read returns (from disk, or of stream frames from
/// the tail), unless one event alone is larger. It bounds what a subscriber's turn holds
/// in memory: a subscriber that stops reading keeps at most about one such read.
pub const READ_CHUNK_BYTES: u64 = 256 << 10;

/// State shared by the readers and the writer thread.
pub(crate) struct Shared {
    pub namespace: String,
    pub dir: PathBuf,
    /// The id generations; fixed while the log is open.
    pub meta: Meta,
    /// The key of an encrypted log.
    pub cipher: Option<Cipher>,
    pub segments: RwLock<Vec<Arc<Segment>>>,
    pub tail: RwLock<Tail>,
    committed: AtomicU64,
    watermark: watch::Sender<u64>,
    /// Events per group commit since the log was opened (its count: the group commits;
    /// its sum: the events appended).
    pub group_events: Histogram,
    /// Duration of each `fdatasync` of a segment file since the log was opened, in µs.
    pub sync_micros: Histogram,
    /// Reads that went to the segment files.
    disk_reads: AtomicU64,
    /// Why the writer stopped taking appends, once it has.
    pub halted: OnceLock<String>,
}

impl Shared {
    /// The state of a log opened with `segments` (the active one last) and `next` events,
    /// all committed.
    pub fn new(
        namespace: &str,
        dir: PathBuf,
        meta: Meta,
        cipher: Option<Cipher>,
        segments: Vec<Arc<Segment>>,
        tail_bytes: usize,
        next: u64,
    ) -> Shared {
        let (watermark, _) = watch::channel(next);
        Shared {
            namespace: namespace.to_owned(),
            dir,
            meta,
            cipher,
            tail: RwLock::new(Tail::new(next, tail_bytes)),
            segments: RwLock::new(segments),
            committed: AtomicU64::new(next),
            watermark,
            group_events: Histogram::new(metrics::GROUP_BOUNDS),
            sync_micros: Histogram::new(metrics::DURATION_BOUNDS_MICROS),
            disk_reads: AtomicU64::new(0),
            halted: OnceLock::new(),
        }
    }

    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Publishes a new watermark; the events below it must be readable.
    pub fn publish(&self, next: u64) {
        self.committed.store(next, Ordering::Release);
        self.watermark.send_replace(next);
    }

    /// Follows the committed watermark.
    pub fn watch_committed(&self) -> watch::Receiver<u64> {
        self.watermark.subscribe()
    }

    /// Reads that went to the segment files so far.
    pub fn disk_reads(&self) -> u64 {
        self.disk_reads.load(Ordering::Relaxed)
    }

    pub fn read_tail(&self, from: u64, until: u64, max: usize) -> Option<Vec<StoredEvent>> {
        self.tail
            .read()
            .ok()?
            .read(from, until, max, READ_CHUNK_BYTES as usize)
    }

    /// The segment holding `position`.
    pub fn segment_of(&self, position: u64) -> Result<Arc<Segment>, StoreError> {
        let segments = self
            .segments
            .read()
            .map_err(|_| StoreError::Unusable("segment list lock poisoned".into()))?;
        let i = segments.partition_point(|s| s.base <= position);
        match i.checked_sub(1).and_then(|i| segments.get(i)) {
            Some(segment) => Ok(Arc::clone(segment)),
            None => Err(StoreError::Unusable(format!(
                "position {position} is before the first segment of namespace {}",
                self.namespace
            ))),
        }
    }

    /// Reads committed events `from..until` from the segment files (blocking).
    pub fn read_disk(
        &self,
        from: u64,
        until: u64,
        max: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if from >= until || max == 0 {
            return Ok(Vec::new());
        }
        let segment = self.segment_of(from)?;
        let end = until
            .min(segment.base + segment.count())
            .min(from.saturating_add(max as u64));
        if end <= from {
            return Ok(Vec::new());
        }
        self.disk_reads.fetch_add(1, Ordering::Relaxed);
        segment.read(from, end, READ_CHUNK_BYTES, self.cipher.as_ref())
    }

    /// Resolves a server-assigned id of this log without I/O: `Some(answer)` if `id` has
    /// the form and the generation of this log's ids, `None` otherwise.
    pub fn find_native_id(&self, id: &str, limit: u64) -> Option<Option<u64>> {
        let (generation, position) = ids::decode(id)?;
        let range = self.meta.generation_range(generation)?;
        Some((range.contains(&position) && position < limit).then_some(position))
    }

    /// The position of the event with this id among the first `limit` events.
    pub fn find_id(&self, id: &str, limit: u64) -> Result<Option<u64>, StoreError> {
        if let Some(answer) = self.find_native_id(id, limit) {
            return Ok(answer);
        }
        let hash = ids::hash(id);
        let segments: Vec<Arc<Segment>> = self
            .segments
            .read()
            .map_err(|_| StoreError::Unusable("segment list lock poisoned".into()))?
            .clone();
        for segment in segments.iter().rev() {
            for position in segment.id_candidates(hash)? {
                if position >= limit {
                    continue;
                }
                let found = self.read_disk(position, position + 1, 1)?;
                if found.first().is_some_and(|e| e.id() == id) {
                    return Ok(Some(position));
                }
            }
        }
        Ok(None)
    }

    /// The time the event at `position` (committed, in `segment`) is judged by: its commit
    /// time, or in a segment without commit times its `created_at` (`None` if unreadable).
    pub fn time_of(
        &self,
        segment: &Segment,
        position: u64,
    ) -> Result<Option<Timestamp>, StoreError> {
        if let Some(time) = segment.commit_time(position)? {
            return Ok(Some(time));
        }
        let event = segment.read(position, position + 1, 1, self.cipher.as_ref())?;
        Ok(event.first().and_then(StoredEvent::created_at))
    }

    /// The log's last stored commit time: the last event's, if its segment has commit times.
    pub fn last_commit_time(&self) -> Result<Option<Timestamp>, StoreError> {
        let segments = self
            .segments
            .read()
            .map_err(|_| StoreError::Unusable("segment list lock poisoned".into()))?;
        match segments.iter().rev().find(|s| s.count() > 0) {
            Some(segment) => segment.last_commit_time(),
            None => Ok(None),
        }
    }

    /// See [`Log::first_committed_at_or_after`](super::Log::first_committed_at_or_after).
    /// Blocking.
    pub fn first_committed_at_or_after(&self, time: Timestamp) -> Result<u64, StoreError> {
        let committed = self.committed();
        let segments: Vec<Arc<Segment>> = self
            .segments
            .read()
            .map_err(|_| StoreError::Unusable("segment list lock poisoned".into()))?
            .iter()
            .filter(|s| s.base < committed)
            .cloned()
            .collect();
        // The committed events of a segment: base..end.
        let end = |s: &Segment| (s.base + s.count()).min(committed);
        // Whether the event at `position` is judged earlier than `time`. An unreadable
        // created_at (only in segments without commit times) counts as not earlier: the
        // search errs on delivering.
        let earlier = |s: &Segment, position: u64| -> Result<bool, StoreError> {
            Ok(self.time_of(s, position)?.is_some_and(|t| t < time))
        };
        // The first segment whose last event is not earlier than `time`…
        let (mut low, mut high) = (0, segments.len());
        while low < high {
            let middle = low + (high - low) / 2;
            let s = &segments[middle];
            if end(s) > s.base && earlier(s, end(s) - 1)? {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        let Some(segment) = segments.get(low) else {
            return Ok(committed);
        };
        // …and in it, the first event not earlier than `time`.
        let (mut low, mut high) = (segment.base, end(segment));
        while low < high {
            let middle = low + (high - low) / 2;
            if earlier(segment, middle)? {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        Ok(low)
    }

    /// Whether `id` is a server-assigned id of this log at `position`.
    pub fn is_native_at(meta: &Meta, id: &str, position: u64) -> bool {
        ids::decode(id).is_some_and(|(generation, encoded)| {
            encoded == position && meta.generation_of(position) == generation
        })
    }
}
