//! Randomness for identifiers: the one place the bus draws random bits, for the ids it
//! makes up (events, consumers, inboxes and reply subjects) and for the generations of
//! its logs. A leaf, built with every feature.
//!
//! The bits come from the operating system. Should it have none to give (an exotic
//! sandbox), they come from the clock and a process-wide counter instead: no longer
//! unpredictable, still unique, which is all an id needs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The alphabet of tokens: lowercase base32hex, the reference's (xid's) id alphabet.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghijklmnopqrstuv";

/// `N` random bytes.
///
/// ```
/// let key: [u8; 32] = bus::random::bytes();
/// assert_ne!(key, bus::random::bytes::<32>());
/// ```
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if getrandom::fill(&mut out).is_err() {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let count = u128::from(COUNTER.fetch_add(1, Ordering::Relaxed));
        let mixed = (nanos ^ (count << 64)).to_le_bytes();
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = mixed[i % mixed.len()] ^ (i / mixed.len()) as u8;
        }
    }
    out
}

/// A random 64-bit number.
///
/// ```
/// assert_ne!(bus::random::number(), bus::random::number());
/// ```
pub fn number() -> u64 {
    u64::from_le_bytes(bytes())
}

/// `len` random characters of [`ALPHABET`] (5 random bits each).
///
/// ```
/// let inbox = format!("_bus_.{}", bus::random::token(20));
/// assert_eq!(inbox.len(), 26);
/// ```
pub fn token(len: usize) -> String {
    let mut out = String::with_capacity(len);
    for chunk in (0..len).collect::<Vec<_>>().chunks(16) {
        let random: [u8; 16] = bytes();
        out.extend(
            random[..chunk.len()]
                .iter()
                .map(|b| ALPHABET[usize::from(b & 31)] as char),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_length_and_alphabet_asked_for_and_differ() {
        for len in [0, 1, 16, 20, 33] {
            let a = token(len);
            assert_eq!(a.len(), len);
            assert!(a.bytes().all(|b| ALPHABET.contains(&b)), "{a}");
        }
        assert_ne!(token(20), token(20));
        assert_ne!(number(), number());
    }
}
