//! Segment rolling, reads across segment boundaries, and finding events by position and
//! by id (server-assigned and client-supplied) after a reopen.

mod common;

use bus::store::{Appended, StoreError};
use common::*;
use serde_json::json;

const TINY: u64 = 700;

#[tokio::test]
async fn tiny_segments_roll_and_read_across_boundaries() {
    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), TINY);
    let mut appended: Vec<Appended> = Vec::new();
    for i in 0..60u64 {
        let size = 1 + i % 4;
        let batch = (0..size).map(|j| event(&json!({"i": i, "j": j}))).collect();
        appended.extend(log.append(batch).await.unwrap());
    }
    let total = appended.len() as u64;
    let segments = segment_files(data.path());
    assert!(segments.len() > 10, "{} segments", segments.len());
    // Batches never straddle segments: each segment starts at a batch boundary.
    for file in &segments {
        let base: u64 = file.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let first = &read_all(&log, 1000)[base as usize];
        assert_eq!(
            json(first)["payload"]["j"],
            0,
            "segment {base} starts a batch"
        );
    }
    log.close().await.unwrap();
    drop(log);

    let log = open(data.path(), TINY);
    assert_eq!(log.committed(), total);
    assert_eq!(log.segment_count(), segments.len());
    let all = read_all(&log, 1000);
    for chunk in [1, 2, 3, 7, 64] {
        assert_eq!(read_all(&log, chunk), all, "chunk size {chunk}");
    }
    // Reads from every position, by position and by id.
    for a in &appended {
        let got = log.read(a.position, 5).await.unwrap();
        assert!(!got.is_empty());
        assert_eq!(got[0].position(), a.position);
        assert_eq!(got[0].id(), a.id);
        for (k, e) in got.iter().enumerate() {
            assert_eq!(e.position(), a.position + k as u64);
        }
        assert_eq!(log.find_id(&a.id).await.unwrap(), Some(a.position));
    }
    assert!(log.read(total, 5).await.unwrap().is_empty());

    // Appending continues in the last segment after the reopen.
    let more = log.append(vec![event(&json!("more"))]).await.unwrap();
    assert_eq!(more[0].position, total);
    assert_eq!(log.read(total, 5).await.unwrap()[0].id(), more[0].id);
}

#[tokio::test]
async fn client_supplied_ids_are_found_and_kept_unique_across_segments_and_reopens() {
    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), TINY);
    let mut appended = Vec::new();
    for i in 0..40 {
        // A mix: ids from the reference server (xid-like), restored ids, and server ids.
        let batch = vec![
            event_with_id(&format!("e_cn0vq1g2ps3c73b6v{i:03}"), &json!(i)),
            event(&json!(i)),
            event_with_id(&format!("e_restored.{i}"), &json!(i)),
        ];
        appended.extend(log.append(batch).await.unwrap());
    }
    assert!(log.segment_count() > 5);
    check_ids(&log, &appended).await;
    log.close().await.unwrap();
    drop(log);

    let log = open(data.path(), TINY);
    check_ids(&log, &appended).await;

    // An id already in a sealed segment, in the active one, or twice in one batch is a
    // duplicate; the whole batch is refused.
    let committed = log.committed();
    for dup in ["e_restored.0", "e_restored.39", "e_cn0vq1g2ps3c73b6v007"] {
        let err = log
            .append(vec![event(&json!("ok")), event_with_id(dup, &json!("dup"))])
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::DuplicateId(ref id) if id == dup),
            "{err}"
        );
    }
    let err = log
        .append(vec![
            event_with_id("e_twice", &json!(1)),
            event_with_id("e_twice", &json!(2)),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DuplicateId(_)), "{err}");
    assert_eq!(log.committed(), committed, "refused batches leave nothing");

    // A server-assigned id cannot be supplied again, nor one that could collide with a
    // future server-assigned id.
    let native = &appended[1].id;
    let err = log
        .append(vec![event_with_id(native, &json!("x"))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DuplicateId(_)), "{err}");
    let future = format!("{}{}", &native[..10], "000000000vvv");
    let err = log
        .append(vec![event_with_id(&future, &json!("x"))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ReservedId(_)), "{err}");

    // Concurrent appends of the same new id: exactly one wins.
    let log = std::sync::Arc::new(log);
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let log = std::sync::Arc::clone(&log);
            tokio::spawn(async move {
                log.append(vec![event_with_id("e_contended", &json!(i))])
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(_) => wins += 1,
            Err(StoreError::DuplicateId(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(wins, 1);
}

async fn check_ids(log: &bus::store::Log, appended: &[Appended]) {
    for a in appended {
        assert_eq!(
            log.find_id(&a.id).await.unwrap(),
            Some(a.position),
            "{}",
            a.id
        );
    }
    assert_eq!(log.find_id("e_restored.999").await.unwrap(), None);
    assert_eq!(log.find_id("e_cn0vq1g2ps3c73b6vzzz").await.unwrap(), None);
}
