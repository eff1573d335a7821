//! The publish body parser on arbitrary bytes: it never panics, and whatever it accepts
//! becomes a stored event whose JSON parses.
#![no_main]

use bus::broker::{NewEvent, Publication};
use bus::event::{JsonLayout, PendingEvent};
use bus::timestamp::Timestamp;
use libfuzzer_sys::fuzz_target;

fn store(event: &NewEvent) {
    // The broker refuses what PendingEvent refuses (a bad id, say), with a 400.
    let Ok(pending) = PendingEvent::new(&event.draft()) else {
        return;
    };
    let mut json = Vec::new();
    let created_at = Timestamp::from_unix_nanos(1_700_000_000_000_000_000).format();
    pending.write_json(&mut json, "e_fuzz", &created_at, 7);
    // Valid JSON syntax; numbers are passed through as given, however large (a number
    // like 18e888 is JSON, though serde_json's `Value` cannot hold it).
    serde_json::from_slice::<serde::de::IgnoredAny>(&json).expect("stored events are JSON");
    assert!(
        JsonLayout::parse(&json).is_some(),
        "stored events have a layout"
    );
}

fuzz_target!(|data: &[u8]| {
    let limits = bus::http::publish::BodyLimits {
        max_subject_len: 1024,
        max_key_len: 1024,
        max_batch: 10_000,
    };
    match bus::http::publish::parse_body(data, &limits) {
        Ok(Publication::One(event)) => store(&event),
        Ok(Publication::Batch(events)) => events.iter().for_each(store),
        Err(_) => {}
    }
});
