//! One namespace's log: its handle ([`Log`]), which opens it, appends to it, reads it,
//! finds events by id or time and closes it; the rest of the server reaches it as an
//! [`EventLog`].
//!
//! Opening takes the directory's lock (one process per log), reads `meta.json`, checks the
//! sealed segments cheaply and reads every record of the active segment (see
//! [`super::recovery`]). If the previous process did not close the log cleanly, a new id
//! generation starts (see [`ids`]). Then the writer thread starts (see [`super::writer`]):
//! appends go to it. Reads and lookups go to the state the readers share with the writer
//! (see [`super::shared`]); deleting old segments is [`super::retention`].
//!
//! Reads never pass the committed watermark. Recent events come from the in-memory tail;
//! older ones from the segment files, one index read and one data read per chunk.
//!
//! Time: every event has a commit time, the server's own (see the `.tim` file in
//! [`super::index_files`]), which never decreases along the log. Retention by age judges a
//! sealed segment by its last event's commit time, and [`Log::first_committed_at_or_after`]
//! (behind `start_time`) is a binary search over the segments' last commit times, then
//! over the commit times of one segment: O(log n) 8-byte reads. A client-supplied
//! `created_at` (publishers may set one, `bus restore` does) plays no part in either.
//! Recovery keeps the active segment's `.tim` parallel to its records (see
//! [`super::recovery`]). Sealed segments written by versions before `.tim` existed have
//! none, and nothing is migrated (that would read whole segments): for them the
//! `created_at` of their events stands in, as it did in those versions — a segment's
//! newest event for retention, the events' own times for the search.

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};

use super::api::{
    Appended, BoxFuture, CommitTimings, ErrorKind, EventLog, KeyedEvent, LogStats, StorageError,
    StorageUsage,
};
use super::error::{IoContext, StoreError};
use super::inbox::Inbox;
use super::meta::{Generation, Meta};
use super::recovery::{check_key, open_segments, take_lock};
pub use super::recovery::{Recovery, Truncation};
use super::retention;
use super::segment;
use super::shared::{Shared, READ_CHUNK_BYTES};
use super::writer::{self, Command};
use super::{ids, Cipher, StoreConfig};
use crate::event::{JsonLayout, PendingEvent, StoredEvent};
use crate::metrics::Histogram;
use crate::timestamp::Timestamp;

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
                        id: ids::random_generation(),
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
                let candidate = ids::random_generation();
                if meta.generation_range(candidate).is_none() {
                    break candidate;
                }
            };
            meta.start_generation(generation, next);
        }
        // Written by the writer before its first append (see there), not now: opening a
        // log to read it writes nothing.
        meta.clean_end = None;

        let shared = Arc::new(Shared::new(
            namespace,
            dir.to_owned(),
            meta.clone(),
            config.cipher.clone(),
            segments,
            config.tail_bytes,
            next,
        ));
        let last_commit = shared.last_commit_time()?;
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
        retention::enforce_retention(&self.shared, max_age, max_bytes)
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
        self.shared.watch_committed()
    }

    pub fn stats(&self) -> LogStats {
        LogStats {
            events: self.committed(),
            groups: self.shared.group_events.count(),
            syncs: self.shared.sync_micros.count(),
            disk_reads: self.shared.disk_reads(),
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
            let Some(key) = layout.key_within(json, max_key_len) else {
                return;
            };
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

    fn usage(&self) -> Result<StorageUsage, StorageError> {
        let bytes = self.disk_bytes().map_err(|e| {
            StorageError::new(
                ErrorKind::Internal,
                format!("measuring the log of {}: {e}", self.namespace()),
            )
        })?;
        // Retention removes whole segments from the front, so the positions in between
        // are all kept.
        let events = EventLog::committed(self).saturating_sub(EventLog::first_position(self));
        Ok(StorageUsage {
            events,
            bytes,
            segments: Some(self.segment_count() as u64),
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
