//! Encryption at rest, on a real file-backed log: round trips across restarts and
//! segments, the three key mistakes, tampering, resuming by id, torn writes, and nothing
//! readable in the files.

use std::path::Path;

use bus::store::{Cipher, Log, StoreConfig, StoreError};
use serde_json::json;

use crate::common::*;

const SECRET: &str = "correct horse battery staple";

fn encrypted_config(data: &Path, segment_size: u64, secret: Option<&str>) -> StoreConfig {
    let mut config = config(data, segment_size);
    config.cipher = secret.map(|s| Cipher::new(s, 512).unwrap());
    config
}

fn open_with(data: &Path, segment_size: u64, secret: Option<&str>) -> Result<Log, StoreError> {
    Log::open(
        &log_dir(data),
        NAMESPACE,
        &encrypted_config(data, segment_size, secret),
    )
}

async fn fill(log: &Log, events: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..events {
        // Every third append a batch of three; every fifth event with its own id.
        let batch = if n % 3 == 0 {
            (0..3)
                .map(|k| event(&json!({"n": n, "k": k, "secret": "plaintext-marker"})))
                .collect()
        } else if n % 5 == 0 {
            vec![event_with_id(&format!("e_client{n}"), &json!({"n": n}))]
        } else {
            vec![event(&json!({"n": n, "secret": "plaintext-marker"}))]
        };
        ids.extend(log.append(batch).await.unwrap().into_iter().map(|a| a.id));
    }
    ids
}

#[tokio::test]
async fn encrypted_logs_round_trip_across_restarts_and_segments() {
    let data = tempfile::tempdir().unwrap();
    let log = open_with(data.path(), 4096, Some(SECRET)).unwrap();
    let ids = fill(&log, 200).await;
    let before: Vec<_> = read_all(&log, 7).iter().map(json).collect();
    assert_eq!(before.len(), ids.len());
    drop(log);
    assert!(
        segment_files(data.path()).len() > 3,
        "needs several segments"
    );

    // Nothing of the events is readable in any file of the log.
    for entry in std::fs::read_dir(log_dir(data.path())).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("plaintext-marker") && !text.contains("orders.created"));
    }

    let log = open_with(data.path(), 4096, Some(SECRET)).unwrap();
    assert!(log.recovery().clean_shutdown);
    let after: Vec<_> = read_all(&log, 1000).iter().map(json).collect();
    assert_eq!(after, before);
    // Random access: any position, and ids of both kinds, from sealed and active segments.
    for (position, id) in ids.iter().enumerate().step_by(17) {
        assert_eq!(
            log.find_id(id).await.unwrap(),
            Some(position as u64),
            "{id}"
        );
        let one = log.read(position as u64, 1).await.unwrap();
        assert_eq!(one[0].id(), id);
    }
    assert!(log.find_id("e_client10").await.unwrap().is_some());
    assert_eq!(log.find_id("e_absent").await.unwrap(), None);
    // Appending after a restart continues the same log.
    let more: Vec<_> = (0..10).map(|n| event(&json!({"more": n}))).collect();
    log.append(more).await.unwrap();
    drop(log);
    let log = open_with(data.path(), 4096, Some(SECRET)).unwrap();
    assert_eq!(log.committed() as usize, ids.len() + 10);
    assert_eq!(
        json(&read_all(&log, 1000)[ids.len() + 9])["payload"]["more"],
        9
    );
}

#[tokio::test]
async fn each_key_mistake_has_its_own_message() {
    let encrypted = tempfile::tempdir().unwrap();
    drop(fill(&open_with(encrypted.path(), 4096, Some(SECRET)).unwrap(), 5).await);
    let plain = tempfile::tempdir().unwrap();
    drop(fill(&open_with(plain.path(), 4096, None).unwrap(), 5).await);

    let cases = [
        (
            encrypted.path(),
            Some("wrong"),
            "encrypted with a different secret key",
        ),
        (encrypted.path(), None, "is encrypted: give its secret key"),
        (
            plain.path(),
            Some(SECRET),
            "is not encrypted, but a secret key was given",
        ),
    ];
    for (dir, secret, expected) in cases {
        let error = open_with(dir, 4096, secret).err().expect("refused");
        assert!(error.to_string().contains(expected), "{error}");
    }
    // Still intact for the right key.
    let log = open_with(encrypted.path(), 4096, Some(SECRET)).unwrap();
    assert_eq!(read_all(&log, 100).len(), 9);
}

#[tokio::test]
async fn a_modified_byte_is_detected_with_file_and_offset() {
    let data = tempfile::tempdir().unwrap();
    let log = open_with(data.path(), 4096, Some(SECRET)).unwrap();
    fill(&log, 100).await;
    drop(log);
    let files = segment_files(data.path());
    let sealed = &files[0];
    let len = std::fs::metadata(sealed).unwrap().len();

    for offset in [24 + 2, 24 + 9, 24 + 20, 24 + 45, 24 + 60, len - 1] {
        let original = std::fs::read(sealed).unwrap();
        let mut bytes = original.clone();
        bytes[offset as usize] ^= 0x01;
        std::fs::write(sealed, &bytes).unwrap();
        // The sealed segment passes the cheap checks at open; reading it fails.
        let log = open_with(data.path(), 4096, Some(SECRET)).unwrap();
        let error = log.read(0, 1000).await.expect_err("tampering detected");
        match &error {
            StoreError::Corrupt {
                file, offset: at, ..
            } => {
                assert_eq!(file, sealed);
                assert!(*at <= offset, "reported at {at}, flipped at {offset}");
            }
            other => panic!("{other}"),
        }
        drop(log);
        std::fs::write(sealed, &original).unwrap();
    }

    // In the active segment, damage with valid blocks after it stops the open.
    let active = files.last().unwrap();
    let mut bytes = std::fs::read(active).unwrap();
    bytes[30] ^= 0x01;
    std::fs::write(active, &bytes).unwrap();
    let error = open_with(data.path(), 4096, Some(SECRET))
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("a valid block follows"),
        "{error}"
    );
}

#[tokio::test]
async fn a_torn_encrypted_tail_is_truncated_like_a_plain_one() {
    let data = tempfile::tempdir().unwrap();
    let log = open_with(data.path(), 1 << 20, Some(SECRET)).unwrap();
    let ids = fill(&log, 20).await;
    drop(log);
    let active = segment_files(data.path()).pop().unwrap();
    let good_len = std::fs::metadata(&active).unwrap().len();

    // A group of several blocks, cut in its second block: none of it survives.
    let log = open_with(data.path(), 1 << 20, Some(SECRET)).unwrap();
    let big = "x".repeat(1500);
    log.append(vec![event(&json!({"big": big}))]).await.unwrap();
    drop(log);
    let grown = std::fs::metadata(&active).unwrap().len();
    assert!(grown > good_len + 1500);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&active)
        .unwrap();
    file.set_len(good_len + 700).unwrap();
    drop(file);

    let log = open_with(data.path(), 1 << 20, Some(SECRET)).unwrap();
    let truncation = log.recovery().truncated.clone().expect("truncated");
    assert_eq!(truncation.offset, good_len);
    assert_eq!(truncation.bytes_dropped, 700);
    let events = read_all(&log, 100);
    assert_eq!(
        events.iter().map(|e| e.id().to_owned()).collect::<Vec<_>>(),
        ids
    );
    // Appends go on after the cut.
    log.append(vec![event(&json!({"after": true}))])
        .await
        .unwrap();
    drop(log);
    let log = open_with(data.path(), 1 << 20, Some(SECRET)).unwrap();
    assert_eq!(log.committed() as usize, ids.len() + 1);
    assert!(log.recovery().truncated.is_none());
}
