//! One log file of the reference server, as its storage library ella.to/immuta writes it
//! (`logfile.go` in github.com/ella-to/immuta, the version with a 16-byte file header that
//! ella.to/bus v0.6.x uses):
//!
//! ```text
//! offset 0   i64 LE   records committed (the count a reader trusts)
//! offset 8   i64 LE   byte offset of the last committed record (0 while there is none)
//! offset 16  records, one after the other, each:
//!            i64 LE   length of the content
//!            content  (the event's JSON; sealed by ella.to/crypto when encrypted)
//! ```
//!
//! An append writes the record (length placeholder, content, then the length) and, once
//! the batch is complete, rewrites the header. So the header's count is what the reference
//! had acknowledged: its own readers deliver exactly that many records and never what
//! lies after them (a write a crash interrupted, or a batch that failed). [`LogFile`]
//! does the same, and reports those bytes ([`LogEnd::trailing`]) instead of hiding them.
//!
//! There are no checksums in this format: what can be checked is that every length fits
//! in the file, that the header's last offset is where the last record starts, and (one
//! level up) that each content is an event. A failed check names the file, the record's
//! number and its byte offset.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Bytes of the file header: the record count and the offset of the last record.
pub const FILE_HEADER_LEN: u64 = 16;
/// Bytes of a record's header: the content's length.
pub const RECORD_HEADER_LEN: u64 = 8;

/// What went wrong reading a reference file; each message names the file and, for a
/// record, its number (from 0) and byte offset.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: {len} bytes, shorter than the {FILE_HEADER_LEN}-byte header of a reference log \
         file (the file is truncated, or not a log file of ella.to/bus)",
        path.display()
    )]
    ShortHeader { path: PathBuf, len: u64 },
    #[error(
        "{}: the header counts {count} records, which is impossible (not a log file of \
         ella.to/bus v0.6 or later, or a damaged one)",
        path.display()
    )]
    BadHeader { path: PathBuf, count: i64 },
    #[error(
        "{}: record {number} at byte offset {offset} is cut off: {what}, but the file ends \
         {available} bytes after that offset (the header counts {count} records; the file \
         is truncated or damaged)",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        number: u64,
        offset: u64,
        count: u64,
        what: String,
        available: u64,
    },
    #[error(
        "{}: record {number} at byte offset {offset} has an impossible length {length} \
         (the file is damaged)",
        path.display()
    )]
    BadLength {
        path: PathBuf,
        number: u64,
        offset: u64,
        length: i64,
    },
    #[error(
        "{}: record {number} at byte offset {offset} could not be decrypted: {reason}",
        path.display()
    )]
    Decrypt {
        path: PathBuf,
        number: u64,
        offset: u64,
        reason: String,
    },
}

/// One record: its number (from 0), the byte offset of its length, and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub number: u64,
    pub offset: u64,
    pub content: Vec<u8>,
}

/// What the file holds besides its committed records, once they are all read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEnd {
    /// Records read.
    pub records: u64,
    /// Bytes after the last committed record: `(offset, length)`. The reference never
    /// delivers them (an interrupted or failed write).
    pub trailing: Option<(u64, u64)>,
    /// The header's offset of the last record when it is not where the last record
    /// starts: `(header, actual)`. The records are still all there.
    pub last_offset_mismatch: Option<(u64, u64)>,
}

/// A reference log file read record by record, front to back.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    reader: BufReader<File>,
    len: u64,
    count: u64,
    header_last_offset: u64,
    /// Number and offset of the next record.
    next: u64,
    offset: u64,
    /// Offset of the last record read.
    last_read: Option<u64>,
}

impl LogFile {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<LogFile, ReferenceError> {
        let io = |source| ReferenceError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        if len < FILE_HEADER_LEN {
            return Err(ReferenceError::ShortHeader {
                path: path.to_path_buf(),
                len,
            });
        }
        let mut header = [0u8; FILE_HEADER_LEN as usize];
        reader.read_exact(&mut header).map_err(io)?;
        let (count, last) = parse_header(&header);
        let count = u64::try_from(count).map_err(|_| ReferenceError::BadHeader {
            path: path.to_path_buf(),
            count,
        })?;
        Ok(LogFile {
            path: path.to_path_buf(),
            reader,
            len,
            count,
            // A negative offset cannot match any record: reported at the end.
            header_last_offset: u64::try_from(last).unwrap_or(u64::MAX),
            next: 0,
            offset: FILE_HEADER_LEN,
            last_read: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The records the header says are committed.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The next committed record, or `None` after the last one.
    pub fn next_record(&mut self) -> Result<Option<Record>, ReferenceError> {
        if self.next >= self.count {
            return Ok(None);
        }
        let (number, offset) = (self.next, self.offset);
        let available = self.len.saturating_sub(offset);
        let truncated = |what: String| ReferenceError::Truncated {
            path: self.path.clone(),
            number,
            offset,
            count: self.count,
            what,
            available,
        };
        if available < RECORD_HEADER_LEN {
            return Err(truncated(format!(
                "its {RECORD_HEADER_LEN}-byte length is missing"
            )));
        }
        let mut length = [0u8; RECORD_HEADER_LEN as usize];
        self.reader
            .read_exact(&mut length)
            .map_err(|source| self.io(source))?;
        let length = i64::from_le_bytes(length);
        let content_len = u64::try_from(length).map_err(|_| ReferenceError::BadLength {
            path: self.path.clone(),
            number,
            offset,
            length,
        })?;
        if available - RECORD_HEADER_LEN < content_len {
            return Err(truncated(format!(
                "its length says {content_len} bytes of content follow its \
                 {RECORD_HEADER_LEN}-byte header"
            )));
        }
        // The length fits in the file, so the allocation is bounded by the file's size.
        let mut content = vec![0u8; content_len as usize];
        self.reader
            .read_exact(&mut content)
            .map_err(|source| self.io(source))?;
        self.next += 1;
        self.offset = offset + RECORD_HEADER_LEN + content_len;
        self.last_read = Some(offset);
        Ok(Some(Record {
            number,
            offset,
            content,
        }))
    }

    /// What follows the committed records; meaningful once [`LogFile::next_record`] has
    /// returned `None`.
    pub fn end(&self) -> LogEnd {
        let trailing = (self.offset < self.len).then(|| (self.offset, self.len - self.offset));
        let actual_last = self.last_read.unwrap_or(0);
        let last_offset_mismatch = (self.header_last_offset != actual_last)
            .then_some((self.header_last_offset, actual_last));
        LogEnd {
            records: self.next,
            trailing,
            last_offset_mismatch,
        }
    }

    fn io(&self, source: std::io::Error) -> ReferenceError {
        ReferenceError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// The header's record count and last record offset.
pub fn parse_header(header: &[u8; FILE_HEADER_LEN as usize]) -> (i64, i64) {
    let mut count = [0u8; 8];
    let mut last = [0u8; 8];
    count.copy_from_slice(&header[..8]);
    last.copy_from_slice(&header[8..]);
    (i64::from_le_bytes(count), i64::from_le_bytes(last))
}

/// A log file in this format holding `contents` as committed records: what the reference
/// writes. For tests (the import's, and anyone's who needs a reference file to read).
pub fn encode(contents: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![0u8; FILE_HEADER_LEN as usize];
    let mut last = 0u64;
    for content in contents {
        last = out.len() as u64;
        out.extend_from_slice(&(content.len() as i64).to_le_bytes());
        out.extend_from_slice(content);
    }
    out[..8].copy_from_slice(&(contents.len() as i64).to_le_bytes());
    out[8..16].copy_from_slice(&last.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, bytes: &[u8]) -> PathBuf {
        let path = dir.join("app.log");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn read_all(path: &Path) -> Result<(Vec<Record>, LogEnd), ReferenceError> {
        let mut file = LogFile::open(path)?;
        let mut records = Vec::new();
        while let Some(record) = file.next_record()? {
            records.push(record);
        }
        Ok((records, file.end()))
    }

    #[test]
    fn reads_records_with_numbers_and_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &encode(&[b"{\"a\":1}", b"", b"xyz"]));
        let (records, end) = read_all(&path).unwrap();
        assert_eq!(
            records,
            vec![
                Record {
                    number: 0,
                    offset: 16,
                    content: b"{\"a\":1}".to_vec()
                },
                Record {
                    number: 1,
                    offset: 31,
                    content: Vec::new()
                },
                Record {
                    number: 2,
                    offset: 39,
                    content: b"xyz".to_vec()
                },
            ]
        );
        assert_eq!(
            end,
            LogEnd {
                records: 3,
                trailing: None,
                last_offset_mismatch: None
            }
        );
    }

    #[test]
    fn an_empty_log_is_its_zeroed_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &[0u8; 16]);
        let (records, end) = read_all(&path).unwrap();
        assert!(records.is_empty());
        assert_eq!(end.trailing, None);
        assert_eq!(end.last_offset_mismatch, None);
    }

    #[test]
    fn reads_the_fixture_written_by_the_reference() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ella-bus-data/data/orders.log");
        let (records, end) = read_all(&path).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(
            records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [16, 206, 371]
        );
        assert!(records[0]
            .content
            .starts_with(b"{\"id\":\"e_dc7b591ksdua9bnpqm00\""));
        assert_eq!(end.trailing, None);
        assert_eq!(end.last_offset_mismatch, None);
    }

    #[test]
    fn a_cut_off_record_names_file_number_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode(&[b"first", b"second record"]);
        bytes.truncate(bytes.len() - 4);
        let path = write(dir.path(), &bytes);
        let error = read_all(&path).unwrap_err();
        let message = error.to_string();
        assert!(matches!(
            error,
            ReferenceError::Truncated {
                number: 1,
                offset: 29,
                available: 17,
                ..
            }
        ));
        assert!(message.contains("app.log"), "{message}");
        assert!(message.contains("record 1 at byte offset 29"), "{message}");
        assert!(message.contains("13 bytes of content"), "{message}");
    }

    #[test]
    fn a_cut_off_length_is_reported_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode(&[b"first", b"second"]);
        bytes.truncate(29 + 3);
        let path = write(dir.path(), &bytes);
        let message = read_all(&path).unwrap_err().to_string();
        assert!(message.contains("record 1 at byte offset 29"), "{message}");
        assert!(message.contains("length is missing"), "{message}");
    }

    #[test]
    fn a_header_counting_more_records_than_there_are_is_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode(&[b"only"]);
        bytes[..8].copy_from_slice(&2i64.to_le_bytes());
        let path = write(dir.path(), &bytes);
        let error = read_all(&path).unwrap_err();
        assert!(matches!(
            error,
            ReferenceError::Truncated {
                number: 1,
                offset: 28,
                available: 0,
                ..
            }
        ));
    }

    #[test]
    fn impossible_lengths_and_headers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode(&[b"abc"]);
        bytes[16..24].copy_from_slice(&(-5i64).to_le_bytes());
        let path = write(dir.path(), &bytes);
        assert!(matches!(
            read_all(&path).unwrap_err(),
            ReferenceError::BadLength { length: -5, .. }
        ));

        let path = write(dir.path(), &[1, 2, 3]);
        assert!(matches!(
            read_all(&path).unwrap_err(),
            ReferenceError::ShortHeader { len: 3, .. }
        ));

        let mut bytes = encode(&[]);
        bytes[..8].copy_from_slice(&(-1i64).to_le_bytes());
        let path = write(dir.path(), &bytes);
        assert!(matches!(
            read_all(&path).unwrap_err(),
            ReferenceError::BadHeader { count: -1, .. }
        ));
    }

    #[test]
    fn bytes_after_the_committed_records_are_reported_not_read() {
        let dir = tempfile::tempdir().unwrap();
        // An append whose batch was never committed: the header still counts one record.
        let mut bytes = encode(&[b"committed"]);
        bytes.extend_from_slice(&7i64.to_le_bytes());
        bytes.extend_from_slice(b"pending");
        let path = write(dir.path(), &bytes);
        let (records, end) = read_all(&path).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(end.trailing, Some((33, 15)));
        assert_eq!(end.last_offset_mismatch, None);
    }

    #[test]
    fn a_wrong_last_offset_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode(&[b"a", b"b"]);
        bytes[8..16].copy_from_slice(&16u64.to_le_bytes());
        let path = write(dir.path(), &bytes);
        let (records, end) = read_all(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(end.last_offset_mismatch, Some((16, 25)));
    }
}
