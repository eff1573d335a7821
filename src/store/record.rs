//! Record framing: how one event is stored in a segment's `.log` file, and how to judge
//! bytes that do not hold a valid record.
//!
//! A record is a 4-byte word (body length in the low 31 bits; the top bit set means "the
//! next record belongs to the same batch"), the CRC32C of the word and the body, then the
//! body: the event's compact JSON. Little-endian. The records of a segment follow its
//! header (see [`super::log_header`]); in an encrypted segment they form the logical
//! stream that its frames seal (see [`super::cipher`]).
//!
//! What it promises: a record is valid only if it is whole and its checksum matches, so
//! damage is always detected, never read as an event. A zero header is never valid (it
//! fails its CRC): zeros the writer prepared ahead of its records are not records, and
//! [`tail_reason`] tells them apart from damage. It lays out and checks bytes only; it
//! does no I/O.

use super::error::StoreError;

pub const RECORD_HEADER_LEN: u64 = 8;
const CONTINUES: u32 = 1 << 31;
/// The largest record body the framing can express.
pub const MAX_BODY_LEN: usize = (CONTINUES - 1) as usize;

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
}
