//! The small files beside a segment's `.log`: their formats, headers, reads and writes.
//!
//! Each starts with a 16-byte header (an 8-byte magic number, then the segment's base
//! position) and holds fixed-width little-endian entries:
//!
//! - `.idx` — `BUSIDX\0\x01`, then one u64 per event: the byte offset where that event's
//!   record *ends* (which is where the next one starts). Finding an event is one 8-byte
//!   read; a run of events is one read of their offsets and one read of their bytes.
//! - `.tim` — `BUSTIM\0\x01`, then one i64 per event, parallel to `.idx`: when the server
//!   committed the event, in nanoseconds since the Unix epoch. Each group commit has one
//!   time, the `created_at` of the group's server-dated events, and the times never
//!   decrease along the log (across restarts too). Unlike `created_at`, which clients may
//!   set (restores do), these times are the server's own: retention by age and
//!   `start_time` go by them. They are written in clear in encrypted logs, as `.idx`
//!   offsets are. Segments written by versions before `.tim` existed have none; for them,
//!   the `created_at` of their events stands in (see [`super::log`]).
//! - `.ids` — written when the segment is sealed: `BUSIDS\0\x01`, then sorted (hash,
//!   position) pairs of u64 for the events whose ids clients supplied. Server-assigned ids
//!   need no index (they encode their position).
//! - `.frm` — written when an encrypted segment is sealed: `BUSFRM\0\x01`, then one
//!   (logical end, file end) pair of u64 per frame (see [`super::cipher`]).
//!
//! What it promises: the reads check a file's header and that its length is a whole
//! number of entries, and report a file that fails (as an error, `None` or
//! [`TimesFile::Malformed`]) rather than read it as entries ([`last_index_entry`] alone
//! does not: its answer counts only together with [`index_entries`]'s). Every write it
//! makes is synced before it returns. It does not decide when a file is written: the
//! writer and recovery do.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::cipher::FrameEnd;
use super::error::{IoContext, StoreError};
use super::meta::sync_dir;
use crate::timestamp::Timestamp;

pub const INDEX_HEADER_LEN: u64 = 16;
pub const TIMES_HEADER_LEN: u64 = 16;
const IDS_HEADER_LEN: u64 = 16;
pub const INDEX_ENTRY_LEN: u64 = 8;
pub const TIMES_ENTRY_LEN: u64 = 8;
const IDS_ENTRY_LEN: u64 = 16;

const INDEX_MAGIC: &[u8; 8] = b"BUSIDX\x00\x01";
const TIMES_MAGIC: &[u8; 8] = b"BUSTIM\x00\x01";
const IDS_MAGIC: &[u8; 8] = b"BUSIDS\x00\x01";
const FRAMES_MAGIC: &[u8; 8] = b"BUSFRM\x00\x01";

fn small_header(magic: &[u8; 8], base: u64) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(magic);
    header[8..].copy_from_slice(&base.to_le_bytes());
    header
}

/// The header of a new segment's `.idx` file.
pub fn index_header(base: u64) -> [u8; 16] {
    small_header(INDEX_MAGIC, base)
}

/// The header of a new segment's `.tim` file.
pub fn times_header(base: u64) -> [u8; 16] {
    small_header(TIMES_MAGIC, base)
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
pub(super) enum SealedIds {
    Empty,
    Mapped(memmap2::Mmap),
}

impl SealedIds {
    pub(super) fn load(path: &Path, base: u64) -> Result<SealedIds, StoreError> {
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
    pub(super) fn positions(&self, hash: u64) -> Vec<u64> {
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
