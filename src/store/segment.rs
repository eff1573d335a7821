//! Segment files: the on-disk format of a namespace's log, and reading and checking it.
//!
//! A log is a sequence of segments, each named by the position of its first event
//! (`00000000000000000000.log`, 20 digits so that names sort like numbers):
//!
//! - `.log` — a 24-byte header (`BUSLOG\0\x01`, base position u64, flags u32, CRC32C of
//!   the preceding 20 bytes), then records. A record is a 4-byte word (body length in the
//!   low 31 bits; the top bit set means "the next record belongs to the same batch"), the
//!   CRC32C of the word and the body, then the body: the event's compact JSON. The active
//!   segment's file may end in zeros that the writer prepared ahead of its records; they
//!   are not records (a zero header fails its CRC) and are trimmed before sealing.
//! - `.idx` — a 16-byte header (`BUSIDX\0\x01`, base), then one little-endian u64 per event:
//!   the byte offset where that event's record *ends* (which is where the next one starts).
//!   Finding an event is one 8-byte read; a run of events is one read of their offsets and
//!   one read of their bytes.
//! - `.tim` — a 16-byte header (`BUSTIM\0\x01`, base), then one little-endian i64 per event,
//!   parallel to `.idx`: when the server committed the event, in nanoseconds since the Unix
//!   epoch. Each group commit has one time, the `created_at` of the group's server-dated
//!   events, and the times never decrease along the log (across restarts too). Unlike
//!   `created_at`, which clients may set (restores do), these times are the server's own:
//!   retention by age and `start_time` go by them. They are written in clear in encrypted
//!   logs, as `.idx` offsets are. Segments written by versions before `.tim` existed have
//!   none; for them, the `created_at` of their events stands in (see [`super::log`]).
//! - `.ids` — written when the segment is sealed: a 16-byte header (`BUSIDS\0\x01`, base),
//!   then sorted (hash, position) pairs of u64 for the events whose ids clients supplied.
//!   Server-assigned ids need no index (they encode their position).
//!
//! Little-endian throughout. All writes are by the log's writer thread; this module reads,
//! checks and lays out bytes, it does not decide when to sync.
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
use super::ids;
use super::meta::sync_dir;
use crate::event::{self, JsonLayout, StoredEvent};
use crate::timestamp::Timestamp;

pub const LOG_HEADER_LEN: u64 = 24;
pub const INDEX_HEADER_LEN: u64 = 16;
pub const TIMES_HEADER_LEN: u64 = 16;
const IDS_HEADER_LEN: u64 = 16;
pub const RECORD_HEADER_LEN: u64 = 8;
const INDEX_ENTRY_LEN: u64 = 8;
const TIMES_ENTRY_LEN: u64 = 8;
const IDS_ENTRY_LEN: u64 = 16;
const CONTINUES: u32 = 1 << 31;
/// Reads of an encrypted segment spanning at least this many blocks open them on two
/// threads.
const PARALLEL_OPEN_MIN_BLOCKS: usize = 32;
/// The largest record body the framing can express.
pub const MAX_BODY_LEN: usize = (CONTINUES - 1) as usize;

const LOG_MAGIC: &[u8; 8] = b"BUSLOG\x00\x01";
const INDEX_MAGIC: &[u8; 8] = b"BUSIDX\x00\x01";
const TIMES_MAGIC: &[u8; 8] = b"BUSTIM\x00\x01";
const IDS_MAGIC: &[u8; 8] = b"BUSIDS\x00\x01";
const FRAMES_MAGIC: &[u8; 8] = b"BUSFRM\x00\x01";

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

/// Header flag of a segment whose records are sealed (see [`super::cipher`]).
const FLAG_ENCRYPTED: u32 = 1;

pub fn log_header(base: u64, encrypted: bool) -> [u8; LOG_HEADER_LEN as usize] {
    let mut header = [0u8; LOG_HEADER_LEN as usize];
    header[..8].copy_from_slice(LOG_MAGIC);
    header[8..16].copy_from_slice(&base.to_le_bytes());
    let flags = if encrypted { FLAG_ENCRYPTED } else { 0 };
    header[16..20].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&header[..20]);
    header[20..].copy_from_slice(&crc.to_le_bytes());
    header
}

fn small_header(magic: &[u8; 8], base: u64) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(magic);
    header[8..].copy_from_slice(&base.to_le_bytes());
    header
}

/// Checks a `.log` header read from `path`, of a log that is `encrypted` or not.
pub fn check_log_header(
    bytes: &[u8],
    base: u64,
    path: &Path,
    encrypted: bool,
) -> Result<(), StoreError> {
    let bad = |reason: &str| StoreError::corrupt(path, 0, reason);
    if bytes.len() < LOG_HEADER_LEN as usize {
        return Err(bad("segment header is incomplete"));
    }
    if &bytes[..8] != LOG_MAGIC {
        return Err(bad("not a bus segment file (bad magic number)"));
    }
    let crc = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    if crc32c::crc32c(&bytes[..20]) != crc {
        return Err(bad("segment header checksum mismatch"));
    }
    let stored_base = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
    if stored_base != base {
        return Err(bad(&format!(
            "header says the segment starts at position {stored_base}, the file name says {base}"
        )));
    }
    let flags = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    if flags & !FLAG_ENCRYPTED != 0 {
        return Err(bad(&format!(
            "segment uses features this version does not know (flags {flags:#x})"
        )));
    }
    match (flags & FLAG_ENCRYPTED != 0, encrypted) {
        (true, false) => Err(bad(
            "segment is encrypted, but the log is opened without a secret key",
        )),
        (false, true) => Err(bad(
            "segment is not encrypted, but the log is opened with a secret key",
        )),
        _ => Ok(()),
    }
}

/// Reserves room for a record header; the body follows. Returns where the record starts.
pub fn begin_record(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN as usize]);
    start
}

/// Fills in the header of the record that starts at `start` and runs to the end of `out`.
/// The body must be at most [`MAX_BODY_LEN`] bytes: the writer refuses larger events
/// before it encodes them (see [`check_body_len`]).
pub fn finish_record(out: &mut [u8], start: usize, continues: bool) {
    let body_len = out.len() - start - RECORD_HEADER_LEN as usize;
    debug_assert!(body_len <= MAX_BODY_LEN);
    let word = body_len as u32 | if continues { CONTINUES } else { 0 };
    let word = word.to_le_bytes();
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&word),
        &out[start + RECORD_HEADER_LEN as usize..],
    );
    out[start..start + 4].copy_from_slice(&word);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Refuses a record body the framing cannot express: its length would spill into the
/// "continues" flag.
pub fn check_body_len(body_len: usize) -> Result<(), StoreError> {
    if body_len > MAX_BODY_LEN {
        return Err(StoreError::EventTooLarge {
            len: body_len as u64,
            max: MAX_BODY_LEN as u64,
        });
    }
    Ok(())
}

/// What the bytes at a record's start hold.
#[derive(Debug, PartialEq, Eq)]
pub enum RecordCheck {
    /// A whole record with a matching checksum.
    Valid { body_len: usize, continues: bool },
    /// The record runs past the end of the available bytes.
    Truncated,
    /// The checksum does not match.
    Damaged,
}

/// Checks the record at the start of `buf` (which may hold more after it).
pub fn check_record(buf: &[u8]) -> RecordCheck {
    let header = RECORD_HEADER_LEN as usize;
    if buf.len() < header {
        return RecordCheck::Truncated;
    }
    let word = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let body_len = (word & !CONTINUES) as usize;
    if buf.len() - header < body_len {
        return RecordCheck::Truncated;
    }
    let actual = crc32c::crc32c_append(crc32c::crc32c(&buf[..4]), &buf[header..header + body_len]);
    if actual != crc {
        return RecordCheck::Damaged;
    }
    RecordCheck::Valid {
        body_len,
        continues: word & CONTINUES != 0,
    }
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
        let index = create_with_header(&paths.index, &small_header(INDEX_MAGIC, base))?;
        let times = create_with_header(&paths.times, &small_header(TIMES_MAGIC, base))?;
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

/// Writes a sealed segment's `.ids` file (sorted) and syncs it.
pub fn write_ids_file(path: &Path, base: u64, ids: &[(u64, u64)]) -> Result<(), StoreError> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let mut bytes = Vec::with_capacity(IDS_HEADER_LEN as usize + sorted.len() * 16);
    bytes.extend_from_slice(&small_header(IDS_MAGIC, base));
    for (hash, position) in sorted {
        bytes.extend_from_slice(&hash.to_le_bytes());
        bytes.extend_from_slice(&position.to_le_bytes());
    }
    let file = File::create(path).context(|| format!("creating {}", path.display()))?;
    file.write_all_at(&bytes, 0)
        .and_then(|()| file.sync_all())
        .context(|| format!("writing {}", path.display()))
}

/// A sealed segment's `.ids` file, mapped into memory on first use.
#[derive(Debug)]
enum SealedIds {
    Empty,
    Mapped(memmap2::Mmap),
}

impl SealedIds {
    fn load(path: &Path, base: u64) -> Result<SealedIds, StoreError> {
        let file = File::open(path).context(|| format!("opening {}", path.display()))?;
        let len = file
            .metadata()
            .context(|| format!("reading {}", path.display()))?
            .len();
        if !has_small_header(&file, SmallFile::Ids, base)
            || !(len - IDS_HEADER_LEN).is_multiple_of(IDS_ENTRY_LEN)
        {
            return Err(StoreError::corrupt(path, 0, "malformed id index"));
        }
        if len == IDS_HEADER_LEN {
            return Ok(SealedIds::Empty);
        }
        // SAFETY: `.ids` files are written once, synced, and never modified afterwards;
        // deleting one (retention) leaves an existing mapping valid.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .context(|| format!("mapping {}", path.display()))?;
        Ok(SealedIds::Mapped(map))
    }

    /// Positions stored under `hash`, by binary search of the sorted entries.
    fn positions(&self, hash: u64) -> Vec<u64> {
        let SealedIds::Mapped(map) = self else {
            return Vec::new();
        };
        let entries = &map[IDS_HEADER_LEN as usize..];
        let entry = |i: usize| {
            let raw = &entries[i * IDS_ENTRY_LEN as usize..(i + 1) * IDS_ENTRY_LEN as usize];
            let (h, p) = raw.split_at(8);
            (
                u64::from_le_bytes(h.try_into().unwrap_or_default()),
                u64::from_le_bytes(p.try_into().unwrap_or_default()),
            )
        };
        let count = entries.len() / IDS_ENTRY_LEN as usize;
        let (mut lo, mut hi) = (0, count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if entry(mid).0 < hash {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo..count)
            .map(entry)
            .take_while(|&(h, _)| h == hash)
            .map(|(_, position)| position)
            .collect()
    }
}

/// Whether a `.idx` or `.ids` file starts with the right header for segment `base`.
pub fn has_small_header(file: &File, magic_of: SmallFile, base: u64) -> bool {
    let magic = match magic_of {
        SmallFile::Index => INDEX_MAGIC,
        SmallFile::Ids => IDS_MAGIC,
    };
    let mut header = [0u8; 16];
    file.read_exact_at(&mut header, 0).is_ok() && header == small_header(magic, base)
}

#[derive(Clone, Copy)]
pub enum SmallFile {
    Index,
    Ids,
}

/// What a full scan of a segment's `.log` found.
#[derive(Debug)]
pub struct Scan {
    /// End offsets of the records kept (complete batches only), in the logical stream
    /// (the file itself for a plain segment).
    pub ends: Vec<u64>,
    /// (hash, position) of the kept events whose ids are client-supplied.
    pub client_ids: BTreeSet<(u64, u64)>,
    /// Logical length of the kept records, header included: where the next record goes.
    pub kept_len: u64,
    /// Where the file is to end: `kept_len` for a plain segment, the end of the last
    /// complete group of frames for an encrypted one.
    pub kept_file_len: u64,
    /// The file's length; `kept_file_len < file_len` means there is a tail to drop.
    pub file_len: u64,
    /// Why the bytes after `kept_file_len` are not kept, if there are any.
    pub tail: Option<TailDamage>,
    /// Of an encrypted segment: the ends of the frames kept.
    pub frames: Option<Vec<FrameEnd>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailDamage {
    /// The last record (or block) is cut short or fails its check, and nothing valid
    /// follows: a write that the crash interrupted.
    InterruptedWrite { offset: u64, reason: &'static str },
    /// The records are intact, but the last batch (or group of blocks) never got its end.
    IncompleteBatch { offset: u64, records: u64 },
}

/// Reads a whole segment, checking every record (and, encrypted, every block).
///
/// `is_native(id, position)` says whether an id is one the log assigned itself (those need
/// no id index). Damage followed by at least one valid record cannot be the tail of an
/// interrupted write: it is corruption, reported with file and offset. Damage with nothing
/// valid after it is returned as the tail to drop if `tail_may_be_torn` (the active
/// segment), and as corruption otherwise (a sealed segment was complete when sealed).
pub fn scan(
    path: &Path,
    base: u64,
    tail_may_be_torn: bool,
    is_native: &dyn Fn(&str, u64) -> bool,
    cipher: Option<&Cipher>,
) -> Result<Scan, StoreError> {
    let file = File::open(path).context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .context(|| format!("reading {}", path.display()))?
        .len();
    if len < LOG_HEADER_LEN {
        let bytes = fs::read(path).context(|| format!("reading {}", path.display()))?;
        return scan_bytes(&bytes, path, base, tail_may_be_torn, is_native, cipher);
    }
    // Mapped, not read: a segment is up to --segment-size, and reading it whole would
    // take that much memory at every start; mapped, it is page cache the kernel can
    // reclaim, read once in order.
    // SAFETY: the log's directory lock is held, so no other process writes the file, and
    // this process's writer has not started yet; the mapping ends with this function.
    let map =
        unsafe { memmap2::Mmap::map(&file) }.context(|| format!("mapping {}", path.display()))?;
    let _ = map.advise(memmap2::Advice::Sequential);
    scan_bytes(&map, path, base, tail_may_be_torn, is_native, cipher)
}

/// [`scan`] of a segment's bytes already in memory; `path` names it in errors.
pub fn scan_bytes(
    bytes: &[u8],
    path: &Path,
    base: u64,
    tail_may_be_torn: bool,
    is_native: &dyn Fn(&str, u64) -> bool,
    cipher: Option<&Cipher>,
) -> Result<Scan, StoreError> {
    if bytes.len() < LOG_HEADER_LEN as usize {
        return Err(StoreError::corrupt(path, 0, "segment header is incomplete"));
    }
    check_log_header(bytes, base, path, cipher.is_some())?;
    let Some(cipher) = cipher else {
        return scan_records(bytes, path, base, tail_may_be_torn, is_native);
    };
    let found = cipher::decrypt_segment(cipher, base, bytes, LOG_HEADER_LEN as usize);
    let mut tail = None;
    if let Some((at, reason)) = found.damage {
        if let Some(valid_at) = found.valid_after_damage {
            return Err(StoreError::corrupt(
                path,
                at,
                format!(
                    "{reason}, and a valid block follows at offset {valid_at}, so this is not an \
                     interrupted write; refusing to start rather than skip data"
                ),
            ));
        }
        tail = Some(TailDamage::InterruptedWrite { offset: at, reason });
    }
    if let Some(at) = found.incomplete_group_at {
        tail = Some(TailDamage::IncompleteBatch {
            offset: at,
            records: 0,
        });
    }
    if let (Some(damage), false) = (&tail, tail_may_be_torn) {
        let (at, reason) = match damage {
            TailDamage::InterruptedWrite { offset, reason } => (*offset, *reason),
            TailDamage::IncompleteBatch { offset, .. } => {
                (*offset, "group of blocks is incomplete")
            }
        };
        return Err(StoreError::corrupt(
            path,
            at,
            format!("{reason} in a sealed segment, which was complete when it was sealed"),
        ));
    }
    // Whole groups hold whole batches: the records of what is kept must be intact.
    let mut scan =
        scan_records(&found.logical, path, base, false, is_native).map_err(|e| match e {
            StoreError::Corrupt {
                file,
                offset,
                reason,
            } => StoreError::Corrupt {
                file,
                offset,
                reason: format!("{reason} (at that offset of the decrypted records)"),
            },
            other => other,
        })?;
    scan.kept_file_len = found.disk_len;
    scan.file_len = bytes.len() as u64;
    scan.tail = tail;
    scan.frames = Some(found.frames);
    Ok(scan)
}

/// Checks the records of a plain segment's bytes (or an encrypted one's logical
/// stream), header included.
fn scan_records(
    bytes: &[u8],
    path: &Path,
    base: u64,
    tail_may_be_torn: bool,
    is_native: &dyn Fn(&str, u64) -> bool,
) -> Result<Scan, StoreError> {
    let file_len = bytes.len() as u64;
    let mut ends = Vec::new();
    let mut client_ids = BTreeSet::new();
    let mut offset = LOG_HEADER_LEN;
    // End of the last complete batch, and how many records it covers.
    let (mut batch_end, mut batch_records) = (LOG_HEADER_LEN, 0usize);
    let mut damage: Option<(u64, &'static str)> = None;
    while offset < file_len {
        let record = &bytes[offset as usize..];
        let (body_len, continues) = match check_record(record) {
            RecordCheck::Valid {
                body_len,
                continues,
            } => (body_len, continues),
            RecordCheck::Truncated if record.len() < RECORD_HEADER_LEN as usize => {
                damage = Some((offset, tail_reason(record, "record header is cut short")));
                break;
            }
            RecordCheck::Truncated => {
                damage = Some((offset, tail_reason(record, "record is cut short")));
                break;
            }
            RecordCheck::Damaged => {
                damage = Some((offset, tail_reason(record, "record checksum mismatch")));
                break;
            }
        };
        let body = &record[RECORD_HEADER_LEN as usize..RECORD_HEADER_LEN as usize + body_len];
        let Some(id) = event::id_of_json(body) else {
            return Err(StoreError::corrupt(
                path,
                offset,
                "record has a valid checksum but does not hold an event",
            ));
        };
        let position = base + ends.len() as u64;
        if !is_native(id, position) {
            client_ids.insert((ids::hash(id), position));
        }
        offset += RECORD_HEADER_LEN + body_len as u64;
        ends.push(offset);
        if !continues {
            (batch_end, batch_records) = (offset, ends.len());
        }
    }

    let tail = match damage {
        Some((at, reason)) => {
            if let Some(valid_at) = find_valid_record_after(bytes, at) {
                return Err(StoreError::corrupt(
                    path,
                    at,
                    format!(
                        "{reason}, and a valid record follows at offset {valid_at}, so this is \
                         not an interrupted write; refusing to start rather than skip data"
                    ),
                ));
            }
            Some(TailDamage::InterruptedWrite { offset: at, reason })
        }
        None if batch_records < ends.len() => Some(TailDamage::IncompleteBatch {
            offset: batch_end,
            records: (ends.len() - batch_records) as u64,
        }),
        None => None,
    };
    if let Some(damage) = &tail {
        if !tail_may_be_torn {
            let (at, reason) = match damage {
                TailDamage::InterruptedWrite { offset, reason } => (*offset, *reason),
                TailDamage::IncompleteBatch { offset, .. } => (*offset, "batch is incomplete"),
            };
            return Err(StoreError::corrupt(
                path,
                at,
                format!("{reason} in a sealed segment, which was complete when it was sealed"),
            ));
        }
    }
    ends.truncate(batch_records);
    let kept_end_position = base + batch_records as u64;
    client_ids.retain(|&(_, position)| position < kept_end_position);
    Ok(Scan {
        ends,
        client_ids,
        kept_len: batch_end,
        kept_file_len: batch_end,
        file_len,
        tail,
        frames: None,
    })
}

/// Why the unreadable `rest` of a segment is not kept: zeros are space the writer prepared
/// ahead of its records and never used (see `writer::Writer::prepare_space`); anything
/// else is `otherwise`.
pub(crate) fn tail_reason(rest: &[u8], otherwise: &'static str) -> &'static str {
    if rest.iter().all(|&b| b == 0) {
        "unused space prepared ahead of the records (only zeros follow)"
    } else {
        otherwise
    }
}

/// Looks for any valid record starting after `damaged_at`. Finding one proves the damage
/// is not the end of an interrupted append. Only runs when damage was found.
pub(crate) fn find_valid_record_after(bytes: &[u8], damaged_at: u64) -> Option<u64> {
    let header = RECORD_HEADER_LEN as usize;
    let prefix = b"{\"id\":\"";
    (damaged_at as usize + 1..bytes.len())
        .find(|&start| {
            let candidate = &bytes[start..];
            // Cheap filter first: every event record's body begins with `{"id":"`.
            candidate.len() >= header + prefix.len()
                && candidate[header..].starts_with(prefix)
                && matches!(check_record(candidate), RecordCheck::Valid { .. })
        })
        .map(|start| start as u64)
}

/// Writes a sealed encrypted segment's `.frm` file: the ends of its frames.
pub fn write_frames_file(path: &Path, base: u64, frames: &[FrameEnd]) -> Result<(), StoreError> {
    let mut bytes = Vec::with_capacity(16 + frames.len() * 16);
    bytes.extend_from_slice(&small_header(FRAMES_MAGIC, base));
    for frame in frames {
        bytes.extend_from_slice(&frame.logical.to_le_bytes());
        bytes.extend_from_slice(&frame.disk.to_le_bytes());
    }
    let file = File::create(path).context(|| format!("creating {}", path.display()))?;
    file.write_all_at(&bytes, 0)
        .and_then(|()| file.sync_all())
        .context(|| format!("writing {}", path.display()))
}

/// Reads a `.frm` file; `None` if it is missing or malformed.
pub fn read_frames_file(path: &Path, base: u64) -> Option<Vec<FrameEnd>> {
    let bytes = fs::read(path).ok()?;
    if bytes.get(..16)? != small_header(FRAMES_MAGIC, base) || (bytes.len() - 16) % 16 != 0 {
        return None;
    }
    let entries: Vec<FrameEnd> = bytes[16..]
        .chunks_exact(16)
        .map(|c| FrameEnd {
            logical: u64::from_le_bytes(c[..8].try_into().unwrap_or_default()),
            disk: u64::from_le_bytes(c[8..].try_into().unwrap_or_default()),
        })
        .collect();
    let increasing = entries
        .windows(2)
        .all(|w| w[0].logical < w[1].logical && w[0].disk < w[1].disk);
    increasing.then_some(entries)
}

/// Reads a `.idx` file's entries; `None` if the file is missing or malformed.
pub fn read_index(path: &Path, base: u64) -> Option<Vec<u64>> {
    let file = File::open(path).ok()?;
    if !has_small_header(&file, SmallFile::Index, base) {
        return None;
    }
    let bytes = fs::read(path).ok()?;
    let entries = bytes.get(INDEX_HEADER_LEN as usize..)?;
    if entries.len() % INDEX_ENTRY_LEN as usize != 0 {
        return None;
    }
    Some(
        entries
            .chunks_exact(INDEX_ENTRY_LEN as usize)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect(),
    )
}

/// Number of entries of a `.idx` file from its length, if its header is right and its
/// length whole.
pub fn index_entries(path: &Path, base: u64) -> Option<u64> {
    let file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let entries = len.checked_sub(INDEX_HEADER_LEN)?;
    (has_small_header(&file, SmallFile::Index, base) && entries % INDEX_ENTRY_LEN == 0)
        .then_some(entries / INDEX_ENTRY_LEN)
}

/// The last entry of a `.idx` file with `entries` entries.
pub fn last_index_entry(path: &Path, entries: u64) -> Option<u64> {
    let file = File::open(path).ok()?;
    let mut raw = [0u8; 8];
    file.read_exact_at(&mut raw, INDEX_HEADER_LEN + (entries - 1) * INDEX_ENTRY_LEN)
        .ok()?;
    Some(u64::from_le_bytes(raw))
}

/// Rewrites a `.idx` file from scanned record ends, and syncs it.
pub fn write_index_file(path: &Path, base: u64, ends: &[u64]) -> Result<File, StoreError> {
    let mut bytes = Vec::with_capacity(INDEX_HEADER_LEN as usize + ends.len() * 8);
    bytes.extend_from_slice(&small_header(INDEX_MAGIC, base));
    for end in ends {
        bytes.extend_from_slice(&end.to_le_bytes());
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .context(|| format!("creating {}", path.display()))?;
    file.write_all_at(&bytes, 0)
        .and_then(|()| file.sync_all())
        .context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

/// Offset in a `.idx` file of the entry for the `n`th event of the segment.
pub fn index_entry_offset(n: u64) -> u64 {
    INDEX_HEADER_LEN + n * INDEX_ENTRY_LEN
}

/// Offset in a `.tim` file of the entry for the `n`th event of the segment.
pub fn times_entry_offset(n: u64) -> u64 {
    TIMES_HEADER_LEN + n * TIMES_ENTRY_LEN
}

/// What a segment's `.tim` file holds: `T` is its entries, or their number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimesFile<T> {
    /// No such file: the segment was written by a version without commit times.
    Missing,
    /// A wrong header, or a length that is not a whole number of entries.
    Malformed,
    Entries(T),
}

/// Reads a whole `.tim` file (the offline tools, and recovery of the active segment): the
/// commit times in nanoseconds since the Unix epoch.
pub fn read_times_file(path: &Path, base: u64) -> Result<TimesFile<Vec<i64>>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TimesFile::Missing),
        Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
    };
    let header = TIMES_HEADER_LEN as usize;
    if bytes.get(..header) != Some(&small_header(TIMES_MAGIC, base)[..])
        || !(bytes.len() - header).is_multiple_of(TIMES_ENTRY_LEN as usize)
    {
        return Ok(TimesFile::Malformed);
    }
    Ok(TimesFile::Entries(
        bytes[header..]
            .chunks_exact(TIMES_ENTRY_LEN as usize)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect(),
    ))
}

/// The number of entries of a `.tim` file, from its length, without reading them.
pub fn times_file_entries(path: &Path, base: u64) -> Result<TimesFile<u64>, StoreError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TimesFile::Missing),
        Err(e) => return Err(StoreError::io(format!("opening {}", path.display()), e)),
    };
    let len = file
        .metadata()
        .context(|| format!("reading {}", path.display()))?
        .len();
    let mut header = [0u8; TIMES_HEADER_LEN as usize];
    let whole = len >= TIMES_HEADER_LEN && (len - TIMES_HEADER_LEN).is_multiple_of(TIMES_ENTRY_LEN);
    if !whole
        || file.read_exact_at(&mut header, 0).is_err()
        || header != small_header(TIMES_MAGIC, base)
    {
        return Ok(TimesFile::Malformed);
    }
    Ok(TimesFile::Entries(
        (len - TIMES_HEADER_LEN) / TIMES_ENTRY_LEN,
    ))
}

/// How many of `entries` are believable commit times: the longest prefix of positive
/// times that never decrease, starting no earlier than `floor` (the previous segment's
/// last commit time). A crash can leave a `.tim` file short, or (power loss) holding
/// zeros where its last writes were.
pub fn valid_times(entries: &[i64], floor: Option<Timestamp>) -> usize {
    let mut previous = floor.map_or(1, Timestamp::unix_nanos).max(1);
    entries
        .iter()
        .take_while(|&&time| {
            let ok = time >= previous;
            previous = time;
            ok
        })
        .count()
}

/// What recovery did to the commit times of the active segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimesRecovery {
    /// Entries that were missing or unbelievable and were dated `fill`.
    pub filled: u64,
    /// The time given to them: the later of the recovery time and the last one kept.
    pub fill: Timestamp,
}

/// Makes the active segment's `.tim` file hold exactly `count` entries, its events
/// having been recovered: entries past them are dropped, believable ones kept (see
/// [`valid_times`]), missing or unbelievable ones given a time no earlier than the truth —
/// `now`, or the last time kept if that is later — so that such events are kept longer by
/// retention and delivered to a `start_time` before the recovery, never skipped. Rewrites
/// only what must change, and syncs it; returns the open file.
pub fn recover_times_file(
    path: &Path,
    base: u64,
    count: u64,
    floor: Option<Timestamp>,
    now: Timestamp,
) -> Result<(File, TimesRecovery), StoreError> {
    let found = read_times_file(path, base)?;
    let entries = match &found {
        TimesFile::Entries(entries) => entries.as_slice(),
        TimesFile::Missing | TimesFile::Malformed => &[],
    };
    let count_usize = usize::try_from(count).unwrap_or(usize::MAX);
    let kept = valid_times(&entries[..entries.len().min(count_usize)], floor);
    let last_kept = kept
        .checked_sub(1)
        .map(|i| Timestamp::from_unix_nanos(entries[i]))
        .or(floor);
    let fill = last_kept.map_or(now, |last| last.max(now));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .context(|| format!("opening {}", path.display()))?;
    let filled = count - kept as u64;
    let exact = matches!(found, TimesFile::Entries(_)) && entries.len() == count_usize;
    if filled > 0 || !exact {
        let mut tail = Vec::with_capacity(16 + filled as usize * 8);
        if !matches!(found, TimesFile::Entries(_)) {
            tail.extend_from_slice(&small_header(TIMES_MAGIC, base));
        }
        for _ in 0..filled {
            tail.extend_from_slice(&fill.unix_nanos().to_le_bytes());
        }
        let at = if matches!(found, TimesFile::Entries(_)) {
            times_entry_offset(kept as u64)
        } else {
            0
        };
        file.set_len(at)
            .and_then(|()| file.write_all_at(&tail, at))
            .and_then(|()| file.sync_all())
            .context(|| format!("writing {}", path.display()))?;
    }
    if matches!(found, TimesFile::Missing) {
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    Ok((file, TimesRecovery { filled, fill }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(body: &[u8], continues: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let start = begin_record(&mut out);
        out.extend_from_slice(body);
        finish_record(&mut out, start, continues);
        out
    }

    #[test]
    fn records_check_and_detect_damage() {
        let rec = record(br#"{"id":"e_x"}"#, true);
        assert_eq!(
            check_record(&rec),
            RecordCheck::Valid {
                body_len: 12,
                continues: true
            }
        );
        assert_eq!(check_record(&rec[..rec.len() - 1]), RecordCheck::Truncated);
        assert_eq!(check_record(&rec[..5]), RecordCheck::Truncated);
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x04;
            assert_ne!(
                check_record(&bad),
                RecordCheck::Valid {
                    body_len: 12,
                    continues: true
                },
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn log_header_round_trip() {
        let header = log_header(42, false);
        assert!(check_log_header(&header, 42, Path::new("x"), false).is_ok());
        let err = check_log_header(&header, 43, Path::new("x"), false).unwrap_err();
        assert!(err.to_string().contains("file name says 43"), "{err}");
        let mut bad = header;
        bad[9] ^= 1;
        assert!(check_log_header(&bad, 42, Path::new("x"), false).is_err());
        let encrypted = log_header(42, true);
        let err = check_log_header(&encrypted, 42, Path::new("x"), false).unwrap_err();
        assert!(err.to_string().contains("without a secret key"), "{err}");
        let err = check_log_header(&header, 42, Path::new("x"), true).unwrap_err();
        assert!(err.to_string().contains("not encrypted"), "{err}");
    }
}
