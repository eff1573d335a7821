//! The query-string decoder on arbitrary text: it never panics, what it accepts it reads
//! as the `form_urlencoded` crate does, and pairs encoded as the client encodes them
//! (`form_urlencoded::Serializer`, through reqwest's `url`) come back as they were: a
//! key given once has its value, a key given more than once is a 400, any other key is
//! absent.
#![no_main]

use std::collections::HashMap;

use bus::http::query::Params;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    decode_any(&String::from_utf8_lossy(data));
    // The same bytes, read differently, as the pairs to round-trip.
    if let Ok(pairs) = pairs(&mut Unstructured::new(data)) {
        round_trip(&pairs);
    }
});

/// Arbitrary text: a 400 or parameters that agree with `form_urlencoded::parse`.
fn decode_any(text: &str) {
    let params = match Params::parse(Some(text)) {
        Ok(params) => params,
        Err(error) => {
            assert_eq!(error.status.as_u16(), 400, "{text:?}: {}", error.message);
            // Only an escape can be malformed or decode to bytes that are not UTF-8.
            assert!(text.contains('%'), "{text:?} refused: {}", error.message);
            return;
        }
    };
    // Accepted, so every escape is well formed and decodes to UTF-8: the lenient decoder
    // (which keeps bad escapes as they are and replaces bad UTF-8) reads the same pairs.
    let decoded: Vec<(String, String)> = form_urlencoded::parse(text.as_bytes())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    check(&params, &decoded, text);
}

/// Pairs of keys and values, some keys repeated.
fn pairs(u: &mut Unstructured) -> Result<Vec<(String, String)>> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for _ in 0..u.int_in_range(0..=8)? {
        // Half the time a key already used, so that repeats are common.
        let key = if !pairs.is_empty() && u.arbitrary()? {
            pairs[u.choose_index(pairs.len())?].0.clone()
        } else {
            u.arbitrary()?
        };
        pairs.push((key, u.arbitrary()?));
    }
    Ok(pairs)
}

/// Pairs encoded as the client encodes them decode to the same pairs.
fn round_trip(pairs: &[(String, String)]) {
    let encoded = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let params = match Params::parse(Some(&encoded)) {
        Ok(params) => params,
        Err(error) => panic!("{encoded:?} (from {pairs:?}) refused: {}", error.message),
    };
    check(&params, pairs, &encoded);
}

/// `params` (parsed from `text`) holds `pairs`: a key given once has its value, a key
/// given more than once is a 400, a key given not at all is absent.
fn check(params: &Params, pairs: &[(String, String)], text: &str) {
    let mut by_key: HashMap<&str, Vec<&str>> = HashMap::new();
    for (key, value) in pairs {
        by_key.entry(key).or_default().push(value);
    }
    for (key, values) in &by_key {
        match (values.as_slice(), params.get(key)) {
            ([value], Ok(got)) => {
                assert_eq!(got, Some(*value), "{key:?} in {text:?}");
                assert_eq!(params.text(key).ok(), Some(value.trim()), "{key:?}");
            }
            ([_], Err(error)) => panic!("{key:?} in {text:?}: {}", error.message),
            (_, Ok(got)) => panic!("{key:?} in {text:?} is repeated, yet read as {got:?}"),
            (_, Err(error)) => {
                assert_eq!(error.status.as_u16(), 400, "{key:?} in {text:?}");
                assert!(params.text(key).is_err(), "{key:?} in {text:?}");
            }
        }
    }
    // A key longer than any given is not among them.
    let longest = by_key.keys().map(|key| key.len()).max().unwrap_or(0);
    let absent = "k".repeat(longest + 1);
    assert_eq!(
        params.get(&absent).ok(),
        Some(None),
        "{absent:?} in {text:?}"
    );
    assert_eq!(
        params.text(&absent).ok(),
        Some(""),
        "{absent:?} in {text:?}"
    );
}
