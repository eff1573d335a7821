//! Subject and pattern parsing and matching on arbitrary text: never a panic, and a
//! valid subject is a pattern that matches itself.
#![no_main]

use bus::subject::{Pattern, Subject};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (pattern, subject) = text.split_once('\n').unwrap_or((&text, &text));
    if let (Ok(pattern), Ok(subject)) = (Pattern::parse(pattern), Subject::parse(subject)) {
        let _ = pattern.matches(subject.as_str());
    }
    if let Ok(subject) = Subject::parse(subject) {
        let itself = Pattern::parse(subject.as_str()).expect("a subject is a pattern");
        assert!(itself.matches(subject.as_str()));
    }
});
