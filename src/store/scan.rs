//! Reading a whole segment and judging its end: what recovery does to the active segment
//! (and to a sealed one whose indexes must be rebuilt), and what the fuzz target exercises.
//!
//! What it promises: every record is checked (and, encrypted, every block); only complete
//! batches (complete groups of blocks) are kept. Damage followed by at least one valid
//! record or block cannot be the tail of an interrupted write: it is corruption, reported
//! with file and offset, never skipped. Damage with nothing valid after it is the tail to
//! drop, but only where a write may have been torn (the active segment). It reads; the
//! caller truncates and rewrites indexes.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::Path;

use super::cipher::{self, Cipher, FrameEnd};
use super::error::{IoContext, StoreError};
use super::ids;
use super::log_header::{check_log_header, LOG_HEADER_LEN};
use super::record::{
    check_record, find_valid_record_after, tail_reason, RecordCheck, RECORD_HEADER_LEN,
};
use crate::event;

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
