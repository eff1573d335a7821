//! Event ids the log assigns, and the hash used to index ids clients supply.
//!
//! A server-assigned id is `e_` followed by 20 characters of lowercase base32hex (the
//! alphabet of the reference's xids, so ids look alike and stay URL-safe): 8 characters
//! for the log's current *generation* (40 random bits) and 12 for the event's position
//! (60 bits). Decoding an id therefore yields the position directly — resuming from an
//! id costs O(1) — and ids from one generation sort in log order.
//!
//! A generation is drawn at random when a namespace is created and again after every
//! unclean shutdown. Ids stay unique across namespaces (different random generations)
//! and across restarts, even when a crash under a relaxed fsync policy loses the last
//! events and their positions are handed out again: the new events get ids of the new
//! generation, and the lost events' ids no longer resolve.

const ALPHABET: &[u8; 32] = b"0123456789abcdefghijklmnopqrstuv";
const GENERATION_CHARS: usize = 8;
const POSITION_CHARS: usize = 12;
/// Length of a server-assigned id, prefix included.
pub const NATIVE_ID_LEN: usize = 2 + GENERATION_CHARS + POSITION_CHARS;
/// Generations are 40-bit numbers.
pub const GENERATION_MASK: u64 = (1 << 40) - 1;
/// Positions are 60-bit numbers.
pub const MAX_POSITION: u64 = (1 << 60) - 1;

/// [`encode`] as a string.
pub fn text(generation: u64, position: u64) -> String {
    // The encoding is ASCII, so the check always passes (and is cheaper than the lossy
    // conversion's).
    std::str::from_utf8(&encode(generation, position))
        .unwrap_or_default()
        .to_owned()
}

/// The id of the event at `position` written under `generation`.
pub fn encode(generation: u64, position: u64) -> [u8; NATIVE_ID_LEN] {
    let mut out = [0u8; NATIVE_ID_LEN];
    out[0] = b'e';
    out[1] = b'_';
    put_base32(&mut out[2..2 + GENERATION_CHARS], generation);
    put_base32(&mut out[2 + GENERATION_CHARS..], position);
    out
}

/// The (generation, position) of an id of the native form; `None` for any other string.
pub fn decode(id: &str) -> Option<(u64, u64)> {
    let b = id.as_bytes();
    if b.len() != NATIVE_ID_LEN || !b.starts_with(b"e_") {
        return None;
    }
    let generation = read_base32(&b[2..2 + GENERATION_CHARS])?;
    let position = read_base32(&b[2 + GENERATION_CHARS..])?;
    Some((generation, position))
}

/// A stable 64-bit hash (FNV-1a) of a client-supplied id, stored in the id indexes.
/// Collisions are harmless: every hit is confirmed by reading the event.
pub fn hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A fresh random generation.
pub fn random_generation() -> u64 {
    crate::random::number() & GENERATION_MASK
}

/// Lowercase base32hex text of a generation, as it appears in ids and in `meta.json`.
pub fn generation_text(generation: u64) -> String {
    let mut out = [0u8; GENERATION_CHARS];
    put_base32(&mut out, generation);
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_generation(text: &str) -> Option<u64> {
    (text.len() == GENERATION_CHARS)
        .then(|| read_base32(text.as_bytes()))
        .flatten()
}

fn put_base32(out: &mut [u8], mut value: u64) {
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value & 31) as usize];
        value >>= 5;
    }
}

fn read_base32(text: &[u8]) -> Option<u64> {
    text.iter().try_fold(0u64, |acc, &c| {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'v' => c - b'a' + 10,
            _ => return None,
        };
        Some((acc << 5) | u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let generation = 0x12_3456_789a;
        let a = encode(generation, 0);
        let b = encode(generation, 41);
        let c = encode(generation, MAX_POSITION);
        for (id, pos) in [(a, 0), (b, 41), (c, MAX_POSITION)] {
            let text = std::str::from_utf8(&id).unwrap();
            assert_eq!(decode(text), Some((generation, pos)));
        }
        assert!(a < b && b < c, "ids of one generation sort by position");
        assert_eq!(
            parse_generation(&generation_text(generation)),
            Some(generation)
        );
    }

    #[test]
    fn other_strings_are_not_native() {
        assert_eq!(decode("e_short"), None);
        assert_eq!(decode("x_0000000000000000000a"), None);
        assert_eq!(decode("e_000000000000000000w0"), None);
    }

    #[test]
    fn hash_is_stable() {
        // Stored on disk: must never change between versions.
        assert_eq!(hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
