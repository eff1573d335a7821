//! Opening a log's files: the directory's lock, the key check, the sealed segments and the
//! recovery of the active one, and the account of what it found ([`Recovery`]).
//!
//! Sealed segments are checked cheaply (header, index length, last record's end); an index
//! that is missing or inconsistent is rebuilt from its segment. Every record of the active
//! segment is read (see [`super::scan`]): a torn or damaged last write is truncated with a
//! warning; damage followed by valid data stops the open.
//!
//! Recovery keeps the active segment's `.tim` parallel to its records: entries past them
//! are dropped, missing or unbelievable ones are dated by the recovery time (never earlier
//! than the last time kept), so such events are kept longer and delivered rather than
//! skipped. Sealed segments written by versions before `.tim` existed have none, and
//! nothing is migrated (that would read whole segments).
//!
//! The metadata, the id generations and the start of the writer are [`super::log`]'s.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::cipher::Cipher;
use super::error::{IoContext, StoreError};
use super::index_files::{self, SmallFile, TimesFile};
use super::log_header::{check_log_header, LOG_HEADER_LEN};
use super::meta::Meta;
use super::scan::{self, TailDamage};
use super::segment::{ActiveFiles, Segment, SegmentPaths};
use super::shared::Shared;
use crate::timestamp::Timestamp;

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

/// Takes the lock that marks the log in `dir` as in use by this process, for as long as
/// the returned file is open.
pub(super) fn take_lock(dir: &Path) -> Result<File, StoreError> {
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
pub(super) fn open_segments(
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
    check_log_header(&header, base, &paths.log, cipher.is_some())?;

    let last_entry = index_files::last_index_entry(&paths.index, expected);
    // Plain, the records end where the file does; encrypted, the last block ends there
    // and holds the last record's end.
    let ends_ok = match cipher {
        None => last_entry == Some(log_len),
        Some(_) => index_files::read_frames_file(&paths.frames, base)
            .and_then(|frames| frames.last().copied())
            .is_some_and(|last| Some(last.logical) == last_entry && last.disk == log_len),
    };
    let index_ok = index_files::index_entries(&paths.index, base) == Some(expected) && ends_ok;
    let ids_ok = File::open(&paths.ids)
        .is_ok_and(|f| index_files::has_small_header(&f, SmallFile::Ids, base));
    if !(index_ok && ids_ok) {
        tracing::warn!(file = %paths.log.display(), "index of a sealed segment is missing or inconsistent; rebuilding it");
        let scan = scan::scan(&paths.log, base, false, is_native, cipher)?;
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
        index_files::write_index_file(&paths.index, base, &scan.ends)?;
        let client_ids: Vec<(u64, u64)> = scan.client_ids.into_iter().collect();
        index_files::write_ids_file(&paths.ids, base, &client_ids)?;
        if let Some(frames) = &scan.frames {
            index_files::write_frames_file(&paths.frames, base, frames)?;
        }
        recovery.rebuilt_indexes.push(paths.index.clone());
    }
    // Commit times: checked by length only (cheap open). A segment sealed by an older
    // version has none; one whose file is inconsistent is judged as if it had none.
    let has_times = match index_files::times_file_entries(&paths.times, base)? {
        TimesFile::Entries(n) if n == expected => true,
        TimesFile::Missing => false,
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
    let scan = scan::scan(&paths.log, base, true, is_native, cipher)?;
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
    let index = index_files::write_index_file(&paths.index, base, &scan.ends)?;
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
        index_files::recover_times_file(&paths.times, base, count, floor, Timestamp::now())?;
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
