//! Encryption at rest: NaCl secretbox (XSalsa20-Poly1305) under the segments' records.
//!
//! An encrypted segment's `.log` starts with the usual 24-byte header, its `ENCRYPTED`
//! flag set, followed by sealed frames instead of bare records. The records themselves
//! (framing, CRCs, batch flags) are exactly those of a plain segment: they form the
//! segment's *logical* byte stream, which starts at offset 24 as in a plain file and which
//! the `.idx` file indexes. So everything above this module (reads by position, ids,
//! recovery of batches) is the same for both kinds.
//!
//! A frame seals up to `block_size` bytes of the logical stream:
//!
//! ```text
//! u32 LE   sealed length (16 + data length), top bit GROUP_END
//! u64 LE   logical offset of the data (a hint for finding frames in a damaged file)
//! 24 bytes nonce (fresh and random for every frame)
//! 16 bytes Poly1305 tag
//! sealed:  segment base u64 LE, logical offset u64 LE, data
//! ```
//!
//! The sealed copy of (base, offset) is what is trusted: a frame moved within or between
//! segments fails the check even though its tag is valid; the clear copy must agree with
//! it, so that no byte of a frame can change unnoticed. The writer seals each group
//! commit into frames of its own and marks the last one `GROUP_END`: frames are never
//! rewritten, a crash can only tear the frames of one unacknowledged group, and recovery
//! cuts back to the end of the last complete group.
//!
//! The key is the SHA-256 of the secret. Each namespace's `meta.json` keeps a key check
//! (a constant sealed with the key), so that a wrong or missing key is reported before
//! any segment is read.

use crypto_secretbox::aead::{AeadInPlace, KeyInit};
use crypto_secretbox::{Key, Nonce, Tag, XSalsa20Poly1305};
use sha2::{Digest, Sha256};

use super::error::StoreError;
use super::record;

/// Bytes before the sealed part of a frame: length word, offset hint, nonce, tag.
pub const FRAME_HEADER_LEN: usize = 4 + 8 + 24 + 16;
/// The sealed (base, offset) prefix.
const SEALED_PREFIX_LEN: usize = 16;
/// Where an opened frame's data starts in the frame.
pub const DATA_OFFSET: usize = FRAME_HEADER_LEN + SEALED_PREFIX_LEN;
const GROUP_END: u32 = 1 << 31;
/// Default plaintext bytes per frame.
pub const DEFAULT_BLOCK_SIZE: usize = 4096;
/// Limits of `--block-size`. The upper one also bounds what a reader accepts as a frame
/// length, which keeps the search for valid frames after damage cheap.
pub const MIN_BLOCK_SIZE: usize = 256;
pub const MAX_BLOCK_SIZE: usize = 1 << 20;
const MAX_SEALED_LEN: usize = SEALED_PREFIX_LEN + MAX_BLOCK_SIZE;
const KEY_CHECK_TEXT: &[u8] = b"bus key check v1";

/// The key and block size of an encrypted store.
#[derive(Clone)]
pub struct Cipher {
    aead: XSalsa20Poly1305,
    block_size: usize,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Cipher")
            .field("block_size", &self.block_size)
            .finish_non_exhaustive()
    }
}

/// Where a frame ends, in the logical stream and in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameEnd {
    pub logical: u64,
    pub disk: u64,
}

/// A frame's clear header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub sealed_len: usize,
    pub logical_start: u64,
    pub group_end: bool,
}

impl FrameHead {
    /// Parses the header at the start of `buf`; `None` if `buf` is too short for one or
    /// the length is impossible.
    pub fn parse(buf: &[u8]) -> Option<FrameHead> {
        let word = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?);
        let logical_start = u64::from_le_bytes(buf.get(4..12)?.try_into().ok()?);
        let sealed_len = (word & !GROUP_END) as usize;
        if !(SEALED_PREFIX_LEN..=MAX_SEALED_LEN).contains(&sealed_len) {
            return None;
        }
        Some(FrameHead {
            sealed_len,
            logical_start,
            group_end: word & GROUP_END != 0,
        })
    }

    /// The frame's length on disk.
    pub fn disk_len(&self) -> usize {
        FRAME_HEADER_LEN + self.sealed_len
    }

    /// Plaintext bytes of the logical stream it holds.
    pub fn data_len(&self) -> usize {
        self.sealed_len - SEALED_PREFIX_LEN
    }
}

impl Cipher {
    /// The cipher for `secret` (which must not be empty) sealing `block_size` bytes per
    /// frame.
    pub fn new(secret: &str, block_size: usize) -> Result<Cipher, String> {
        if secret.is_empty() {
            return Err("the secret key is empty".into());
        }
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(format!(
                "block size {block_size} is out of range: use {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} bytes"
            ));
        }
        let digest = Sha256::digest(secret.as_bytes());
        let key = Key::clone_from_slice(&digest);
        Ok(Cipher {
            aead: XSalsa20Poly1305::new(&key),
            block_size,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// A key check for `meta.json`: nonce, tag and the sealed constant, in hex.
    pub fn key_check(&self) -> Result<String, StoreError> {
        let nonce = random_nonce()?;
        let mut sealed = KEY_CHECK_TEXT.to_vec();
        let tag = self
            .aead
            .encrypt_in_place_detached(&nonce, b"", &mut sealed)
            .map_err(|_| StoreError::Unusable("sealing the key check failed".into()))?;
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&tag);
        bytes.extend_from_slice(&sealed);
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Whether a key check was made with this key.
    pub fn matches_key_check(&self, hex: &str) -> bool {
        let Some(bytes) = decode_hex(hex) else {
            return false;
        };
        if bytes.len() != 24 + 16 + KEY_CHECK_TEXT.len() {
            return false;
        }
        let nonce = Nonce::clone_from_slice(&bytes[..24]);
        let tag = Tag::clone_from_slice(&bytes[24..40]);
        let mut sealed = bytes[40..].to_vec();
        self.aead
            .decrypt_in_place_detached(&nonce, b"", &mut sealed, &tag)
            .is_ok()
            && sealed == KEY_CHECK_TEXT
    }

    /// Seals `data`, the logical bytes from `logical_start` on of the segment at `base`,
    /// into frames of at most a block each, appended to `out`. The file offset where
    /// `out`'s first byte will go is `disk_start`; each frame's end is pushed to `ends`.
    /// The last frame is marked as the end of a group.
    pub fn seal(
        &self,
        base: u64,
        logical_start: u64,
        data: &[u8],
        disk_start: u64,
        out: &mut Vec<u8>,
        ends: &mut Vec<FrameEnd>,
    ) -> Result<(), StoreError> {
        let out_start = out.len();
        let mut logical = logical_start;
        let chunks = data.chunks(self.block_size);
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.enumerate() {
            let sealed_len = SEALED_PREFIX_LEN + chunk.len();
            let word = sealed_len as u32 | if i == last { GROUP_END } else { 0 };
            let nonce = random_nonce()?;
            out.extend_from_slice(&word.to_le_bytes());
            out.extend_from_slice(&logical.to_le_bytes());
            out.extend_from_slice(&nonce);
            let tag_at = out.len();
            out.extend_from_slice(&[0u8; 16]);
            let sealed_at = out.len();
            out.extend_from_slice(&base.to_le_bytes());
            out.extend_from_slice(&logical.to_le_bytes());
            out.extend_from_slice(chunk);
            let tag = self
                .aead
                .encrypt_in_place_detached(&nonce, b"", &mut out[sealed_at..])
                .map_err(|_| StoreError::Unusable("sealing a block failed".into()))?;
            out[tag_at..sealed_at].copy_from_slice(&tag);
            logical += chunk.len() as u64;
            ends.push(FrameEnd {
                logical,
                disk: disk_start + (out.len() - out_start) as u64,
            });
        }
        Ok(())
    }

    /// Opens the frame that fills `frame` exactly (decrypting in place) and returns its
    /// data, after checking that it belongs at `logical_start` of segment `base`.
    pub fn open<'a>(
        &self,
        base: u64,
        logical_start: u64,
        frame: &'a mut [u8],
    ) -> Result<&'a [u8], &'static str> {
        let head = FrameHead::parse(frame).ok_or("block header is damaged")?;
        if frame.len() != head.disk_len() {
            return Err("block is cut short");
        }
        if head.logical_start != logical_start {
            return Err("block header is damaged (its offset is not the expected one)");
        }
        let nonce = Nonce::clone_from_slice(&frame[12..36]);
        let tag = Tag::clone_from_slice(&frame[36..52]);
        let sealed = &mut frame[FRAME_HEADER_LEN..];
        self.aead
            .decrypt_in_place_detached(&nonce, b"", sealed, &tag)
            .map_err(|_| "block fails authentication (damaged or modified)")?;
        let sealed_base = u64::from_le_bytes(sealed[..8].try_into().unwrap_or_default());
        let sealed_start = u64::from_le_bytes(sealed[8..16].try_into().unwrap_or_default());
        if sealed_base != base || sealed_start != logical_start {
            return Err("block belongs elsewhere (moved within or between segments)");
        }
        Ok(&frame[FRAME_HEADER_LEN + SEALED_PREFIX_LEN..])
    }
}

/// Bytes a sealed message adds to its data: nonce, tag and the sealed context.
pub const MESSAGE_OVERHEAD: usize = 24 + 16 + 8;

impl Cipher {
    /// Seals one message (a whole event, on stores that keep events as messages): nonce,
    /// tag, then `context` and `data` sealed. The context (which log the message belongs
    /// to) is checked on opening, so that a message copied into another log is refused.
    pub fn seal_message(&self, context: u64, data: &[u8]) -> Result<Vec<u8>, StoreError> {
        let nonce = random_nonce()?;
        let mut out = Vec::with_capacity(MESSAGE_OVERHEAD + data.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&context.to_le_bytes());
        out.extend_from_slice(data);
        let tag = self
            .aead
            .encrypt_in_place_detached(&nonce, b"", &mut out[40..])
            .map_err(|_| StoreError::Unusable("sealing an event failed".into()))?;
        out[24..40].copy_from_slice(&tag);
        Ok(out)
    }

    /// Opens a message sealed by [`Cipher::seal_message`] with the same `context`.
    pub fn open_message(&self, context: u64, sealed: &[u8]) -> Result<Vec<u8>, &'static str> {
        if sealed.len() < MESSAGE_OVERHEAD {
            return Err("the message is too short to be sealed");
        }
        let nonce = Nonce::clone_from_slice(&sealed[..24]);
        let tag = Tag::clone_from_slice(&sealed[24..40]);
        let mut data = sealed[40..].to_vec();
        self.aead
            .decrypt_in_place_detached(&nonce, b"", &mut data, &tag)
            .map_err(|_| "the message fails authentication (a wrong key, or modified)")?;
        if data[..8] != context.to_le_bytes() {
            return Err("the message belongs to another log");
        }
        data.drain(..8);
        Ok(data)
    }
}

fn random_nonce() -> Result<Nonce, StoreError> {
    let mut nonce = [0u8; 24];
    getrandom::fill(&mut nonce)
        .map_err(|e| StoreError::Unusable(format!("no randomness for a nonce: {e}")))?;
    Ok(Nonce::clone_from_slice(&nonce))
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What decrypting a whole segment found.
#[derive(Debug, Default)]
pub struct Decrypted {
    /// The logical stream: 24 placeholder header bytes, then the data of every frame up to
    /// the end of the last complete group.
    pub logical: Vec<u8>,
    /// Ends of the frames kept.
    pub frames: Vec<FrameEnd>,
    /// File length of what is kept (the end of the last complete group).
    pub disk_len: u64,
    /// The first frame that is cut short, damaged or out of place, with why.
    pub damage: Option<(u64, &'static str)>,
    /// Whether a valid frame follows the damage (so it is not an interrupted write).
    pub valid_after_damage: Option<u64>,
    /// Frames after the last complete group (a group whose end never came), if any: the
    /// file offset where they start.
    pub incomplete_group_at: Option<u64>,
}

/// Decrypts every frame of a segment's file contents (`bytes`, header included).
pub fn decrypt_segment(cipher: &Cipher, base: u64, bytes: &[u8], header_len: usize) -> Decrypted {
    let mut found = Decrypted {
        logical: bytes[..header_len.min(bytes.len())].to_vec(),
        disk_len: header_len as u64,
        ..Decrypted::default()
    };
    let mut scratch = Vec::new();
    let mut at = header_len;
    let mut logical = header_len as u64;
    // Frames and logical bytes of the group being read, kept once its end comes.
    let mut group_frames = Vec::new();
    let mut group_data: Vec<u8> = Vec::new();
    let mut group_start = at;
    while at < bytes.len() {
        let head = match FrameHead::parse(&bytes[at..]) {
            Some(head) if at + head.disk_len() <= bytes.len() => head,
            Some(_) => {
                found.damage = Some((at as u64, "block is cut short"));
                break;
            }
            None if bytes.len() - at < FRAME_HEADER_LEN => {
                let reason = record::tail_reason(&bytes[at..], "block header is cut short");
                found.damage = Some((at as u64, reason));
                break;
            }
            None => {
                let reason = record::tail_reason(&bytes[at..], "block header is damaged");
                found.damage = Some((at as u64, reason));
                break;
            }
        };
        scratch.clear();
        scratch.extend_from_slice(&bytes[at..at + head.disk_len()]);
        match cipher.open(base, logical, &mut scratch) {
            Ok(data) => {
                group_data.extend_from_slice(data);
                logical += data.len() as u64;
                at += head.disk_len();
                group_frames.push(FrameEnd {
                    logical,
                    disk: at as u64,
                });
            }
            Err(reason) => {
                found.damage = Some((at as u64, reason));
                break;
            }
        }
        if head.group_end {
            found.logical.append(&mut group_data);
            found.frames.append(&mut group_frames);
            found.disk_len = at as u64;
            group_start = at;
        }
    }
    if let Some((damaged_at, _)) = found.damage {
        found.valid_after_damage = find_frame_after(cipher, base, bytes, damaged_at as usize);
    }
    // Frames read since the last group end belong to a group that never ended.
    if !group_frames.is_empty() {
        found.incomplete_group_at = Some(group_start as u64);
    }
    found
}

/// The offset of a valid frame of segment `base` starting after `damaged_at`, if any.
fn find_frame_after(cipher: &Cipher, base: u64, bytes: &[u8], damaged_at: usize) -> Option<u64> {
    let mut scratch = Vec::new();
    for start in damaged_at + 1..bytes.len() {
        let Some(head) = FrameHead::parse(&bytes[start..]) else {
            continue;
        };
        if start + head.disk_len() > bytes.len() {
            continue;
        }
        scratch.clear();
        scratch.extend_from_slice(&bytes[start..start + head.disk_len()]);
        if cipher.open(base, head.logical_start, &mut scratch).is_ok() {
            return Some(start as u64);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(secret: &str) -> Cipher {
        Cipher::new(secret, MIN_BLOCK_SIZE).unwrap()
    }

    #[test]
    fn messages_open_only_with_their_key_and_context_and_unmodified() {
        let c = cipher("s3cret");
        let data = br#"{"id":"e_1","payload":{"card":"4111"}}"#;
        let sealed = c.seal_message(7, data).unwrap();
        assert_eq!(sealed.len(), data.len() + MESSAGE_OVERHEAD);
        assert!(!sealed.windows(4).any(|w| w == b"4111"));
        assert_eq!(c.open_message(7, &sealed).unwrap(), data);
        assert_ne!(c.seal_message(7, data).unwrap(), sealed, "fresh nonces");
        assert!(c.open_message(8, &sealed).is_err(), "another log");
        assert!(
            cipher("other").open_message(7, &sealed).is_err(),
            "another key"
        );
        for bit in 0..sealed.len() * 8 {
            let mut flipped = sealed.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(c.open_message(7, &flipped).is_err(), "bit {bit}");
        }
        assert!(c.open_message(7, &sealed[..MESSAGE_OVERHEAD - 1]).is_err());
    }

    #[test]
    fn frames_round_trip_and_detect_every_flipped_bit() {
        let c = cipher("s3cret");
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let (mut out, mut ends) = (Vec::new(), Vec::new());
        c.seal(7, 24, &data, 24, &mut out, &mut ends).unwrap();
        assert_eq!(ends.len(), 4, "1000 bytes in blocks of 256");
        assert_eq!(ends.last().unwrap().logical, 1024);
        let mut file = vec![0u8; 24];
        file.extend_from_slice(&out);
        let found = decrypt_segment(&c, 7, &file, 24);
        assert_eq!(&found.logical[24..], &data[..]);
        assert_eq!(found.frames, ends);
        assert_eq!(found.disk_len, file.len() as u64);
        assert!(found.damage.is_none() && found.incomplete_group_at.is_none());

        for i in (24..file.len()).step_by(7) {
            let mut bad = file.clone();
            bad[i] ^= 0x10;
            let found = decrypt_segment(&c, 7, &bad, 24);
            assert!(found.damage.is_some(), "flip at {i} unnoticed");
            assert!(found.logical.len() < 24 + data.len());
        }
        // Another segment's base, or another key: refused.
        assert!(decrypt_segment(&c, 8, &file, 24).damage.is_some());
        assert!(decrypt_segment(&cipher("other"), 7, &file, 24)
            .damage
            .is_some());
    }

    #[test]
    fn a_torn_group_is_dropped_whole() {
        let c = cipher("k");
        let (mut out, mut ends) = (Vec::new(), Vec::new());
        c.seal(0, 24, &[1u8; 100], 24, &mut out, &mut ends).unwrap();
        let first_group = out.len();
        c.seal(
            0,
            124,
            &[2u8; 600],
            24 + first_group as u64,
            &mut out,
            &mut ends,
        )
        .unwrap();
        let mut file = vec![0u8; 24];
        file.extend_from_slice(&out);
        // Cut inside the second group's last frame: its first frames are valid but the
        // group never ended.
        file.truncate(file.len() - 10);
        let found = decrypt_segment(&c, 0, &file, 24);
        assert_eq!(found.logical.len(), 124);
        assert_eq!(found.disk_len, 24 + first_group as u64);
        assert_eq!(found.incomplete_group_at, Some(24 + first_group as u64));
        assert_eq!(found.damage.map(|d| d.1), Some("block is cut short"));
        assert_eq!(found.valid_after_damage, None);
    }

    #[test]
    fn key_checks() {
        let check = cipher("right").key_check().unwrap();
        assert!(cipher("right").matches_key_check(&check));
        assert!(!cipher("wrong").matches_key_check(&check));
        assert!(!cipher("right").matches_key_check("zz"));
        assert!(Cipher::new("", 4096).is_err());
        assert!(Cipher::new("k", 10).is_err());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "a measurement: cargo test --release --lib cipher_speed -- --ignored --nocapture"]
    fn cipher_speed() {
        let c = Cipher::new("k", 4096).unwrap();
        let data = vec![7u8; 64 << 20];
        let (mut out, mut ends) = (Vec::new(), Vec::new());
        let t = std::time::Instant::now();
        c.seal(0, 24, &data, 24, &mut out, &mut ends).unwrap();
        let seal = t.elapsed();
        let mut file = vec![0u8; 24];
        file.extend_from_slice(&out);
        let t = std::time::Instant::now();
        let found = decrypt_segment(&c, 0, &file, 24);
        let open = t.elapsed();
        assert_eq!(found.logical.len(), 24 + data.len());
        let mb = data.len() as f64 / 1e6;
        println!(
            "seal {:.0} MB/s, open {:.0} MB/s",
            mb / seal.as_secs_f64(),
            mb / open.as_secs_f64()
        );
    }
}
