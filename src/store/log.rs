//! One namespace's log: opening and recovering it, reading it, finding events by id.
//!
//! Opening takes the directory's lock (one process per log), reads `meta.json`, checks the
//! sealed segments cheaply (header, index length, last record's end) and reads every record
//! of the active segment (see [`segment::scan`]). A torn or damaged last write is
//! truncated with a warning; damage followed by valid data stops the open. If the previous
//! process did not close the log cleanly, a new id generation starts (see [`ids`]).
//! Then the writer thread starts (see [`super::writer`]).
//!
//! Reads never pass the committed watermark. Recent events come from the in-memory tail;
//! older ones from the segment files, one index read and one data read per chunk.
//!
//! Time: every event has a commit time, the server's own (see the `.tim` file in
//! [`segment`]), which never decreases along the log. Retention by age judges a sealed
//! segment by its last event's commit time, and [`Log::first_committed_at_or_after`]
//! (behind `start_time`) is a binary search over the segments' last commit times, then
//! over the commit times of one segment: O(log n) 8-byte reads. A client-supplied
//! `created_at` (publishers may set one, `bus restore` does) plays no part in either.
//! Recovery keeps the active segment's `.tim` parallel to its records: entries past them
//! are dropped, missing or unbelievable ones are dated by the recovery time (never earlier
//! than the last time kept), so such events are kept longer and delivered rather than
//! skipped. Sealed segments written by versions before `.tim` existed have none, and
//! nothing is migrated (that would read whole segments): for them the `created_at` of
//! their events stands in, as it did in those versions — a segment's newest event for
//! retention, the events' own times for the search.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use tokio::sync::{oneshot, watch};

use super::error::{IoContext, StoreError};
use super::inbox::Inbox;
use super::meta::{Generation, Meta};
use super::segment::{self, ActiveFiles, Segment, SegmentPaths, TailDamage, LOG_HEADER_LEN};
use super::tail::Tail;
use super::writer::{self, Command};
use super::api::{
    Appended, BoxFuture, CommitTimings, ErrorKind, EventLog, KeyedEvent, LogStats, StorageError,
};
use super::{ids, Cipher, StoreConfig};
use crate::event::{JsonLayout, PendingEvent, StoredEvent};
use crate::metrics::{self, Histogram};
use crate::timestamp::Timestamp;

/// Largest chunk of record bytes one read returns (from disk, or of stream frames from
/// the tail), unless one event alone is larger. It bounds what a subscriber's turn holds
/// in memory: a subscriber that stops reading keeps at most about one such read.
const READ_CHUNK_BYTES: u64 = 256 << 10;
/// Name of the file whose lock marks a log as in use.
pub const LOCK_FILE: &str = "lock";

/// What opening a log found and did.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Events in the log after opening.
    pub events: u64,
    pub segments: usize,
    /// Whether the previous process closed the log cleanly.
    pub clean_shutdown: bool,
    /// Bytes dropped from the end of the active segment, if any.
    pub truncated: Option<Truncation>,
    /// Index files that were missing or inconsistent and were rebuilt from their segment.
    pub rebuilt_indexes: Vec<PathBuf>,
    /// Events of the active segment whose commit time was missing (an interrupted write,
    /// or a segment written by an older version) and that were dated by the recovery.
    pub commit_times_filled: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    pub file: PathBuf,
    /// Where the file now ends.
    pub offset: u64,
    pub bytes_dropped: u64,
    pub reason: String,
}

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
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Publishes a new watermark; the events below it must be readable.
    pub fn publish(&self, next: u64) {
        self.committed.store(next, Ordering::Release);
        self.watermark.send_replace(next);
    }

    fn read_tail(&self, from: u64, until: u64, max: usize) -> Option<Vec<StoredEvent>> {
        self.tail
            .read()
            .ok()?
            .read(from, until, max, READ_CHUNK_BYTES as usize)
    }

    /// The segment holding `position`.
    fn segment_of(&self, position: u64) -> Result<Arc<Segment>, StoreError> {
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

    /// See [`Log::first_committed_at_or_after`]. Blocking.
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

/// A namespace's open log. Dropping it commits what is queued and closes it cleanly.
pub struct Log {
    shared: Arc<Shared>,
    commands: Arc<Inbox<Command>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    recovery: Recovery,
}

impl Log {
    /// Opens the log in `dir`, creating it if the directory holds none. Blocking.
    pub fn open(dir: &Path, namespace: &str, config: &StoreConfig) -> Result<Log, StoreError> {
        fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        let lock = take_lock(dir)?;
        let bases = segment::list_segments(dir)?;
        let (mut meta, fresh) = match Meta::read(dir)? {
            Some(meta) => (meta, false),
            None if bases.is_empty() => {
                let meta = Meta {
                    generations: vec![Generation {
                        id: ids::random_generation()
                            .context(|| "drawing a random id generation".into())?,
                        first: 0,
                    }],
                    clean_end: None,
                    key_check: config.cipher.as_ref().map(Cipher::key_check).transpose()?,
                };
                // Written before the first segment exists, so that a crash right now
                // never leaves segments without metadata.
                meta.write(dir)?;
                (meta, true)
            }
            None => {
                return Err(StoreError::Unusable(format!(
                    "{} holds segment files but no {}; it cannot be opened safely (was the file deleted?)",
                    dir.display(),
                    super::meta::META_FILE
                )))
            }
        };

        check_key(dir, namespace, &meta, config.cipher.as_ref())?;
        let cipher = config.cipher.as_ref();
        let mut recovery = Recovery {
            clean_shutdown: fresh || meta.clean_end.is_some(),
            ..Recovery::default()
        };
        let (segments, active_files) = open_segments(dir, &bases, &meta, &mut recovery, cipher)?;
        let active = segments
            .last()
            .ok_or_else(|| StoreError::Unusable("no active segment".into()))?;
        let next = active.base + active.count();
        recovery.events = next;
        recovery.segments = segments.len();

        // After an unclean stop (or if the event count differs from the one recorded at a
        // clean close), positions from `next` on may have been seen with other events
        // before: new events get ids of a fresh generation.
        if !fresh && meta.clean_end != Some(next) {
            if meta.clean_end.is_some() {
                tracing::warn!(
                    namespace,
                    recorded = meta.clean_end,
                    found = next,
                    "event count differs from the one recorded at the last clean shutdown"
                );
            }
            let generation = loop {
                let candidate =
                    ids::random_generation().context(|| "drawing a random id generation".into())?;
                if meta.generation_range(candidate).is_none() {
                    break candidate;
                }
            };
            meta.start_generation(generation, next);
        }
        // Written by the writer before its first append (see there), not now: opening a
        // log to read it writes nothing.
        meta.clean_end = None;

        let (watermark, _) = watch::channel(next);
        let shared = Arc::new(Shared {
            namespace: namespace.to_owned(),
            dir: dir.to_owned(),
            meta: meta.clone(),
            cipher: config.cipher.clone(),
            tail: RwLock::new(Tail::new(next, config.tail_bytes)),
            segments: RwLock::new(segments),
            committed: AtomicU64::new(next),
            watermark,
            group_events: Histogram::new(metrics::GROUP_BOUNDS),
            sync_micros: Histogram::new(metrics::DURATION_BOUNDS_MICROS),
            disk_reads: AtomicU64::new(0),
            halted: OnceLock::new(),
        });
        let last_commit = last_commit_time(&shared)?;
        if let Some(last) = last_commit {
            let ahead = last
                .unix_nanos()
                .saturating_sub(Timestamp::now().unix_nanos());
            if ahead > 60_000_000_000 {
                tracing::warn!(
                    namespace,
                    last_commit = %last,
                    "the last commit time stored is ahead of the clock; new events are dated from it until the clock catches up"
                );
            }
        }
        let (commands, writer) = writer::start(
            Arc::clone(&shared),
            meta,
            fresh,
            config,
            active_files,
            lock,
            last_commit,
        )?;
        if let Some(t) = &recovery.truncated {
            tracing::warn!(
                namespace,
                file = %t.file.display(),
                offset = t.offset,
                bytes_dropped = t.bytes_dropped,
                reason = %t.reason,
                "truncated the interrupted last write of the log"
            );
        }
        Ok(Log {
            shared,
            commands,
            writer: Mutex::new(Some(writer)),
            recovery,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.shared.namespace
    }

    /// Deletes the oldest sealed segments while the log holds more than `max_bytes` or
    /// their last event was committed more than `max_age` ago (for segments without
    /// commit times, written by older versions: their newest event's `created_at`); never
    /// the segment being written. Returns the (first position, events) of each segment
    /// deleted. Blocking.
    pub fn enforce_retention(
        &self,
        max_age: Option<std::time::Duration>,
        max_bytes: Option<u64>,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let segments: Vec<Arc<Segment>> = self
            .shared
            .segments
            .read()
            .map_err(|_| StoreError::Unusable("segment list lock poisoned".into()))?
            .clone();
        // Sizes are read once; each deletion subtracts what it frees.
        let mut total: u64 = match max_bytes {
            Some(_) => segments.iter().map(|s| s.disk_bytes()).sum(),
            None => 0,
        };
        let oldest_kept = max_age.map(|age| {
            Timestamp::now()
                .unix_nanos()
                .saturating_sub(i64::try_from(age.as_nanos()).unwrap_or(i64::MAX))
        });
        let mut deleted = Vec::new();
        // Never the last segment: it is the one being written.
        for oldest in segments.iter().take(segments.len().saturating_sub(1)) {
            let too_big = max_bytes.is_some_and(|max| total > max);
            let too_old = match oldest_kept {
                Some(limit) if oldest.count() > 0 => {
                    let last = oldest.base + oldest.count() - 1;
                    let time = self.shared.time_of(oldest, last)?;
                    time.is_some_and(|t| t.unix_nanos() < limit)
                }
                _ => false,
            };
            if !(too_big || too_old) {
                break;
            }
            // Readers find the segment gone from the list first, then its files.
            {
                let mut list = self
                    .shared
                    .segments
                    .write()
                    .map_err(|_| StoreError::Unusable("segment list lock poisoned".into()))?;
                if list.first().map(|s| s.base) != Some(oldest.base) || list.len() < 2 {
                    break;
                }
                list.remove(0);
            }
            total = total.saturating_sub(oldest.disk_bytes());
            oldest.remove_files()?;
            deleted.push((oldest.base, oldest.count()));
        }
        Ok(deleted)
    }

    /// The position of the oldest event kept (0 unless retention deleted older ones).
    pub fn first_position(&self) -> u64 {
        self.shared
            .segments
            .read()
            .ok()
            .and_then(|segments| segments.first().map(|s| s.base))
            .unwrap_or(0)
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// What opening the log found.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The committed watermark: the number of committed events.
    pub fn committed(&self) -> u64 {
        self.shared.committed()
    }

    pub fn watch_committed(&self) -> watch::Receiver<u64> {
        self.shared.watermark.subscribe()
    }

    pub fn stats(&self) -> LogStats {
        LogStats {
            events: self.committed(),
            groups: self.shared.group_events.count(),
            syncs: self.shared.sync_micros.count(),
            disk_reads: self.shared.disk_reads.load(Ordering::Relaxed),
        }
    }

    /// Why the log refuses appends until the server restarts, if it does (a failed sync).
    pub fn halted(&self) -> Option<&str> {
        self.shared.halted.get().map(String::as_str)
    }

    /// Events per group commit since the log was opened (the sum: events appended).
    pub fn group_events(&self) -> &Histogram {
        &self.shared.group_events
    }

    /// Durations of the syncs of segment files since the log was opened, in µs.
    pub fn sync_micros(&self) -> &Histogram {
        &self.shared.sync_micros
    }

    /// Bytes of the files in the log's directory (blocking: it reads the directory).
    pub fn disk_bytes(&self) -> std::io::Result<u64> {
        let mut total = 0;
        for entry in fs::read_dir(&self.shared.dir)? {
            let metadata = entry?.metadata()?;
            if metadata.is_file() {
                total += metadata.len();
            }
        }
        Ok(total)
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.shared.segments.read().map_or(0, |s| s.len())
    }

    /// Appends a batch atomically; see [`EventLog::append`].
    pub async fn append(&self, batch: Vec<PendingEvent>) -> Result<Vec<Appended>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let closed = || StoreError::Closed(self.shared.namespace.clone());
        self.commands
            .send(Command::Append {
                events: batch,
                reply,
            })
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Up to `max_events` committed events from `from` on.
    pub async fn read(&self, from: u64, max_events: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let until = self.committed();
        if from >= until {
            return Ok(Vec::new());
        }
        if let Some(events) = self.shared.read_tail(from, until, max_events) {
            return Ok(events);
        }
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.read_disk(from, until, max_events))
            .await
            .map_err(|e| StoreError::Unusable(format!("read task failed: {e}")))?
    }

    /// [`Log::read`] for callers outside an async runtime.
    pub fn read_blocking(
        &self,
        from: u64,
        max_events: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let until = self.committed();
        if let Some(events) = self.shared.read_tail(from, until, max_events) {
            return Ok(events);
        }
        self.shared.read_disk(from, until, max_events)
    }

    /// The position of the first event committed at or after `time` (the committed
    /// watermark if there is none): where a subscription with this `start_time` starts.
    /// O(log n) small reads (see the module docs).
    pub async fn first_committed_at_or_after(&self, time: Timestamp) -> Result<u64, StoreError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.first_committed_at_or_after(time))
            .await
            .map_err(|e| StoreError::Unusable(format!("search task failed: {e}")))?
    }

    /// The position of the committed event with this id.
    pub async fn find_id(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let limit = self.committed();
        if let Some(answer) = self.shared.find_native_id(id, limit) {
            return Ok(answer);
        }
        let shared = Arc::clone(&self.shared);
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || shared.find_id(&id, limit))
            .await
            .map_err(|e| StoreError::Unusable(format!("lookup task failed: {e}")))?
    }

    /// Calls `visit` with the position, JSON and layout of every committed event from
    /// `from` on, read from the segment files without building stream frames: for scans
    /// (the deduplication window at start-up). Blocking.
    pub fn scan_blocking(
        &self,
        from: u64,
        mut visit: impl FnMut(u64, &[u8], JsonLayout),
    ) -> Result<(), StoreError> {
        let until = self.committed();
        let mut next = from.max(self.first_position());
        while next < until {
            let segment = self.shared.segment_of(next)?;
            let end = until.min(segment.base + segment.count());
            next = segment.visit(
                next,
                end,
                READ_CHUNK_BYTES,
                self.shared.cipher.as_ref(),
                |position, json, layout| {
                    visit(position, json, layout);
                    Ok(())
                },
            )?;
        }
        Ok(())
    }

    /// Tests only: the writer takes no more commands (appends queue up, then wait for room)
    /// until the returned sender is dropped.
    #[cfg(test)]
    pub(crate) async fn pause_writer(&self) -> std::sync::mpsc::Sender<()> {
        let (resume, until) = std::sync::mpsc::channel();
        let (paused, answer) = oneshot::channel();
        let _ = self.commands.send(Command::Pause { paused, until }).await;
        let _ = answer.await;
        resume
    }

    /// Tests only: appends that can be queued right now without waiting for room.
    #[cfg(test)]
    pub(crate) fn queue_room(&self) -> usize {
        self.commands.room()
    }

    /// Commits what is queued, syncs, and records a clean shutdown. Appends after this
    /// fail with [`StoreError::Closed`]; reads keep working.
    pub async fn close(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::Shutdown { reply })
            .await
            .is_err()
        {
            return Ok(()); // already closed
        }
        let result = answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Closed(self.shared.namespace.clone())));
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        result
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        // Closing the inbox makes the writer commit what is queued and close cleanly;
        // wait for it so the directory is unlocked when `drop` returns.
        self.commands.close();
        if let Some(handle) = self.writer.get_mut().ok().and_then(Option::take) {
            let _ = handle.join();
        }
    }
}

impl EventLog for Log {
    fn namespace(&self) -> &str {
        Log::namespace(self)
    }

    fn append(
        &self,
        batch: Vec<PendingEvent>,
    ) -> BoxFuture<'_, Result<Vec<Appended>, StorageError>> {
        Box::pin(async move { Ok(Log::append(self, batch).await?) })
    }

    fn read(
        &self,
        from: u64,
        max_events: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEvent>, StorageError>> {
        Box::pin(async move { Ok(Log::read(self, from, max_events).await?) })
    }

    fn committed(&self) -> u64 {
        Log::committed(self)
    }

    fn watch_committed(&self) -> watch::Receiver<u64> {
        Log::watch_committed(self)
    }

    fn first_position(&self) -> u64 {
        Log::first_position(self)
    }

    fn find_id<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<u64>, StorageError>> {
        Box::pin(async move { Ok(Log::find_id(self, id).await?) })
    }

    fn first_committed_at_or_after(
        &self,
        time: Timestamp,
    ) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(async move { Ok(Log::first_committed_at_or_after(self, time).await?) })
    }

    fn visit_recent_keys(
        &self,
        events: u64,
        max_key_len: usize,
        visit: &mut dyn FnMut(KeyedEvent),
    ) -> Result<(), StorageError> {
        let from = self.committed().saturating_sub(events);
        let mut failure = None;
        self.scan_blocking(from, |position, json, layout| {
            let Some(raw_key) = layout.key.clone().map(|range| &json[range]) else {
                return;
            };
            // Its JSON form is at least as long as the key: longer keys are not decoded.
            if raw_key.len() > max_key_len + 2 && !raw_key.contains(&b'\\') {
                return;
            }
            let Ok(key) = serde_json::from_slice::<String>(raw_key) else {
                return;
            };
            if key.len() > max_key_len {
                return;
            }
            // The subject's range is its text without quotes (subjects need no escapes).
            let Ok(subject) = std::str::from_utf8(&json[layout.subject.clone()]) else {
                return;
            };
            let committed_at = self
                .shared
                .segment_of(position)
                .and_then(|segment| self.shared.time_of(&segment, position));
            match committed_at {
                Ok(Some(committed_at)) => visit(KeyedEvent {
                    subject: subject.to_owned(),
                    key,
                    committed_at,
                }),
                Ok(None) => {}
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        })?;
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn halted(&self) -> Option<String> {
        Log::halted(self).map(str::to_owned)
    }

    fn stats(&self) -> LogStats {
        Log::stats(self)
    }

    fn commit_timings(&self) -> CommitTimings<'_> {
        CommitTimings {
            group_events: self.group_events(),
            sync_micros: self.sync_micros(),
        }
    }

    fn stored_bytes(&self) -> Result<u64, StorageError> {
        self.disk_bytes().map_err(|e| {
            StorageError::new(
                ErrorKind::Internal,
                format!("measuring the log of {}: {e}", self.namespace()),
            )
        })
    }

    fn enforce_retention(
        &self,
        max_age: Option<std::time::Duration>,
        max_bytes: Option<u64>,
    ) -> Result<Vec<(u64, u64)>, StorageError> {
        Ok(Log::enforce_retention(self, max_age, max_bytes)?)
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move { Ok(Log::close(self).await?) })
    }
}

/// Refuses to open a log with a key it was not encrypted with, or without its key, or a
/// plain log with a key, each with its own message.
pub fn check_key(
    dir: &Path,
    namespace: &str,
    meta: &Meta,
    cipher: Option<&Cipher>,
) -> Result<(), StoreError> {
    let message = match (&meta.key_check, cipher) {
        (None, None) => return Ok(()),
        (Some(check), Some(cipher)) if cipher.matches_key_check(check) => return Ok(()),
        (Some(_), Some(_)) => format!(
            "namespace {namespace} ({}) is encrypted with a different secret key than the one given",
            dir.display()
        ),
        (Some(_), None) => format!(
            "namespace {namespace} ({}) is encrypted: give its secret key (--secret-key or BUS_SECRET_KEY)",
            dir.display()
        ),
        (None, Some(_)) => format!(
            "namespace {namespace} ({}) is not encrypted, but a secret key was given; to encrypt it, copy it into a new data directory with bus copy --dst-secret-key",
            dir.display()
        ),
    };
    Err(StoreError::Unusable(message))
}

/// The log's last stored commit time: the last event's, if its segment has commit times.
fn last_commit_time(shared: &Shared) -> Result<Option<Timestamp>, StoreError> {
    let segments = shared
        .segments
        .read()
        .map_err(|_| StoreError::Unusable("segment list lock poisoned".into()))?;
    match segments.iter().rev().find(|s| s.count() > 0) {
        Some(segment) => segment.last_commit_time(),
        None => Ok(None),
    }
}

fn take_lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Unusable(format!(
            "{} is in use by another bus process (it holds the lock on {})",
            dir.display(),
            path.display()
        ))),
        Err(fs::TryLockError::Error(e)) => {
            Err(StoreError::io(format!("locking {}", path.display()), e))
        }
    }
}

/// Opens the sealed segments and recovers the active one (creating it for a new log).
fn open_segments(
    dir: &Path,
    bases: &[u64],
    meta: &Meta,
    recovery: &mut Recovery,
    cipher: Option<&Cipher>,
) -> Result<(Vec<Arc<Segment>>, Arc<ActiveFiles>), StoreError> {
    let mut bases = bases.to_vec();
    // A crash while rolling to a new segment can leave its file without a whole header
    // (it holds no events: the header is synced before any event is written to it).
    if bases.len() > 1 {
        let last = SegmentPaths::new(dir, bases[bases.len() - 1]);
        let len = fs::metadata(&last.log)
            .context(|| format!("reading {}", last.log.display()))?
            .len();
        if len < LOG_HEADER_LEN {
            tracing::warn!(file = %last.log.display(), "removing a segment whose creation was interrupted");
            for path in [&last.log, &last.index, &last.times, &last.ids] {
                if let Err(e) = fs::remove_file(path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        return Err(StoreError::io(format!("removing {}", path.display()), e));
                    }
                }
            }
            bases.pop();
        }
    }

    let is_native = |id: &str, position: u64| Shared::is_native_at(meta, id, position);
    let mut segments = Vec::with_capacity(bases.len().max(1));
    for pair in bases.windows(2) {
        let segment = open_sealed(dir, pair[0], pair[1], &is_native, recovery, cipher)?;
        segments.push(Arc::new(segment));
    }
    let (active, files) = match bases.last() {
        None => {
            let segment = Segment::create(dir, 0, cipher.is_some())?;
            let files = segment
                .active_files()
                .ok_or_else(|| StoreError::Unusable("new segment has no files".into()))?;
            (segment, files)
        }
        Some(&base) => {
            // The active segment's commit times start no earlier than the last sealed one.
            let floor = match segments.last() {
                Some(sealed) => sealed.last_commit_time()?,
                None => None,
            };
            open_active(dir, base, &is_native, recovery, cipher, floor)?
        }
    };
    segments.push(Arc::new(active));
    Ok((segments, files))
}

/// Opens a sealed segment, rebuilding its indexes if they are missing or inconsistent.
fn open_sealed(
    dir: &Path,
    base: u64,
    next_base: u64,
    is_native: &dyn Fn(&str, u64) -> bool,
    recovery: &mut Recovery,
    cipher: Option<&Cipher>,
) -> Result<Segment, StoreError> {
    let paths = SegmentPaths::new(dir, base);
    let expected = next_base.saturating_sub(base);
    if expected == 0 {
        return Err(StoreError::corrupt(
            &paths.log,
            0,
            format!("segment starts at position {base} but the next one starts at {next_base}"),
        ));
    }
    let mut header = [0u8; LOG_HEADER_LEN as usize];
    let log_file = File::open(&paths.log).context(|| format!("opening {}", paths.log.display()))?;
    let log_len = log_file
        .metadata()
        .context(|| format!("reading {}", paths.log.display()))?
        .len();
    std::os::unix::fs::FileExt::read_exact_at(&log_file, &mut header, 0)
        .map_err(|_| StoreError::corrupt(&paths.log, 0, "segment header is incomplete"))?;
    segment::check_log_header(&header, base, &paths.log, cipher.is_some())?;

    let last_entry = segment::last_index_entry(&paths.index, expected);
    // Plain, the records end where the file does; encrypted, the last block ends there
    // and holds the last record's end.
    let ends_ok = match cipher {
        None => last_entry == Some(log_len),
        Some(_) => segment::read_frames_file(&paths.frames, base)
            .and_then(|frames| frames.last().copied())
            .is_some_and(|last| Some(last.logical) == last_entry && last.disk == log_len),
    };
    let index_ok = segment::index_entries(&paths.index, base) == Some(expected) && ends_ok;
    let ids_ok = File::open(&paths.ids)
        .is_ok_and(|f| segment::has_small_header(&f, segment::SmallFile::Ids, base));
    if !(index_ok && ids_ok) {
        tracing::warn!(file = %paths.log.display(), "index of a sealed segment is missing or inconsistent; rebuilding it");
        let scan = segment::scan(&paths.log, base, false, is_native, cipher)?;
        if scan.ends.len() as u64 != expected {
            return Err(StoreError::corrupt(
                &paths.log,
                scan.kept_len,
                format!(
                    "segment holds {} events but the next segment starts at position {next_base}",
                    scan.ends.len()
                ),
            ));
        }
        segment::write_index_file(&paths.index, base, &scan.ends)?;
        let client_ids: Vec<(u64, u64)> = scan.client_ids.into_iter().collect();
        segment::write_ids_file(&paths.ids, base, &client_ids)?;
        if let Some(frames) = &scan.frames {
            segment::write_frames_file(&paths.frames, base, frames)?;
        }
        recovery.rebuilt_indexes.push(paths.index.clone());
    }
    // Commit times: checked by length only (cheap open). A segment sealed by an older
    // version has none; one whose file is inconsistent is judged as if it had none.
    let has_times = match segment::times_file_entries(&paths.times, base)? {
        segment::TimesFile::Entries(n) if n == expected => true,
        segment::TimesFile::Missing => false,
        _ => {
            tracing::warn!(
                file = %paths.times.display(),
                "commit times of a sealed segment are malformed or do not match its events; judging its events by their created_at instead"
            );
            false
        }
    };
    Ok(Segment::sealed(paths, base, expected, has_times))
}

/// Checks every record of the active segment, truncates an interrupted last write and
/// rebuilds the index from what is kept.
fn open_active(
    dir: &Path,
    base: u64,
    is_native: &dyn Fn(&str, u64) -> bool,
    recovery: &mut Recovery,
    cipher: Option<&Cipher>,
    floor: Option<Timestamp>,
) -> Result<(Segment, Arc<ActiveFiles>), StoreError> {
    let paths = SegmentPaths::new(dir, base);
    let scan = segment::scan(&paths.log, base, true, is_native, cipher)?;
    let log = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&paths.log)
        .context(|| format!("opening {}", paths.log.display()))?;
    if let Some(damage) = &scan.tail {
        log.set_len(scan.kept_file_len)
            .and_then(|()| log.sync_all())
            .context(|| format!("truncating {}", paths.log.display()))?;
        let reason = match damage {
            TailDamage::InterruptedWrite { offset, reason } => {
                format!("{reason} at offset {offset}")
            }
            TailDamage::IncompleteBatch { records: 0, .. } => {
                "the last group of blocks is incomplete".to_owned()
            }
            TailDamage::IncompleteBatch { records, .. } => {
                format!("the last batch is incomplete ({records} records without its end)")
            }
        };
        recovery.truncated = Some(Truncation {
            file: paths.log.clone(),
            offset: scan.kept_file_len,
            bytes_dropped: scan.file_len - scan.kept_file_len,
            reason,
        });
    }
    // The active index is derived from the records just checked; rewriting it is cheaper
    // than comparing (8 bytes per event of one segment).
    let index = segment::write_index_file(&paths.index, base, &scan.ends)?;
    // A stale `.ids` (or `.frm`) exists if this segment was sealed before a crash cut its
    // successor's creation short; it is rewritten when the segment is sealed again.
    for stale in [&paths.ids, &paths.frames] {
        match fs::remove_file(stale) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(format!("removing {}", stale.display()), e)),
        }
    }
    let count = scan.ends.len() as u64;
    let (times, recovered) =
        segment::recover_times_file(&paths.times, base, count, floor, Timestamp::now())?;
    if recovered.filled > 0 {
        tracing::warn!(
            file = %paths.times.display(),
            events = recovered.filled,
            dated = %recovered.fill,
            "commit times of the last events were missing (an interrupted write, or a segment written by an older version); dated them by the recovery"
        );
        recovery.commit_times_filled = recovered.filled;
    }
    let files = ActiveFiles { log, index, times };
    let segment = Segment::active(paths, base, count, files, scan.client_ids, scan.frames);
    let files = segment
        .active_files()
        .ok_or_else(|| StoreError::Unusable("active segment has no files".into()))?;
    Ok((segment, files))
}
