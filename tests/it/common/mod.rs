//! Helpers shared by the integration tests: opening logs and making and reading events
//! ([`http`]: servers, publishing and event streams over HTTP).
#![allow(dead_code)]

pub mod backends;
pub mod balancer;
pub mod cli;
pub mod http;
pub mod jetstream;
pub mod process;
pub mod tls;

use std::path::{Path, PathBuf};

use bus::event::{EventDraft, PendingEvent, StoredEvent};
use bus::store::{FsyncPolicy, Log, StoreConfig};
use serde_json::Value;

pub const NAMESPACE: &str = "orders";

pub fn config(data: &Path, segment_size: u64) -> StoreConfig {
    StoreConfig {
        path: data.to_path_buf(),
        segment_size,
        fsync: FsyncPolicy::Always,
        tail_bytes: 64 << 10,
        cipher: None,
    }
}

pub fn log_dir(data: &Path) -> PathBuf {
    data.join(NAMESPACE)
}

pub fn open(data: &Path, segment_size: u64) -> Log {
    Log::open(&log_dir(data), NAMESPACE, &config(data, segment_size)).expect("open log")
}

pub fn event(payload: &Value) -> PendingEvent {
    let payload = serde_json::to_vec(payload).unwrap();
    PendingEvent::new(&EventDraft {
        subject: "orders.created",
        payload: Some(&payload),
        ..EventDraft::default()
    })
    .unwrap()
}

pub fn event_with_id(id: &str, payload: &Value) -> PendingEvent {
    let payload = serde_json::to_vec(payload).unwrap();
    PendingEvent::new(&EventDraft {
        subject: "orders.created",
        payload: Some(&payload),
        id: Some(id),
        ..EventDraft::default()
    })
    .unwrap()
}

/// Every committed event, read in chunks of `chunk`.
pub fn read_all(log: &Log, chunk: usize) -> Vec<StoredEvent> {
    let mut events = Vec::new();
    loop {
        let next = events.len() as u64;
        let got = log.read_blocking(next, chunk).expect("read");
        if got.is_empty() {
            assert_eq!(next, log.committed(), "reads stopped before the watermark");
            return events;
        }
        events.extend(got);
    }
}

pub fn json(event: &StoredEvent) -> Value {
    serde_json::from_slice(&event.json()).expect("stored JSON parses")
}

/// Segment files of a log, oldest first.
pub fn segment_files(data: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(log_dir(data))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    files
}

/// Byte offsets at which the records of a `.log` file start, read from the documented
/// format (24-byte header, then 4-byte word with the length in its low 31 bits, 4-byte
/// CRC, body).
pub fn record_offsets(log_file: &Path) -> Vec<u64> {
    let bytes = std::fs::read(log_file).unwrap();
    let mut offsets = Vec::new();
    let mut at = 24usize;
    while at + 8 <= bytes.len() {
        offsets.push(at as u64);
        let word = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        at += 8 + (word & 0x7fff_ffff) as usize;
    }
    offsets
}
