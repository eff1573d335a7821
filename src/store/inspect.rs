//! Reading a namespace's log files without opening the log, for the offline tools
//! (`bus dump --path`, `bus copy`, `bus debug`).
//!
//! What it promises:
//! - It never writes. A torn last write, which the server truncates at its next start, is
//!   reported and left in place; the events it yields are exactly those the server would
//!   serve after that start.
//! - It takes a shared lock on the log's lock file, so it refuses to read a log that a
//!   running server has open, and a server cannot start on the log while it reads.
//! - Every record is checked against its CRC, and every block of an encrypted log against
//!   its MAC; damage is reported with file and offset (for a damaged block, its offset in
//!   the file; for a record inside an encrypted log, its offset in the decrypted stream).

use std::fs::{self, File};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::cipher::{self, Cipher, FrameEnd};
use super::error::{IoContext, StoreError};
use super::index_files::{self, TimesFile};
use super::log_header::{check_log_header, LOG_HEADER_LEN};
use super::meta::{Meta, META_FILE};
use super::record::{self, check_record, RecordCheck, RECORD_HEADER_LEN};
use super::recovery::{check_key, LOCK_FILE};
use super::segment::{self, SegmentPaths};
use crate::event::JsonLayout;

/// The namespaces whose logs are under a data directory, sorted.
pub fn namespaces(data_dir: &Path) -> Result<Vec<String>, StoreError> {
    let entries = fs::read_dir(data_dir).context(|| format!("listing {}", data_dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.context(|| format!("listing {}", data_dir.display()))?;
        let path = entry.path();
        if path.join(META_FILE).is_file() {
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// A problem found in a log's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub file: PathBuf,
    pub offset: u64,
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at offset {}: {}",
            self.file.display(),
            self.offset,
            self.reason
        )
    }
}

/// One stored event, borrowed from its segment file.
#[derive(Debug, Clone, Copy)]
pub struct EventRecord<'a> {
    pub position: u64,
    pub file: &'a Path,
    /// Where the record starts in the file.
    pub offset: u64,
    /// The event's JSON.
    pub json: &'a [u8],
}

/// A segment's size on disk.
#[derive(Debug, Clone)]
pub struct SegmentFile {
    pub base: u64,
    pub path: PathBuf,
    pub bytes: u64,
}

/// How a full read of a log ended.
#[derive(Debug, Clone, Default)]
pub struct ReadEnd {
    /// Where the log ends: the position after its last event (its event count, unless
    /// retention removed the oldest).
    pub events: u64,
    /// Bytes at the end of the last segment that are not part of the log (an interrupted
    /// write), which the server drops at its next start.
    pub torn_tail: Option<Damage>,
}

/// What a verification found.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    /// Records whose checksum and framing are right.
    pub valid_records: u64,
    pub damage: Vec<Damage>,
    /// Problems the server repairs by itself at start-up (a torn last write, a missing or
    /// stale index).
    pub repairable: Vec<Damage>,
}

/// A namespace's log files, locked against a server opening them.
pub struct LogFiles {
    dir: PathBuf,
    segments: Vec<SegmentFile>,
    cipher: Option<Cipher>,
    _lock: Option<File>,
}

/// A segment's records, decrypted if need be, and what was wrong with its blocks.
struct Loaded {
    /// The logical stream (the file itself, plain), header included.
    bytes: Vec<u8>,
    /// The first damaged block, and whether a valid block follows it.
    block_damage: Option<(Damage, bool)>,
    /// Blocks of a group that never ended (an interrupted write).
    incomplete_group: Option<Damage>,
    /// Ends of the blocks kept.
    frames: Option<Vec<FrameEnd>>,
}

impl LogFiles {
    /// Opens the log in `dir` for reading, with the key it was encrypted with, if any.
    pub fn open(dir: &Path, cipher: Option<&Cipher>) -> Result<LogFiles, StoreError> {
        let lock = match File::open(dir.join(LOCK_FILE)) {
            Ok(file) => {
                match file.try_lock_shared() {
                    Ok(()) => {}
                    Err(fs::TryLockError::WouldBlock) => {
                        return Err(StoreError::Unusable(format!(
                            "{} is in use by a running bus server; stop it first, or read through the server with --host",
                            dir.display()
                        )))
                    }
                    Err(fs::TryLockError::Error(e)) => {
                        return Err(StoreError::io(format!("locking {}", dir.display()), e))
                    }
                }
                Some(file)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError::io(format!("opening {}", dir.display()), e)),
        };
        let bases = segment::list_segments(dir)?;
        let Some(meta) = Meta::read(dir)? else {
            return Err(StoreError::Unusable(format!(
                "{} holds no bus log (no {META_FILE})",
                dir.display()
            )));
        };
        let namespace = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        check_key(dir, namespace.as_deref().unwrap_or("?"), &meta, cipher)?;
        let mut segments = Vec::with_capacity(bases.len());
        for base in bases {
            let path = SegmentPaths::new(dir, base).log;
            let bytes = fs::metadata(&path)
                .context(|| format!("reading {}", path.display()))?
                .len();
            segments.push(SegmentFile { base, path, bytes });
        }
        Ok(LogFiles {
            dir: dir.to_owned(),
            segments,
            cipher: cipher.cloned(),
            _lock: lock,
        })
    }

    /// Reads a segment whole (the tools stream a log once, segment by segment) and
    /// decrypts it if it is encrypted.
    fn load(&self, segment: &SegmentFile) -> Result<Loaded, StoreError> {
        let bytes =
            fs::read(&segment.path).context(|| format!("reading {}", segment.path.display()))?;
        let Some(cipher) = &self.cipher else {
            return Ok(Loaded {
                bytes,
                block_damage: None,
                incomplete_group: None,
                frames: None,
            });
        };
        let header = LOG_HEADER_LEN as usize;
        if bytes.len() < header {
            return Err(StoreError::corrupt(
                &segment.path,
                0,
                "segment header is incomplete",
            ));
        }
        check_log_header(&bytes, segment.base, &segment.path, true)?;
        let found = cipher::decrypt_segment(cipher, segment.base, &bytes, header);
        let damage = |offset: u64, reason: &str| Damage {
            file: segment.path.clone(),
            offset,
            reason: reason.to_owned(),
        };
        Ok(Loaded {
            block_damage: found
                .damage
                .map(|(at, reason)| (damage(at, reason), found.valid_after_damage.is_some())),
            incomplete_group: found.incomplete_group_at.map(|at| {
                damage(
                    at,
                    "the last group of blocks is incomplete (an interrupted write)",
                )
            }),
            frames: Some(found.frames),
            bytes: found.logical,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn segments(&self) -> &[SegmentFile] {
        &self.segments
    }

    /// Bytes of all segment files.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// The position of the oldest event kept (0 unless retention removed older ones).
    pub fn first_position(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.base)
    }

    /// Calls `visit` with every event of the log, in order. Damage the server would refuse
    /// to start with is an error; a torn last write ends the read and is reported.
    pub fn for_each_event<E: From<StoreError>>(
        &self,
        mut visit: impl FnMut(EventRecord<'_>) -> Result<(), E>,
    ) -> Result<ReadEnd, E> {
        // Retention may have removed the oldest segments: the log starts at the first kept.
        let mut end = ReadEnd {
            events: self.first_position(),
            ..ReadEnd::default()
        };
        for (i, segment) in self.segments.iter().enumerate() {
            let is_last = i + 1 == self.segments.len();
            if segment.base != end.events {
                return Err(StoreError::corrupt(
                    &segment.path,
                    0,
                    format!(
                        "segment starts at position {} but the previous ones hold {} events",
                        segment.base, end.events
                    ),
                )
                .into());
            }
            let loaded = self.load(segment)?;
            if let Some((damage, followed_by_valid)) = loaded.block_damage {
                if !is_last || followed_by_valid {
                    return Err(
                        StoreError::corrupt(&damage.file, damage.offset, damage.reason).into(),
                    );
                }
                end.torn_tail = Some(damage);
            }
            if let Some(incomplete) = loaded.incomplete_group {
                if !is_last {
                    return Err(StoreError::corrupt(
                        &incomplete.file,
                        incomplete.offset,
                        "group of blocks is incomplete in a sealed segment",
                    )
                    .into());
                }
                end.torn_tail.get_or_insert(incomplete);
            }
            let bytes = loaded.bytes;
            let walk = walk_records(&bytes, segment, self.cipher.is_some())?;
            let mut records = walk.records;
            if let Some(damage) = walk.damage {
                // Inside whole groups of authenticated blocks, damage is never a torn end.
                let followed_by_valid = walk.valid_after_damage || self.cipher.is_some();
                if !is_last || followed_by_valid {
                    return Err(StoreError::corrupt(
                        &damage.file,
                        damage.offset,
                        damage.reason.clone(),
                    )
                    .into());
                }
                end.torn_tail = Some(damage);
            }
            // Records of a batch whose last record never came are not part of the log.
            let complete = records
                .iter()
                .rposition(|r| !r.continues)
                .map_or(0, |i| i + 1);
            if complete < records.len() {
                if !is_last {
                    return Err(StoreError::corrupt(
                        &segment.path,
                        records[complete].offset,
                        "batch is incomplete in a sealed segment",
                    )
                    .into());
                }
                end.torn_tail.get_or_insert(Damage {
                    file: segment.path.clone(),
                    offset: records[complete].offset,
                    reason: "the last batch is incomplete (an interrupted write)".into(),
                });
                records.truncate(complete);
            }
            for record in &records {
                let json = &bytes[record.body.clone()];
                if JsonLayout::parse(json).is_none() {
                    return Err(StoreError::corrupt(
                        &segment.path,
                        record.offset,
                        "record has a valid checksum but does not hold an event",
                    )
                    .into());
                }
                visit(EventRecord {
                    position: end.events,
                    file: &segment.path,
                    offset: record.offset,
                    json,
                })?;
                end.events += 1;
            }
        }
        Ok(end)
    }

    /// Checks every record of every segment and the indexes (commit times included), and
    /// reports everything found rather than stopping at the first problem. `progress` is
    /// called with the bytes of each segment once checked.
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> Result<Verification, StoreError> {
        let mut found = Verification::default();
        let mut expected_base = self.first_position();
        // The last commit time of the previous segment, if it has commit times.
        let mut previous_time = None;
        for (i, segment) in self.segments.iter().enumerate() {
            let is_last = i + 1 == self.segments.len();
            if segment.base != expected_base {
                found.damage.push(Damage {
                    file: segment.path.clone(),
                    offset: 0,
                    reason: format!(
                        "segment starts at position {} but the previous ones hold {expected_base} events",
                        segment.base
                    ),
                });
            }
            let encrypted = self.cipher.is_some();
            let read = self.load(segment).and_then(|loaded| {
                let walk = walk_records(&loaded.bytes, segment, encrypted)?;
                Ok((loaded, walk))
            });
            let (loaded, walk) = match read {
                Ok(read) => read,
                Err(e) => {
                    found.damage.push(damage_of(e, &segment.path));
                    progress(segment.bytes);
                    // Its event count is unknown: take the next segment's word for it.
                    expected_base = self.segments.get(i + 1).map_or(0, |next| next.base);
                    continue;
                }
            };
            if let Some((damage, followed_by_valid)) = loaded.block_damage {
                if is_last && !followed_by_valid {
                    found.repairable.push(damage);
                } else {
                    found.damage.push(damage);
                }
            }
            if let Some(incomplete) = loaded.incomplete_group {
                if is_last {
                    found.repairable.push(incomplete);
                } else {
                    found.damage.push(incomplete);
                }
            }
            let bytes = loaded.bytes;
            found.valid_records += walk.records.len() as u64;
            if let Some(damage) = walk.damage {
                if is_last && !walk.valid_after_damage && !encrypted {
                    found.repairable.push(damage);
                } else {
                    found.damage.push(damage);
                }
            }
            for record in &walk.records {
                if JsonLayout::parse(&bytes[record.body.clone()]).is_none() {
                    found.damage.push(Damage {
                        file: segment.path.clone(),
                        offset: record.offset,
                        reason: "record has a valid checksum but does not hold an event".into(),
                    });
                }
            }
            let ends: Vec<u64> = walk.records.iter().map(|r| r.end).collect();
            let index = SegmentPaths::new(&self.dir, segment.base).index;
            match index_files::read_index(&index, segment.base) {
                Some(entries) if entries == ends => {}
                // The server rebuilds the active segment's index from its records, and a
                // sealed one's when its length or last entry is wrong.
                Some(entries)
                    if !is_last
                        && entries.len() == ends.len()
                        && entries.last() == ends.last() =>
                {
                    found.damage.push(Damage {
                        file: index,
                        offset: 0,
                        reason: "index entries disagree with the segment's records; delete this .idx file so that the server rebuilds it".into(),
                    });
                }
                _ => found.repairable.push(Damage {
                    file: index,
                    offset: 0,
                    reason: "the index is missing or does not match the segment (the server rebuilds it when it opens the log)".into(),
                }),
            }
            if let (Some(frames), false) = (&loaded.frames, is_last) {
                let map = SegmentPaths::new(&self.dir, segment.base).frames;
                match index_files::read_frames_file(&map, segment.base) {
                    Some(stored) if stored == *frames => {}
                    Some(stored) if stored.last() == frames.last() => found.damage.push(Damage {
                        file: map,
                        offset: 0,
                        reason: "block map entries disagree with the blocks; delete this .frm file so that the server rebuilds it".into(),
                    }),
                    _ => found.repairable.push(Damage {
                        file: map,
                        offset: 0,
                        reason: "the block map is missing or does not match the segment (the server rebuilds it when it opens the log)".into(),
                    }),
                }
            }
            // Recovery keeps the complete batches of the last segment.
            let events = match is_last {
                true => walk
                    .records
                    .iter()
                    .rposition(|r| !r.continues)
                    .map_or(0, |i| i + 1),
                false => walk.records.len(),
            };
            let times = SegmentPaths::new(&self.dir, segment.base).times;
            previous_time = check_times(
                &times,
                segment.base,
                events,
                is_last,
                previous_time,
                &mut found,
            )?;
            expected_base = segment.base + walk.records.len() as u64;
            progress(segment.bytes);
        }
        Ok(found)
    }
}

/// Checks a segment's `.tim` file against its `events` (see [`segment`]); returns its last
/// commit time if it is usable, for the next segment's check.
fn check_times(
    path: &Path,
    base: u64,
    events: usize,
    is_last: bool,
    previous: Option<i64>,
    found: &mut Verification,
) -> Result<Option<i64>, StoreError> {
    let problem = |reason: String| Damage {
        file: path.to_owned(),
        offset: 0,
        reason,
    };
    let entries = match index_files::read_times_file(path, base)? {
        // Sealed by a version before commit times: their created_at stands in.
        TimesFile::Missing if !is_last => return Ok(None),
        TimesFile::Missing => {
            found.repairable.push(problem(
                "the commit times are missing (the server creates them when it opens the log, dating these events by that time)".into(),
            ));
            return Ok(None);
        }
        TimesFile::Malformed => Vec::new(),
        TimesFile::Entries(entries) => entries,
    };
    let floor = previous.map(crate::timestamp::Timestamp::from_unix_nanos);
    let believable = index_files::valid_times(&entries, floor);
    if is_last {
        if entries.len() != events || believable < events {
            found.repairable.push(problem(format!(
                "commit times for {} of the segment's {events} events (the server keeps the believable ones and dates the rest by the time it opens the log)",
                believable.min(events)
            )));
        }
        return Ok(None);
    }
    if entries.len() != events {
        found.repairable.push(problem(format!(
            "{} commit times for {events} events, or a malformed file: the server ignores it and judges this segment by its events' created_at",
            entries.len()
        )));
        return Ok(None);
    }
    if believable < events {
        found.damage.push(Damage {
            file: path.to_owned(),
            offset: index_files::times_entry_offset(believable as u64),
            reason: "commit time goes backwards (or is not a time); delete this .tim file so that the server judges this segment by its events' created_at".into(),
        });
        return Ok(None);
    }
    Ok(entries.last().copied())
}

fn damage_of(error: StoreError, file: &Path) -> Damage {
    match error {
        StoreError::Corrupt {
            file,
            offset,
            reason,
        } => Damage {
            file,
            offset,
            reason,
        },
        other => Damage {
            file: file.to_owned(),
            offset: 0,
            reason: other.to_string(),
        },
    }
}

struct RecordSpan {
    offset: u64,
    end: u64,
    body: Range<usize>,
    continues: bool,
}

struct Walk {
    records: Vec<RecordSpan>,
    /// The first record that is cut short or fails its checksum; nothing after it is read.
    damage: Option<Damage>,
    /// Whether a valid record starts somewhere after the damage (so it is not a torn end).
    valid_after_damage: bool,
}

/// Walks a segment's records (its logical stream if `encrypted`) from its header on,
/// stopping at the first damaged one.
fn walk_records(bytes: &[u8], segment: &SegmentFile, encrypted: bool) -> Result<Walk, StoreError> {
    let path = &segment.path;
    if bytes.len() < LOG_HEADER_LEN as usize {
        return Err(StoreError::corrupt(path, 0, "segment header is incomplete"));
    }
    check_log_header(bytes, segment.base, path, encrypted)?;
    let mut records = Vec::new();
    let mut at = LOG_HEADER_LEN as usize;
    while at < bytes.len() {
        let reason = match check_record(&bytes[at..]) {
            RecordCheck::Valid {
                body_len,
                continues,
            } => {
                let body =
                    at + RECORD_HEADER_LEN as usize..at + RECORD_HEADER_LEN as usize + body_len;
                let end = body.end;
                records.push(RecordSpan {
                    offset: at as u64,
                    end: end as u64,
                    body,
                    continues,
                });
                at = end;
                continue;
            }
            RecordCheck::Truncated => "record is cut short",
            RecordCheck::Damaged => "record checksum mismatch",
        };
        let reason = record::tail_reason(&bytes[at..], reason);
        let valid_after_damage = record::find_valid_record_after(bytes, at as u64).is_some();
        return Ok(Walk {
            records,
            damage: Some(Damage {
                file: path.clone(),
                offset: at as u64,
                reason: reason.into(),
            }),
            valid_after_damage,
        });
    }
    Ok(Walk {
        records,
        damage: None,
        valid_after_damage: false,
    })
}
