//! Segments: the unit a namespace's log is stored in, and reading them.
//!
//! A log is a sequence of segments, each named by the position of its first event
//! (`00000000000000000000.log`, 20 digits so that names sort like numbers), each a set of
//! files ([`SegmentPaths`]):
//!
//! - `.log` — a 24-byte header ([`super::log_header`]), then records ([`super::record`]),
//!   sealed in frames if the log is encrypted ([`super::cipher`]). The active
//!   segment's file may end in zeros that the writer prepared ahead of its records; they
//!   are not records (a zero header fails its CRC) and are trimmed before sealing.
//! - `.idx` (where each record ends), `.tim` (commit times), `.ids` (client-supplied ids,
//!   once sealed) and `.frm` (frame ends of an encrypted segment, once sealed): see
//!   [`super::index_files`].
//!
//! This module owns [`Segment`], one segment as the readers and the writer share it: its
//! event count, its open files while active, its id index, its frame map; reading events
//! by position (one index read, one data read, every record checked), commit times, id
//! candidates, sealing and deleting it. Reading a whole segment to recover it is
//! [`super::scan`].
//!
//! All writes are by the log's writer thread; this module reads and checks a segment's
//! bytes, and creates, seals and deletes its files when told to; it does not decide when
//! to sync.
//!
//! A sealed segment never changes and holds no open file: it is opened per read, so a
//! large log does not exhaust file descriptors. Every record read is checked against its
//! CRC; damage is reported with the file and byte offset, never skipped.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use bytes::BytesMut;

use super::cipher::{self, Cipher, FrameEnd};
use super::error::{IoContext, StoreError};
use super::index_files::{
    index_header, read_frames_file, times_entry_offset, times_header, write_frames_file,
    write_ids_file, SealedIds, INDEX_ENTRY_LEN, INDEX_HEADER_LEN, TIMES_ENTRY_LEN,
};
use super::log_header::{log_header, LOG_HEADER_LEN};
use super::meta::sync_dir;
use super::record::{check_record, RecordCheck, RECORD_HEADER_LEN};
use crate::event::{self, JsonLayout, StoredEvent};
use crate::timestamp::Timestamp;

/// The largest record body, at the path where code outside the store finds it.
pub use super::record::MAX_BODY_LEN;

/// Reads of an encrypted segment spanning at least this many blocks open them on two
/// threads.
const PARALLEL_OPEN_MIN_BLOCKS: usize = 32;

/// The files of a segment.
#[derive(Debug, Clone)]
pub struct SegmentPaths {
    pub log: PathBuf,
    pub index: PathBuf,
    /// Commit times (absent in segments written by older versions).
    pub times: PathBuf,
    pub ids: PathBuf,
    /// Encrypted segments only, once sealed.
    pub frames: PathBuf,
}

impl SegmentPaths {
    pub fn new(dir: &Path, base: u64) -> SegmentPaths {
        SegmentPaths {
            log: dir.join(format!("{base:020}.log")),
            index: dir.join(format!("{base:020}.idx")),
            times: dir.join(format!("{base:020}.tim")),
            ids: dir.join(format!("{base:020}.ids")),
            frames: dir.join(format!("{base:020}.frm")),
        }
    }
}

/// Base positions of the segments in `dir`, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut bases = Vec::new();
    let entries = fs::read_dir(dir).context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(base) = stem.parse() {
                bases.push(base);
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// One segment of a log, as the readers and the writer share it.
#[derive(Debug)]
pub struct Segment {
    pub base: u64,
    pub paths: SegmentPaths,
    /// Committed events in the segment. Readers never look past the log's committed
    /// watermark, so for them this only grows.
    count: AtomicU64,
    /// Open files while the segment is active; `None` once sealed.
    active: RwLock<Option<Arc<ActiveFiles>>>,
    /// Client-supplied ids of the active segment as (hash, position); `None` once sealed,
    /// when they live in the `.ids` file.
    live_ids: RwLock<Option<BTreeSet<(u64, u64)>>>,
    /// The `.ids` file of a sealed segment, once a lookup needed it.
    sealed_ids: OnceLock<SealedIds>,
    /// Of an encrypted segment: where its frames end. The writer extends it for the
    /// active segment; a sealed one's is loaded from its `.frm` file on first read.
    frames: RwLock<Option<Arc<Vec<FrameEnd>>>>,
    /// Whether the segment has a `.tim` file with an entry per event: always for segments
    /// this version writes, not for those sealed by older versions.
    has_times: bool,
    /// The last commit time of a sealed segment, once read.
    last_time: OnceLock<Timestamp>,
}

#[derive(Debug)]
pub struct ActiveFiles {
    pub log: File,
    pub index: File,
    pub times: File,
}

impl Segment {
    /// Creates the files of a new, empty segment and syncs them into the directory.
    pub fn create(dir: &Path, base: u64, encrypted: bool) -> Result<Segment, StoreError> {
        let paths = SegmentPaths::new(dir, base);
        let log = create_with_header(&paths.log, &log_header(base, encrypted))?;
        let index = create_with_header(&paths.index, &index_header(base))?;
        let times = create_with_header(&paths.times, &times_header(base))?;
        sync_dir(dir)?;
        Ok(Segment {
            base,
            paths,
            count: AtomicU64::new(0),
            active: RwLock::new(Some(Arc::new(ActiveFiles { log, index, times }))),
            live_ids: RwLock::new(Some(BTreeSet::new())),
            sealed_ids: OnceLock::new(),
            frames: RwLock::new(encrypted.then(|| Arc::new(Vec::new()))),
            has_times: true,
            last_time: OnceLock::new(),
        })
    }

    /// A sealed segment of `count` events whose files are known to be consistent;
    /// `has_times` if its `.tim` file holds an entry per event.
    pub fn sealed(paths: SegmentPaths, base: u64, count: u64, has_times: bool) -> Segment {
        Segment {
            base,
            paths,
            count: AtomicU64::new(count),
            active: RwLock::new(None),
            live_ids: RwLock::new(None),
            sealed_ids: OnceLock::new(),
            frames: RwLock::new(None),
            has_times,
            last_time: OnceLock::new(),
        }
    }

    /// An active segment whose files were just checked (and, if needed, repaired);
    /// `frames` for an encrypted one.
    pub fn active(
        paths: SegmentPaths,
        base: u64,
        count: u64,
        files: ActiveFiles,
        live_ids: BTreeSet<(u64, u64)>,
        frames: Option<Vec<FrameEnd>>,
    ) -> Segment {
        Segment {
            base,
            paths,
            count: AtomicU64::new(count),
            active: RwLock::new(Some(Arc::new(files))),
            live_ids: RwLock::new(Some(live_ids)),
            sealed_ids: OnceLock::new(),
            frames: RwLock::new(frames.map(Arc::new)),
            has_times: true,
            last_time: OnceLock::new(),
        }
    }

    /// Adds frames the writer has just written (before their events are committed).
    pub fn add_frames(&self, new: &[FrameEnd]) {
        if let Ok(mut frames) = self.frames.write() {
            if let Some(frames) = frames.as_mut() {
                Arc::make_mut(frames).extend_from_slice(new);
            }
        }
    }

    /// The frame ends held in memory (those of an encrypted active segment).
    pub fn frame_ends_in_memory(&self) -> Option<Arc<Vec<FrameEnd>>> {
        self.frames.read().ok().and_then(|f| f.clone())
    }

    /// The frame ends of an encrypted segment, loading a sealed one's `.frm` file.
    fn frame_ends(&self) -> Result<Arc<Vec<FrameEnd>>, StoreError> {
        if let Some(frames) = self.frame_ends_in_memory() {
            return Ok(frames);
        }
        let loaded = Arc::new(read_frames_file(&self.paths.frames, self.base).ok_or_else(
            || StoreError::corrupt(&self.paths.frames, 0, "block map is missing or malformed"),
        )?);
        if let Ok(mut frames) = self.frames.write() {
            *frames = Some(Arc::clone(&loaded));
        }
        Ok(loaded)
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Called by the writer once new events are written (before they are published).
    pub fn add_committed(&self, events: u64, ids: impl IntoIterator<Item = (u64, u64)>) {
        if let Ok(mut live) = self.live_ids.write() {
            if let Some(set) = live.as_mut() {
                set.extend(ids);
            }
        }
        self.count.fetch_add(events, Ordering::Release);
    }

    /// The writer's handles of an active segment.
    pub fn active_files(&self) -> Option<Arc<ActiveFiles>> {
        self.active.read().ok().and_then(|a| a.clone())
    }

    /// Marks the segment sealed: writes its `.ids` file and drops its open files. The
    /// caller has synced the `.log` and `.idx` files.
    pub fn seal(&self) -> Result<(), StoreError> {
        let ids: Vec<(u64, u64)> = match self.live_ids.read() {
            Ok(live) => live.iter().flatten().copied().collect(),
            Err(_) => return Err(StoreError::Unusable("id index lock poisoned".into())),
        };
        write_ids_file(&self.paths.ids, self.base, &ids)?;
        if let Some(frames) = self.frame_ends_in_memory() {
            write_frames_file(&self.paths.frames, self.base, &frames)?;
        }
        if let Ok(mut live) = self.live_ids.write() {
            *live = None;
        }
        if let Ok(mut active) = self.active.write() {
            *active = None;
        }
        Ok(())
    }

    /// When the event at `position` (committed, in this segment) was committed; `None` if
    /// the segment has no commit times (written by an older version). One 8-byte read
    /// (none for the last event of a sealed segment once it was read).
    pub fn commit_time(&self, position: u64) -> Result<Option<Timestamp>, StoreError> {
        if !self.has_times {
            return Ok(None);
        }
        let sealed_last = self.base + self.count() == position + 1 && !self.is_active();
        if sealed_last {
            if let Some(&time) = self.last_time.get() {
                return Ok(Some(time));
            }
        }
        let mut raw = [0u8; TIMES_ENTRY_LEN as usize];
        self.file(Part::Times)?
            .get()
            .read_exact_at(&mut raw, times_entry_offset(position - self.base))
            .context(|| format!("reading {}", self.paths.times.display()))?;
        let time = Timestamp::from_unix_nanos(i64::from_le_bytes(raw));
        if sealed_last {
            let _ = self.last_time.set(time);
        }
        Ok(Some(time))
    }

    /// When the segment's last event was committed: `Ok(None)` if it is empty or has no
    /// commit times.
    pub fn last_commit_time(&self) -> Result<Option<Timestamp>, StoreError> {
        match self.count() {
            0 => Ok(None),
            count => self.commit_time(self.base + count - 1),
        }
    }

    fn is_active(&self) -> bool {
        self.active.read().is_ok_and(|a| a.is_some())
    }

    /// Bytes of the segment's files on disk.
    pub fn disk_bytes(&self) -> u64 {
        let paths = &self.paths;
        [
            &paths.log,
            &paths.index,
            &paths.times,
            &paths.ids,
            &paths.frames,
        ]
        .into_iter()
        .filter_map(|path| fs::metadata(path).ok())
        .map(|m| m.len())
        .sum()
    }

    /// Deletes a sealed segment's files (retention); readers that still hold it get a
    /// not-found error on their next read.
    pub fn remove_files(&self) -> Result<(), StoreError> {
        // The log file last: a segment whose .log exists is never half deleted.
        for path in [
            &self.paths.index,
            &self.paths.times,
            &self.paths.ids,
            &self.paths.frames,
            &self.paths.log,
        ] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(format!("removing {}", path.display()), e)),
            }
        }
        let dir = self.paths.log.parent().unwrap_or(Path::new("."));
        sync_dir(dir)
    }

    /// One of the segment's files: the active segment's open handle, or the file opened
    /// for this read of a sealed segment.
    fn file(&self, part: Part) -> Result<Handle, StoreError> {
        if let Some(files) = self.active_files() {
            return Ok(Handle::Active(files, part));
        }
        let path = match part {
            Part::Log => &self.paths.log,
            Part::Index => &self.paths.index,
            Part::Times => &self.paths.times,
        };
        File::open(path)
            .map(Handle::Opened)
            .context(|| format!("opening {}", path.display()))
    }

    /// End offsets of records `from - 1 ..= until - 1`, with the header length standing in
    /// for the record before the segment's first: the byte range of events `from..until`
    /// is `ends[0]..ends[until - from]`.
    fn record_bounds(&self, from: u64, until: u64) -> Result<Vec<u64>, StoreError> {
        let index = self.file(Part::Index)?;
        let (first_entry, mut bounds) = if from == self.base {
            (0, vec![LOG_HEADER_LEN])
        } else {
            (from - self.base - 1, Vec::new())
        };
        let entries = until - self.base - first_entry;
        let mut raw = vec![0u8; (entries * INDEX_ENTRY_LEN) as usize];
        index
            .get()
            .read_exact_at(&mut raw, INDEX_HEADER_LEN + first_entry * INDEX_ENTRY_LEN)
            .context(|| format!("reading {}", self.paths.index.display()))?;
        bounds.extend(
            raw.chunks_exact(INDEX_ENTRY_LEN as usize)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())),
        );
        Ok(bounds)
    }

    /// Reads events `from..until` (all committed, all in this segment), stopping early
    /// after `max_bytes` of records (but always reading at least one event).
    ///
    /// The events' frames share one buffer: a reader streaming them releases it as a
    /// whole. One that keeps a few of them for long copies those out
    /// ([`StoredEvent::detached`]), so as not to keep the whole read alive.
    pub fn read(
        &self,
        from: u64,
        until: u64,
        max_bytes: u64,
        cipher: Option<&Cipher>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut frames = BytesMut::new();
        let mut spans = Vec::new();
        self.visit(from, until, max_bytes, cipher, |position, json, layout| {
            let id = std::str::from_utf8(&json[layout.id.clone()]).map_err(|_| "id is not text")?;
            if frames.is_empty() {
                frames.reserve(json.len() * 4);
            }
            let frame_start = frames.len();
            event::push_sse_frame(&mut frames, id, json);
            spans.push((position, frame_start, layout));
            Ok(())
        })?;
        Ok(event::split_frames(frames.freeze(), spans))
    }

    /// Calls `visit` with the position, JSON and layout of events `from..until` (all
    /// committed, all in this segment), each checked, stopping early after `max_bytes` of
    /// records (but always visiting at least one event). Returns the next position.
    pub fn visit(
        &self,
        from: u64,
        until: u64,
        max_bytes: u64,
        cipher: Option<&Cipher>,
        mut visit: impl FnMut(u64, &[u8], JsonLayout) -> Result<(), &'static str>,
    ) -> Result<u64, StoreError> {
        debug_assert!(self.base <= from && from < until && until <= self.base + self.count());
        let mut bounds = self.record_bounds(from, until)?;
        let start = bounds[0];
        let keep = bounds
            .partition_point(|&end| end - start <= max_bytes)
            .max(2);
        bounds.truncate(keep);
        let end = bounds[bounds.len() - 1];
        if end < start {
            return Err(StoreError::corrupt(
                &self.paths.index,
                0,
                format!("index entries for positions {from}.. are not increasing"),
            ));
        }
        let buf = match cipher {
            None => {
                let mut buf = vec![0u8; (end - start) as usize];
                self.file(Part::Log)?
                    .get()
                    .read_exact_at(&mut buf, start)
                    .context(|| format!("reading {}", self.paths.log.display()))?;
                buf
            }
            Some(cipher) => self.read_sealed(cipher, start, end)?,
        };

        for (i, pair) in bounds.windows(2).enumerate() {
            let (rec_start, rec_end) = ((pair[0] - start) as usize, (pair[1] - start) as usize);
            let offset = pair[0];
            let damaged = |reason: &str| StoreError::corrupt(&self.paths.log, offset, reason);
            let record = buf
                .get(rec_start..rec_end)
                .ok_or_else(|| damaged("index points outside the segment"))?;
            let body_len = match check_record(record) {
                RecordCheck::Valid { body_len, .. } => body_len,
                RecordCheck::Truncated => return Err(damaged("record is cut short")),
                RecordCheck::Damaged => return Err(damaged("record checksum mismatch")),
            };
            if RECORD_HEADER_LEN as usize + body_len != record.len() {
                return Err(damaged("record length disagrees with the index"));
            }
            let json = &record[RECORD_HEADER_LEN as usize..];
            let layout =
                JsonLayout::parse(json).ok_or_else(|| damaged("record is not an event"))?;
            visit(from + i as u64, json, layout)
                .map_err(|reason| damaged(&format!("record is not an event: {reason}")))?;
        }
        Ok(from + bounds.len() as u64 - 1)
    }

    /// The logical bytes `start..end` of an encrypted segment: one read of the frames that
    /// hold them, each opened and checked.
    fn read_sealed(&self, cipher: &Cipher, start: u64, end: u64) -> Result<Vec<u8>, StoreError> {
        let frames = self.frame_ends()?;
        let first = frames.partition_point(|f| f.logical <= start);
        let last = frames.partition_point(|f| f.logical < end);
        if last >= frames.len() {
            return Err(StoreError::corrupt(
                &self.paths.log,
                0,
                format!("no block holds bytes up to {end} of the records"),
            ));
        }
        let (logical_start, disk_start) = match first.checked_sub(1) {
            Some(i) => (frames[i].logical, frames[i].disk),
            None => (LOG_HEADER_LEN, LOG_HEADER_LEN),
        };
        let disk_end = frames[last].disk;
        let mut raw = vec![0u8; (disk_end - disk_start) as usize];
        self.file(Part::Log)?
            .get()
            .read_exact_at(&mut raw, disk_start)
            .context(|| format!("reading {}", self.paths.log.display()))?;
        // (logical start, offset in `raw`) of each frame, and where `raw` ends.
        let mut pieces = Vec::with_capacity(last + 1 - first);
        let mut logical = logical_start;
        let mut disk = disk_start;
        for frame in &frames[first..=last] {
            pieces.push((logical, (disk - disk_start) as usize));
            (logical, disk) = (frame.logical, frame.disk);
        }
        // Opening blocks is the cost of an encrypted read: a long read opens its second
        // half on another core.
        let split = if pieces.len() >= PARALLEL_OPEN_MIN_BLOCKS {
            pieces.len() / 2
        } else {
            pieces.len()
        };
        let split_at = pieces.get(split).map_or(raw.len(), |&(_, at)| at);
        let (left, right) = raw.split_at_mut(split_at);
        let open_all = |bytes: &mut [u8], pieces: &[(u64, usize)], shift: usize| {
            for (i, &(logical, at)) in pieces.iter().enumerate() {
                let until = pieces
                    .get(i + 1)
                    .map_or(bytes.len() + shift, |&(_, next)| next);
                cipher
                    .open(self.base, logical, &mut bytes[at - shift..until - shift])
                    .map_err(|reason| {
                        StoreError::corrupt(&self.paths.log, disk_start + at as u64, reason)
                    })?;
            }
            Ok::<(), StoreError>(())
        };
        std::thread::scope(|scope| {
            let second = (split < pieces.len())
                .then(|| scope.spawn(|| open_all(right, &pieces[split..], split_at)));
            open_all(left, &pieces[..split], 0)?;
            match second.map(|handle| handle.join()) {
                None | Some(Ok(Ok(()))) => Ok(()),
                Some(Ok(Err(e))) => Err(e),
                Some(Err(_)) => Err(StoreError::Unusable("opening blocks failed".into())),
            }
        })?;
        // Keep the wanted part of each frame's data.
        let mut plain = Vec::with_capacity((end - start) as usize);
        for (i, &(logical, at)) in pieces.iter().enumerate() {
            let until = pieces.get(i + 1).map_or(raw.len(), |&(_, next)| next);
            let data = &raw[at + cipher::DATA_OFFSET..until];
            let data_end = logical + data.len() as u64;
            let from = start.max(logical);
            let to = end.min(data_end);
            if from < to {
                plain.extend_from_slice(&data[(from - logical) as usize..(to - logical) as usize]);
            }
        }
        if plain.len() as u64 != end - start {
            return Err(StoreError::corrupt(
                &self.paths.log,
                disk_start,
                "blocks are shorter than their map says",
            ));
        }
        Ok(plain)
    }

    /// Positions of events whose client-supplied id hashes to `hash` (to be confirmed by
    /// reading them).
    pub fn id_candidates(&self, hash: u64) -> Result<Vec<u64>, StoreError> {
        if let Ok(live) = self.live_ids.read() {
            if let Some(set) = live.as_ref() {
                return Ok(set
                    .range((hash, 0)..=(hash, u64::MAX))
                    .map(|&(_, pos)| pos)
                    .collect());
            }
        }
        if self.sealed_ids.get().is_none() {
            let loaded = SealedIds::load(&self.paths.ids, self.base)?;
            // Another reader may have loaded it meanwhile; either copy is the same.
            let _ = self.sealed_ids.set(loaded);
        }
        Ok(self
            .sealed_ids
            .get()
            .map_or_else(Vec::new, |ids| ids.positions(hash)))
    }
}

#[derive(Clone, Copy)]
enum Part {
    Log,
    Index,
    Times,
}

enum Handle {
    Active(Arc<ActiveFiles>, Part),
    Opened(File),
}

impl Handle {
    fn get(&self) -> &File {
        match self {
            Handle::Active(files, Part::Log) => &files.log,
            Handle::Active(files, Part::Index) => &files.index,
            Handle::Active(files, Part::Times) => &files.times,
            Handle::Opened(file) => file,
        }
    }
}

fn create_with_header(path: &Path, header: &[u8]) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .context(|| format!("creating {}", path.display()))?;
    file.write_all_at(header, 0)
        .and_then(|()| file.sync_all())
        .context(|| format!("writing {}", path.display()))?;
    Ok(file)
}
