//! Opening records that the reference server encrypted (it was started with a secret
//! key): ella.to/bus seals each record's content with ella.to/crypto's
//! `EncryptStream(key, blockSize, w, r)`, the key being the SHA-256 of the secret
//! (`encryption.go` in github.com/ella-to/bus) and the block size its `--block-size`
//! (4096 by default).
//!
//! **Untested against the reference.** The source of ella.to/crypto could not be read
//! where this was written, and no file encrypted by the reference is at hand; what is
//! implemented is the layout such a stream has when built, as its signature says, on
//! NaCl secretbox (XSalsa20-Poly1305, the `crypto_secretbox` of Go's
//! golang.org/x/crypto/nacl/secretbox) in blocks:
//!
//! ```text
//! per block:  24-byte nonce | 16-byte Poly1305 tag | ciphertext of up to a block
//! ```
//!
//! every block full but the last. Whether "block size" counts a block's plaintext, its
//! sealed box (tag and ciphertext) or the whole block with its nonce is the one thing the
//! signature does not tell, so [`ReferenceCipher::open`] accepts each of the three: a
//! reading is taken only if every block's tag verifies, so a wrong guess can never yield
//! data (it fails, as a wrong key does). Should the reference's layout differ otherwise,
//! the import says the records could not be decrypted; it never imports garbage.

use crypto_secretbox::aead::{AeadInPlace, KeyInit};
use crypto_secretbox::{Key, Nonce, Tag, XSalsa20Poly1305};
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes a block adds to its plaintext.
pub const BLOCK_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// The reference's default `--block-size`.
pub const DEFAULT_BLOCK_SIZE: usize = 4096;

/// The key and block size of a reference server's encrypted files.
#[derive(Clone)]
pub struct ReferenceCipher {
    aead: XSalsa20Poly1305,
    block_size: usize,
}

impl std::fmt::Debug for ReferenceCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ReferenceCipher")
            .field("block_size", &self.block_size)
            .finish_non_exhaustive()
    }
}

impl ReferenceCipher {
    /// The cipher of a reference server started with `secret` and `block_size`.
    pub fn new(secret: &str, block_size: usize) -> Result<ReferenceCipher, String> {
        if secret.is_empty() {
            return Err("the reference's secret key is empty".into());
        }
        if block_size <= BLOCK_OVERHEAD {
            return Err(format!(
                "reference block size {block_size} is too small: the reference's is its \
                 --block-size (4096 unless it was given one)"
            ));
        }
        let digest = Sha256::digest(secret.as_bytes());
        Ok(ReferenceCipher {
            aead: XSalsa20Poly1305::new(&Key::clone_from_slice(&digest)),
            block_size,
        })
    }

    /// The plaintext of one sealed record content. The error says what to check.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        if sealed.is_empty() {
            return Ok(Vec::new());
        }
        // Whole blocks on disk, for each way of counting the block size (see the module
        // docs). A wrong reading fails at its first block that differs, so the cost of
        // trying is at most a block's work per reading.
        let candidates = [
            self.block_size + BLOCK_OVERHEAD,
            self.block_size + NONCE_LEN,
            self.block_size,
        ];
        if let Some(plain) = candidates
            .into_iter()
            .find_map(|block| self.open_blocks(sealed, block))
        {
            return Ok(plain);
        }
        Err(format!(
            "no block of it opens with the key and block size {} given (check \
             --reference-secret-key and --reference-block-size against the reference \
             server's --secret-key and --block-size; this reader of the reference's \
             encryption has not been tried on files the reference wrote)",
            self.block_size
        ))
    }

    /// The plaintext if every block of `block` bytes on disk (the last one shorter)
    /// opens.
    fn open_blocks(&self, sealed: &[u8], block: usize) -> Option<Vec<u8>> {
        let mut plain = Vec::with_capacity(sealed.len());
        for chunk in sealed.chunks(block) {
            if chunk.len() < BLOCK_OVERHEAD {
                return None;
            }
            let nonce = Nonce::clone_from_slice(&chunk[..NONCE_LEN]);
            let tag = Tag::clone_from_slice(&chunk[NONCE_LEN..BLOCK_OVERHEAD]);
            let start = plain.len();
            plain.extend_from_slice(&chunk[BLOCK_OVERHEAD..]);
            self.aead
                .decrypt_in_place_detached(&nonce, b"", &mut plain[start..], &tag)
                .ok()?;
        }
        Some(plain)
    }

    /// Seals `plain` as [`ReferenceCipher::open`] reads it, `plain_per_block` bytes of
    /// plaintext per block, each with a fresh random nonce: for tests, which have no file
    /// the reference encrypted.
    pub fn seal(&self, plain: &[u8], plain_per_block: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(plain.len() + BLOCK_OVERHEAD);
        for chunk in plain.chunks(plain_per_block.max(1)) {
            let nonce_bytes: [u8; NONCE_LEN] = crate::random::bytes();
            let nonce = Nonce::clone_from_slice(&nonce_bytes);
            let mut data = chunk.to_vec();
            // Sealing into a buffer of the right size cannot fail.
            let Ok(tag) = self.aead.encrypt_in_place_detached(&nonce, b"", &mut data) else {
                return Vec::new();
            };
            out.extend_from_slice(&nonce_bytes);
            out.extend_from_slice(&tag);
            out.extend_from_slice(&data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &[u8] = br#"{"id":"e_1","subject":"app.a","created_at":"2026-01-01T00:00:00Z","payload":"long enough to take several blocks of a small block size, several"}"#;

    #[test]
    fn opens_what_it_seals_under_every_reading_of_the_block_size() {
        let cipher = ReferenceCipher::new("s3cret", 64).unwrap();
        for plain_per_block in [64, 64 - TAG_LEN, 64 - BLOCK_OVERHEAD] {
            let sealed = cipher.seal(TEXT, plain_per_block);
            assert!(sealed.len() > 2 * 64, "several blocks");
            assert_eq!(cipher.open(&sealed).unwrap(), TEXT, "{plain_per_block}");
        }
    }

    #[test]
    fn one_block_and_empty_contents() {
        let cipher = ReferenceCipher::new("k", DEFAULT_BLOCK_SIZE).unwrap();
        assert_eq!(cipher.open(&cipher.seal(TEXT, 4096)).unwrap(), TEXT);
        assert_eq!(cipher.open(&cipher.seal(b"", 4096)).unwrap(), b"");
        assert_eq!(cipher.open(b"").unwrap(), b"");
    }

    #[test]
    fn a_wrong_key_a_wrong_block_size_or_a_changed_byte_is_refused() {
        let cipher = ReferenceCipher::new("right", 64).unwrap();
        let sealed = cipher.seal(TEXT, 64);
        let wrong_key = ReferenceCipher::new("wrong", 64).unwrap();
        let error = wrong_key.open(&sealed).unwrap_err();
        assert!(error.contains("--reference-secret-key"), "{error}");
        let wrong_size = ReferenceCipher::new("right", 100).unwrap();
        assert!(wrong_size.open(&sealed).is_err());
        let mut changed = sealed.clone();
        let last = changed.len() - 1;
        changed[last] ^= 1;
        assert!(cipher.open(&changed).is_err());
        assert!(cipher.open(&sealed[..30]).is_err());
    }

    #[test]
    fn the_key_is_the_sha256_of_the_secret() {
        // What ella.to/bus's NewEncryption does: sha256.Sum256([]byte(secretKey)).
        let digest = Sha256::digest(b"my-secret-key");
        let aead = XSalsa20Poly1305::new(&Key::clone_from_slice(&digest));
        let nonce = [7u8; NONCE_LEN];
        let mut data = b"hello world".to_vec();
        let tag = aead
            .encrypt_in_place_detached(&Nonce::clone_from_slice(&nonce), b"", &mut data)
            .unwrap();
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&tag);
        sealed.extend_from_slice(&data);
        let cipher = ReferenceCipher::new("my-secret-key", 4096).unwrap();
        assert_eq!(cipher.open(&sealed).unwrap(), b"hello world");
    }

    #[test]
    fn block_sizes_too_small_and_empty_secrets_are_refused() {
        assert!(ReferenceCipher::new("k", 40).is_err());
        assert!(ReferenceCipher::new("", 4096).is_err());
    }
}
