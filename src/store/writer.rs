//! The writer thread of a log: the only code that writes its segments.
//!
//! Appends arrive over a bounded channel. The writer takes the first one, then everything
//! else already queued (up to a size limit), and commits them as one group: it assigns
//! positions, ids and one creation time, encodes every record into one buffer, writes it
//! with one call, syncs once according to the fsync policy, pushes the events into the
//! in-memory tail, advances the committed watermark and only then answers each waiter.
//! A thousand concurrent publishers therefore cost one `fdatasync`, not a thousand.
//!
//! Filling groups: right after a sync, the publishers it answered come back with their
//! next appends within microseconds, but the first of them would otherwise start a new
//! sync alone and leave the rest to wait for the one after. So when the policy syncs every
//! group, the writer waits for as many appends as the previous group held, for at most a
//! quarter of the recent sync time (never more than 500 µs). A lone publisher's next
//! append is taken at once; the wait only ever costs a fraction of the sync it shares.
//! The inbox wakes the lingering writer once, when the appends it misses are queued (or
//! at the deadline), not once per append.
//!
//! Batch atomicity on disk: every record of a batch but the last carries the
//! "continues" flag; recovery drops a batch whose last record is missing. A batch with an
//! event too large for a record is refused whole before anything of it is encoded.
//!
//! Commit times: the group's one time (the wall clock, but never earlier than the
//! previous group's, also across restarts) is the `created_at` of its server-dated events
//! and goes into the segment's `.tim` file for every event of the group, client-dated ones
//! included, with one write next to the `.idx` entries. Like `.idx`, `.tim` is synced when
//! the segment is sealed and when the log is closed; recovery makes it whole again.
//!
//! Memory: a group's events are dropped as they are encoded; its stream frames are made
//! once the group is stored, in one buffer of exactly their size (the tail keeps it while
//! it keeps any of the group's events); a buffer that one huge batch made larger than
//! twice the group size is shrunk back after it.
//!
//! Failures: if a write fails (a full disk, say) the segment is truncated back to where
//! the group started, every waiter of the group gets the error, and the next group is
//! tried normally, so publishing resumes when space returns. If a sync fails, or the
//! truncation does, what is on disk is uncertain: the log halts (refuses appends) until a
//! restart recovers it. The writer is a plain thread because every step blocks on the
//! disk; it never blocks the async runtime.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::oneshot;

use super::cipher::FrameEnd;
use super::error::{IoContext, StoreError};
use super::inbox::{Inbox, Taken};
use super::index_files::{index_entry_offset, times_entry_offset};
use super::log_header::LOG_HEADER_LEN;
use super::meta::Meta;
use super::record::{self, RECORD_HEADER_LEN};
use super::segment::{ActiveFiles, Segment};
use super::shared::Shared;
use super::tail::Tail;
use super::{ids, Appended, FsyncPolicy, StoreConfig};
use crate::event::{self, JsonLayout, PendingEvent};
use crate::timestamp::Timestamp;

/// Commands waiting for the writer before `append` calls wait for room.
pub(crate) const INBOX_CAPACITY: usize = 4096;
/// A group is committed once it holds this many (estimated) bytes.
const MAX_GROUP_BYTES: usize = 8 << 20;
/// The writer's reused buffers (records, index entries, …) keep at most this much
/// between groups; a larger one (left by a group larger than [`MAX_GROUP_BYTES`]: one
/// huge batch) is shrunk back.
const KEEP_BUFFER_BYTES: usize = 2 * MAX_GROUP_BYTES;
/// The longest a group waits to fill up.
const MAX_LINGER: Duration = Duration::from_micros(500);
/// With a sync per group, the active segment is kept this far ahead of its records in
/// written zeros (see [`Writer::prepare_space`]).
const SPACE_AHEAD: u64 = 1 << 20;

pub(crate) enum Command {
    Append {
        events: Vec<PendingEvent>,
        reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
    },
    /// Sent by the interval ticker: sync now if anything is unsynced.
    SyncTick,
    /// Commit what came before, sync, mark the log cleanly closed and stop.
    Shutdown {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Tests only: stop taking commands until the sender is dropped, so that a test can
    /// hold appends queued (or the queue full).
    #[cfg(test)]
    Pause {
        paused: oneshot::Sender<()>,
        until: std::sync::mpsc::Receiver<()>,
    },
}

type Reply = oneshot::Sender<Result<Vec<Appended>, StoreError>>;

struct Request {
    events: Vec<PendingEvent>,
    reply: Reply,
}

/// Starts the writer thread (and, for `interval` syncing, its ticker). `last_commit` is
/// the log's last stored commit time, if it has one: commit times go on from it. `meta`
/// is what the log's metadata must say while it runs (no clean end, the id generation of
/// new events); `meta_written` whether the file says so already.
pub(crate) fn start(
    shared: Arc<Shared>,
    meta: Meta,
    meta_written: bool,
    config: &StoreConfig,
    files: Arc<ActiveFiles>,
    lock: File,
    last_commit: Option<Timestamp>,
) -> Result<(Arc<Inbox<Command>>, JoinHandle<()>), StoreError> {
    let active = shared
        .segments
        .read()
        .ok()
        .and_then(|s| s.last().cloned())
        .ok_or_else(|| StoreError::Unusable("log has no active segment".into()))?;
    let disk_len = files
        .log
        .metadata()
        .context(|| format!("reading {}", active.paths.log.display()))?
        .len();
    // An encrypted segment's records are counted in its logical stream, not its file.
    let log_len = match active.frame_ends_in_memory() {
        Some(frames) => frames.last().map_or(LOG_HEADER_LEN, |f| f.logical),
        None => disk_len,
    };
    let writer = Writer {
        generation: meta.current_generation(),
        next: active.base + active.count(),
        count: active.count(),
        log_len,
        disk_len,
        file_len: disk_len,
        active,
        files,
        meta,
        meta_written,
        tail_bytes: config.tail_bytes,
        fsync: config.fsync,
        segment_size: config.segment_size,
        last_created: last_commit.unwrap_or(Timestamp::from_unix_nanos(i64::MIN)),
        unsynced: false,
        last_sync: Instant::now(),
        halted: None,
        lock: Some(lock),
        records: Vec::new(),
        index: Vec::new(),
        times: Vec::new(),
        sealed: Vec::new(),
        frame_ends: Vec::new(),
        sync_time: Duration::ZERO,
        last_group_requests: 0,
        inbox: Arc::new(Inbox::new(INBOX_CAPACITY)),
        shared,
    };
    let inbox = Arc::clone(&writer.inbox);
    let name = format!("bus-writer-{}", writer.shared.namespace);
    let handle = std::thread::Builder::new()
        .name(name)
        .spawn(move || writer.run())
        .context(|| "starting the log writer thread".into())?;
    if let FsyncPolicy::Interval(every) = config.fsync {
        start_ticker(Arc::downgrade(&inbox), every)?;
    }
    Ok((inbox, handle))
}

/// Asks the writer to sync every `every`; ends when the log is closed.
fn start_ticker(inbox: std::sync::Weak<Inbox<Command>>, every: Duration) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name("bus-fsync-ticker".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Some(inbox) = inbox.upgrade() else {
                return;
            };
            if inbox.is_closed() {
                return;
            }
            // A full inbox means the writer is busy and checks the interval itself.
            let _ = inbox.try_send(Command::SyncTick);
        })
        .context(|| "starting the fsync ticker thread".into())?;
    Ok(())
}

struct Writer {
    shared: Arc<Shared>,
    meta: Meta,
    /// Whether the metadata file says what `meta` does. It is written before the first
    /// append, not at start-up: a server that only reads writes nothing (and starts on a
    /// full disk); an append refused for want of space leaves it to the next.
    meta_written: bool,
    /// The in-memory tail's budget of stream frames (`--tail-size`).
    tail_bytes: usize,
    generation: u64,
    fsync: FsyncPolicy,
    segment_size: u64,
    active: Arc<Segment>,
    files: Arc<ActiveFiles>,
    /// Bytes of records in the active segment, header included (for an encrypted segment,
    /// in its logical stream).
    log_len: u64,
    /// Bytes of the active `.log` file in use: where the next group is written.
    disk_len: u64,
    /// The active `.log` file's length (or more, after a failed write): past `disk_len`,
    /// zeros written ahead.
    file_len: u64,
    /// Events in the active segment.
    count: u64,
    /// The next position to assign.
    next: u64,
    /// Commit times (and server-assigned creation times) never go backwards, also across
    /// restarts.
    last_created: Timestamp,
    unsynced: bool,
    last_sync: Instant,
    /// Why the log stopped accepting appends, if it did.
    halted: Option<String>,
    /// Held until the writer stops: the directory's lock.
    lock: Option<File>,
    /// Reused buffers: the group's records, its index entries and its commit times;
    /// encrypted, the frames that seal the records and where they end.
    records: Vec<u8>,
    index: Vec<u8>,
    times: Vec<u8>,
    sealed: Vec<u8>,
    frame_ends: Vec<FrameEnd>,
    /// Moving average of recent sync durations.
    sync_time: Duration,
    /// Append requests answered by the previous group.
    last_group_requests: usize,
    inbox: Arc<Inbox<Command>>,
}

impl Writer {
    fn run(mut self) {
        let mut commands = Vec::new();
        let mut group: Vec<Request> = Vec::new();
        loop {
            if self.inbox.take(&mut commands, None) == Taken::Closed {
                // Every handle is gone: close as if asked to.
                if let Err(e) = self.close() {
                    tracing::error!(namespace = %self.shared.namespace, error = %e, "closing log failed");
                }
                return;
            }
            self.linger(&mut commands);
            let mut tick = false;
            let mut group_bytes = 0;
            for command in commands.drain(..) {
                match command {
                    Command::Append { events, reply } => {
                        group_bytes += events
                            .iter()
                            .map(PendingEvent::encoded_len_hint)
                            .sum::<usize>();
                        group.push(Request { events, reply });
                        if group_bytes >= MAX_GROUP_BYTES {
                            self.commit(&mut group);
                            group_bytes = 0;
                        }
                    }
                    Command::SyncTick => tick = true,
                    #[cfg(test)]
                    Command::Pause { paused, until } => {
                        let _ = paused.send(());
                        let _ = until.recv();
                    }
                    Command::Shutdown { reply } => {
                        self.commit(&mut group);
                        let result = self.close();
                        // Whatever was queued behind the shutdown is refused: dropping
                        // its reply channel tells its caller the log is closed.
                        self.inbox.close();
                        let _ = reply.send(result);
                        return;
                    }
                }
            }
            self.commit(&mut group);
            if tick && self.unsynced {
                self.sync();
            }
        }
    }

    /// Waits briefly for the group to fill up (see the module docs).
    fn linger(&self, commands: &mut Vec<Command>) {
        if self.fsync != FsyncPolicy::Always || self.sync_time.is_zero() {
            return;
        }
        let appends = |commands: &[Command]| {
            commands
                .iter()
                .filter(|c| matches!(c, Command::Append { .. }))
                .count()
        };
        let deadline = Instant::now() + (self.sync_time / 4).min(MAX_LINGER);
        while appends(commands) < self.last_group_requests {
            // Woken once, when the missing appends are queued (or at the deadline), not
            // by each of them.
            let missing = self.last_group_requests - appends(commands);
            match self.inbox.take_at_least(commands, missing, Some(deadline)) {
                Taken::Items(_) => {}
                Taken::TimedOut | Taken::Closed => return,
            }
        }
    }

    fn commit(&mut self, group: &mut Vec<Request>) {
        if group.is_empty() {
            return;
        }
        self.commit_group(group);
        // One huge batch must not leave its buffers that large for ever.
        for buffer in [
            &mut self.records,
            &mut self.index,
            &mut self.times,
            &mut self.sealed,
        ] {
            if buffer.capacity() > KEEP_BUFFER_BYTES {
                buffer.clear();
                buffer.shrink_to(MAX_GROUP_BYTES);
            }
        }
    }

    fn commit_group(&mut self, group: &mut Vec<Request>) {
        self.last_group_requests = group.len();
        if let Some(cause) = &self.halted {
            for request in group.drain(..) {
                let _ = request.reply.send(Err(StoreError::Halted {
                    namespace: self.shared.namespace.clone(),
                    cause: cause.clone(),
                }));
            }
            return;
        }
        if self.disk_len >= self.segment_size && self.count > 0 {
            if let Err(e) = self.roll() {
                self.halt(&e.to_string());
                fail_all(group.drain(..).map(|r| r.reply), &e);
                return;
            }
        }

        let created = Timestamp::now().max(self.last_created);
        self.last_created = created;
        let created_text = created.format();
        let commit_time = created.unix_nanos().to_le_bytes();
        self.records.clear();
        self.index.clear();
        self.times.clear();
        let group_events: usize = group.iter().map(|r| r.events.len()).sum();
        self.index.reserve(group_events * 8);
        self.times.reserve(group_events * 8);
        // (position, start of its JSON in `records`, layout of its JSON) per event of the
        // group; the frames are made once the group is stored (see below).
        let mut spans: Vec<(u64, usize, JsonLayout)> = Vec::with_capacity(group_events);
        let mut frames_len = 0;
        let mut client_ids: Vec<(u64, u64)> = Vec::new();
        let mut claimed: HashSet<Box<str>> = HashSet::new();
        let mut accepted: Vec<(Reply, Vec<Appended>)> = Vec::with_capacity(group.len());
        let mut position = self.next;

        for Request { events, reply } in group.drain(..) {
            let checked = check_sizes(&events, position)
                .and_then(|()| self.check_client_ids(&events, &claimed));
            if let Err(e) = checked {
                let _ = reply.send(Err(e));
                continue;
            }
            let mut appended = Vec::with_capacity(events.len());
            let last = events.len() - 1;
            // Each event is dropped once it is encoded: a large batch is not held in
            // both forms.
            for (i, pending) in events.into_iter().enumerate() {
                let id = match pending.client_id() {
                    Some(id) => {
                        client_ids.push((ids::hash(id), position));
                        claimed.insert(id.into());
                        id.to_owned()
                    }
                    None => ids::text(self.generation, position),
                };
                let created_at = pending.created_at.unwrap_or(created);
                let created_at_text = match pending.created_at {
                    Some(t) => t.format(),
                    None => created_text,
                };
                let start = record::begin_record(&mut self.records);
                let layout =
                    pending.write_json(&mut self.records, &id, &created_at_text, position as i64);
                record::finish_record(&mut self.records, start, i < last);
                let end = self.log_len + self.records.len() as u64;
                self.index.extend_from_slice(&end.to_le_bytes());
                self.times.extend_from_slice(&commit_time);

                let json_start = start + RECORD_HEADER_LEN as usize;
                frames_len += event::sse_frame_len(&id, &self.records[json_start..]);
                spans.push((position, json_start, layout));
                appended.push(Appended {
                    position,
                    id,
                    created_at,
                });
                position += 1;
            }
            accepted.push((reply, appended));
        }
        if accepted.is_empty() {
            return;
        }

        if !self.meta_written {
            // A crash from now on must be seen as one by the next start.
            if let Err(e) = self.meta.write(&self.shared.dir) {
                fail_all(accepted.into_iter().map(|(reply, _)| reply), &e);
                return;
            }
            self.meta_written = true;
        }
        if let Err(e) = self.write_group() {
            self.undo_group(&e.to_string());
            fail_all(accepted.into_iter().map(|(reply, _)| reply), &e);
            return;
        }
        if self.fsync == FsyncPolicy::Always
            || matches!(self.fsync, FsyncPolicy::Interval(every) if self.last_sync.elapsed() >= every)
        {
            if let Err(e) = self.sync_log() {
                let cause = e.to_string();
                self.undo_group(&cause);
                self.halt(&cause);
                fail_all(accepted.into_iter().map(|(reply, _)| reply), &e);
                return;
            }
        } else {
            self.unsynced = true;
        }

        let added = position - self.next;
        self.shared.group_events.observe(added);
        self.count += added;
        self.log_len += self.records.len() as u64;
        if self.shared.cipher.is_some() {
            self.disk_len += self.sealed.len() as u64;
            self.active.add_frames(&self.frame_ends);
        } else {
            self.disk_len = self.log_len;
        }
        self.active.add_committed(added, client_ids);
        // The stream frames of the group, in one buffer of exactly their size: the tail
        // keeps that buffer for as long as it keeps any of its events. The tail keeps the
        // newest events whose frames fit in its budget, so when the group alone is larger
        // its older events get no frames at all (they would be dropped at once, and their
        // part of the buffer kept with the rest).
        let json_end = |spans: &[(u64, usize, JsonLayout)], i: usize| {
            spans.get(i + 1).map_or(self.records.len(), |next| {
                next.1 - RECORD_HEADER_LEN as usize
            })
        };
        let mut skip = 0;
        while frames_len > self.tail_bytes && skip < spans.len() {
            let json = &self.records[spans[skip].1..json_end(&spans, skip)];
            frames_len -= event::sse_frame_len("", json) + spans[skip].2.id.len();
            skip += 1;
        }
        spans.drain(..skip);
        let mut frames = BytesMut::with_capacity(frames_len);
        let appended = accepted.iter().flat_map(|(_, appended)| appended);
        for (i, appended) in appended.skip(skip).enumerate() {
            let json = spans[i].1..json_end(&spans, i);
            spans[i].1 = frames.len();
            event::push_sse_frame(&mut frames, &appended.id, &self.records[json]);
        }
        let events = event::split_frames(frames.freeze(), spans);
        if let Ok(mut tail) = self.shared.tail.write() {
            if skip > 0 {
                // The group alone fills the tail: whatever it held is dropped anyway.
                *tail = Tail::new(self.next + skip as u64, self.tail_bytes);
            }
            tail.extend(events);
        }
        self.next = position;
        self.shared.publish(position);
        for (reply, appended) in accepted {
            let _ = reply.send(Ok(appended));
        }
    }

    /// Rejects a batch whose client-supplied ids exist already, repeat one another or
    /// could collide with server-assigned ids.
    fn check_client_ids(
        &self,
        events: &[PendingEvent],
        claimed: &HashSet<Box<str>>,
    ) -> Result<(), StoreError> {
        let mut in_batch = HashSet::new();
        for id in events.iter().filter_map(PendingEvent::client_id) {
            if !in_batch.insert(id) || claimed.contains(id) {
                return Err(StoreError::DuplicateId(id.to_owned()));
            }
            match self.shared.find_native_id(id, self.next) {
                Some(Some(_)) => return Err(StoreError::DuplicateId(id.to_owned())),
                Some(None) => return Err(StoreError::ReservedId(id.to_owned())),
                None => {}
            }
            if self.shared.find_id(id, self.next)?.is_some() {
                return Err(StoreError::DuplicateId(id.to_owned()));
            }
        }
        Ok(())
    }

    fn write_group(&mut self) -> Result<(), StoreError> {
        let bytes = match &self.shared.cipher {
            None => &self.records,
            Some(cipher) => {
                self.sealed.clear();
                self.frame_ends.clear();
                cipher.seal(
                    self.active.base,
                    self.log_len,
                    &self.records,
                    self.disk_len,
                    &mut self.sealed,
                    &mut self.frame_ends,
                )?;
                &self.sealed
            }
        };
        let end = self.disk_len + bytes.len() as u64;
        self.files
            .log
            .write_all_at(bytes, self.disk_len)
            .context(|| format!("writing {}", self.active.paths.log.display()))?;
        self.file_len = self.file_len.max(end);
        if self.fsync == FsyncPolicy::Always {
            self.prepare_space(end)?;
        }
        self.files
            .index
            .write_all_at(&self.index, index_entry_offset(self.count))
            .context(|| format!("writing {}", self.active.paths.index.display()))?;
        self.files
            .times
            .write_all_at(&self.times, times_entry_offset(self.count))
            .context(|| format!("writing {}", self.active.paths.times.display()))
    }

    /// Keeps written zeros at least half of [`SPACE_AHEAD`] past `end`, the end of the
    /// group just written.
    ///
    /// Syncing a write that grows the file also commits the file's new size to the
    /// filesystem's journal; syncing a write into blocks that were written before does
    /// not, and takes about half as long (measured in BENCHMARKS.md). When every group is
    /// synced, that halves the wait of every publisher. The zeros are never mistaken for
    /// records (a zero record header fails its checksum): recovery cuts them off like the
    /// tail of an interrupted write, and sealing or closing the segment trims them first.
    fn prepare_space(&mut self, end: u64) -> Result<(), StoreError> {
        if self.file_len >= end + SPACE_AHEAD / 2 {
            return Ok(());
        }
        let zeros = vec![0u8; (end + SPACE_AHEAD - self.file_len) as usize];
        let written = self.files.log.write_all_at(&zeros, self.file_len);
        // Past `end` the file may now hold some of the zeros: trimming must cut them all.
        self.file_len = end + SPACE_AHEAD;
        if let Err(e) = written {
            // Only an optimisation: a disk too full for it may still take the records.
            // Cut back to the end of the group just written, which is not committed yet
            // (`disk_len` is still where it starts).
            tracing::debug!(file = %self.active.paths.log.display(), error = %e, "preparing space failed");
            if self.trim_prepared_space(end).is_err() {
                return Err(StoreError::io(
                    format!("preparing space in {}", self.active.paths.log.display()),
                    e,
                ));
            }
        }
        Ok(())
    }

    /// Cuts the active segment's file back to `records_end`, where its records end.
    fn trim_prepared_space(&mut self, records_end: u64) -> Result<(), StoreError> {
        if self.file_len > records_end {
            self.files
                .log
                .set_len(records_end)
                .context(|| format!("trimming {}", self.active.paths.log.display()))?;
            self.file_len = records_end;
        }
        Ok(())
    }

    /// Cuts the segment back to where the failed group started, so that nothing of it
    /// survives; halts if even that fails.
    fn undo_group(&mut self, cause: &str) {
        self.file_len = self.disk_len;
        let undo = self.files.log.set_len(self.disk_len).and_then(|()| {
            self.files.index.set_len(index_entry_offset(self.count))?;
            self.files.times.set_len(times_entry_offset(self.count))
        });
        if let Err(e) = undo {
            self.halt(&format!(
                "{cause}; then truncating the failed write failed: {e}"
            ));
        }
        tracing::error!(namespace = %self.shared.namespace, error = cause, "append failed");
    }

    fn sync_log(&mut self) -> Result<(), StoreError> {
        let started = Instant::now();
        self.files
            .log
            .sync_data()
            .context(|| format!("syncing {}", self.active.paths.log.display()))?;
        self.unsynced = false;
        self.last_sync = Instant::now();
        let took = self.last_sync - started;
        self.sync_time = if self.sync_time.is_zero() {
            took
        } else {
            (self.sync_time * 7 + took) / 8
        };
        self.shared.sync_micros.observe_duration(took);
        Ok(())
    }

    /// A sync outside a commit (interval policy). Acknowledged events are already
    /// visible; if they cannot be synced, stop taking more.
    fn sync(&mut self) {
        if let Err(e) = self.sync_log() {
            self.halt(&e.to_string());
        }
    }

    fn halt(&mut self, cause: &str) {
        tracing::error!(namespace = %self.shared.namespace, cause, "log halted: appends are refused until restart");
        self.halted = Some(cause.to_owned());
        let _ = self.shared.halted.set(cause.to_owned());
    }

    /// Seals the active segment and starts the next one.
    fn roll(&mut self) -> Result<(), StoreError> {
        self.trim_prepared_space(self.disk_len)?;
        self.sync_log()?;
        self.sync_indexes()?;
        self.active.seal()?;
        let encrypted = self.shared.cipher.is_some();
        let segment = Arc::new(Segment::create(&self.shared.dir, self.next, encrypted)?);
        let files = segment
            .active_files()
            .ok_or_else(|| StoreError::Unusable("new segment has no files".into()))?;
        self.shared
            .segments
            .write()
            .map_err(|_| StoreError::Unusable("segment list lock poisoned".into()))?
            .push(Arc::clone(&segment));
        tracing::debug!(namespace = %self.shared.namespace, base = self.next, "started a new segment");
        self.active = segment;
        self.files = files;
        self.log_len = LOG_HEADER_LEN;
        self.disk_len = LOG_HEADER_LEN;
        self.file_len = LOG_HEADER_LEN;
        self.count = 0;
        Ok(())
    }

    /// Syncs the active segment's `.idx` and `.tim` files (when it is sealed, and at close).
    fn sync_indexes(&self) -> Result<(), StoreError> {
        let paths = &self.active.paths;
        self.files
            .index
            .sync_data()
            .context(|| format!("syncing {}", paths.index.display()))?;
        self.files
            .times
            .sync_data()
            .context(|| format!("syncing {}", paths.times.display()))
    }

    /// Syncs and records a clean shutdown (unless halted: then the next open must recover).
    fn close(&mut self) -> Result<(), StoreError> {
        let result = if self.halted.is_some() {
            Ok(())
        } else {
            self.trim_prepared_space(self.disk_len)
                .and_then(|()| self.sync_log())
                .and_then(|()| self.sync_indexes())
                .and_then(|()| {
                    if !self.meta_written {
                        // Nothing was appended: the file still says what it said at
                        // start-up, which the next start reads the same way.
                        return Ok(());
                    }
                    let mut meta = self.meta.clone();
                    meta.clean_end = Some(self.next);
                    meta.write(&self.shared.dir)
                })
        };
        drop(self.lock.take());
        result
    }
}

/// Refuses a batch with an event whose record would be larger than the framing can
/// express (`position` is the first event's), before anything of it is encoded.
fn check_sizes(events: &[PendingEvent], position: u64) -> Result<(), StoreError> {
    for (i, pending) in events.iter().enumerate() {
        let id_len = pending.client_id().map_or(ids::NATIVE_ID_LEN, str::len);
        let index = i64::try_from(position + i as u64).unwrap_or(i64::MAX);
        record::check_body_len(pending.json_len(id_len, index))?;
    }
    Ok(())
}

fn fail_all(replies: impl Iterator<Item = Reply>, error: &StoreError) {
    for reply in replies {
        let _ = reply.send(Err(error.copy()));
    }
}
