//! The 24-byte header of a segment's `.log` file: `BUSLOG\0\x01`, the segment's base
//! position (u64), flags (u32) and the CRC32C of the preceding 20 bytes, little-endian.
//!
//! What it promises: a file is read as a segment only if its header is intact, names the
//! position its file name does, uses no feature this version does not know, and says the
//! segment is encrypted exactly when the log is opened with a key; each refusal says why.

use std::path::Path;

use super::error::StoreError;

pub const LOG_HEADER_LEN: u64 = 24;
const LOG_MAGIC: &[u8; 8] = b"BUSLOG\x00\x01";

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

#[cfg(test)]
mod tests {
    use super::*;

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
