//! Concurrent appends (single events and batches) survive a reopen byte for byte, with
//! gapless positions, each publisher's order kept and every batch contiguous.

use std::collections::HashMap;
use std::sync::Arc;

use bus::store::{Appended, Log};
use serde_json::json;

use crate::common::*;

const TASKS: u64 = 16;
const ROUNDS: u64 = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_round_trip_through_reopen() {
    let data = tempfile::tempdir().unwrap();
    // Small segments so that the run crosses several of them.
    let log = Arc::new(open(data.path(), 16 << 10));

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let log = Arc::clone(&log);
        tasks.push(tokio::spawn(async move {
            let mut acked: Vec<(u64, Vec<Appended>)> = Vec::new();
            let mut seq = 0;
            for round in 0..ROUNDS {
                // Alternate single events and batches of up to 5.
                let size = if round % 2 == 0 { 1 } else { 1 + round % 5 };
                let batch = (0..size)
                    .map(|i| event(&json!({"task": task, "seq": seq + i, "batch": round})))
                    .collect();
                let appended = log.append(batch).await.expect("append");
                assert_eq!(appended.len() as u64, size);
                acked.push((seq, appended));
                seq += size;
            }
            acked
        }));
    }
    let mut acked = HashMap::new();
    for (task, handle) in tasks.into_iter().enumerate() {
        acked.insert(task as u64, handle.await.unwrap());
    }
    let total: u64 = acked
        .values()
        .flat_map(|batches| batches.iter().map(|(_, a)| a.len() as u64))
        .sum();
    assert_eq!(log.committed(), total);
    assert!(log.segment_count() > 2, "the test should span segments");

    let before = read_all(&log, 7);
    log.close().await.unwrap();
    drop(log);

    let log = open(data.path(), 16 << 10);
    assert!(log.recovery().clean_shutdown);
    assert_eq!(log.recovery().truncated, None);
    let after = read_all(&log, 1000);
    assert_eq!(after.len() as u64, total);
    assert_eq!(before, after, "same bytes after reopening");

    let mut last_seq: HashMap<u64, i64> = HashMap::new();
    let mut last_created = String::new();
    for (position, event) in after.iter().enumerate() {
        assert_eq!(event.position(), position as u64, "positions are gapless");
        let value = json(event);
        assert_eq!(value["index"], position as u64);
        assert_eq!(value["id"], event.id());
        assert_eq!(value["subject"], "orders.created");
        let task = value["payload"]["task"].as_u64().unwrap();
        let seq = value["payload"]["seq"].as_i64().unwrap();
        let previous = last_seq.insert(task, seq).unwrap_or(-1);
        assert_eq!(seq, previous + 1, "task {task}'s events stay in its order");
        let created = value["created_at"].as_str().unwrap().to_owned();
        assert!(
            created >= last_created,
            "server-assigned times never go back"
        );
        last_created = created;
        // The SSE frame is ready-made and carries the same JSON on one line.
        let frame = std::str::from_utf8(event.sse_frame()).unwrap();
        assert_eq!(
            frame,
            format!(
                "id: {}\nevent: msg\ndata: {}\n\n",
                event.id(),
                std::str::from_utf8(&event.json()).unwrap()
            )
        );
    }

    // What each append returned is what is stored, and a batch is contiguous.
    for batches in acked.values() {
        for (_, appended) in batches {
            for (i, a) in appended.iter().enumerate() {
                assert_eq!(a.position, appended[0].position + i as u64);
                let stored = &after[a.position as usize];
                assert_eq!(stored.id(), a.id);
                assert_eq!(json(stored)["created_at"], a.created_at.to_string());
                assert_eq!(log.find_id(&a.id).await.unwrap(), Some(a.position));
            }
        }
    }
    let ids: std::collections::HashSet<&str> = after.iter().map(|e| e.id()).collect();
    assert_eq!(ids.len(), after.len(), "ids are unique");
}

#[tokio::test]
async fn live_readers_wait_on_the_watermark() {
    let data = tempfile::tempdir().unwrap();
    let log = Arc::new(open(data.path(), 1 << 20));
    let mut watermark = log.watch_committed();
    assert_eq!(*watermark.borrow(), 0);
    assert!(log.read(0, 10).await.unwrap().is_empty());

    let writer = Arc::clone(&log);
    let publish = tokio::spawn(async move {
        writer
            .append(vec![event(&json!(1)), event(&json!(2))])
            .await
            .unwrap()
    });
    watermark.changed().await.unwrap();
    assert_eq!(*watermark.borrow(), 2, "a batch becomes visible at once");
    let events = log.read(0, 10).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(json(&events[1])["payload"], 2);
    publish.await.unwrap();
}

#[tokio::test]
async fn two_namespaces_never_share_ids() {
    let data = tempfile::tempdir().unwrap();
    let config = config(data.path(), 1 << 20);
    let a = Log::open(&data.path().join("a"), "a", &config).unwrap();
    let b = Log::open(&data.path().join("b"), "b", &config).unwrap();
    let ida = a.append(vec![event(&json!(1))]).await.unwrap()[0]
        .id
        .clone();
    let idb = b.append(vec![event(&json!(1))]).await.unwrap()[0]
        .id
        .clone();
    assert_ne!(ida, idb);
    assert!(ida.starts_with("e_") && ida.len() == 22, "{ida}");
    assert_eq!(a.find_id(&idb).await.unwrap(), None);
    assert_eq!(b.find_id(&idb).await.unwrap(), Some(0));
}

#[tokio::test]
async fn each_fsync_policy_syncs_when_it_promises() {
    use bus::store::FsyncPolicy;
    use std::time::Duration;

    let open_with = |data: &std::path::Path, fsync: FsyncPolicy| {
        let mut config = config(data, 1 << 20);
        config.fsync = fsync;
        Log::open(&log_dir(data), NAMESPACE, &config).unwrap()
    };

    // always: every group is synced before it is acknowledged.
    let data = tempfile::tempdir().unwrap();
    let log = open_with(data.path(), FsyncPolicy::Always);
    for i in 0..5 {
        log.append(vec![event(&json!(i))]).await.unwrap();
        let stats = log.stats();
        assert_eq!(stats.syncs, stats.groups, "one sync per group");
    }

    // interval: acknowledged before syncing; synced within the interval even when idle.
    let data = tempfile::tempdir().unwrap();
    let log = open_with(
        data.path(),
        FsyncPolicy::Interval(Duration::from_millis(20)),
    );
    log.append(vec![event(&json!(1))]).await.unwrap();
    assert_eq!(
        log.stats().syncs,
        0,
        "acknowledged without waiting for a sync"
    );
    let mut waited = Duration::ZERO;
    while log.stats().syncs == 0 {
        assert!(waited < Duration::from_secs(5), "never synced");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += Duration::from_millis(10);
    }

    // never: no sync until the log is closed.
    let data = tempfile::tempdir().unwrap();
    let log = open_with(data.path(), FsyncPolicy::Never);
    for i in 0..5 {
        log.append(vec![event(&json!(i))]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(log.stats().syncs, 0);
    log.close().await.unwrap();
    assert_eq!(log.stats().syncs, 1, "closing syncs");
}

#[tokio::test]
async fn a_closed_log_refuses_appends_but_still_reads() {
    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), 1 << 20);
    log.append(vec![event(&json!("kept"))]).await.unwrap();
    log.close().await.unwrap();
    let err = log.append(vec![event(&json!("late"))]).await.unwrap_err();
    assert!(matches!(err, bus::store::StoreError::Closed(_)), "{err}");
    assert_eq!(log.read(0, 10).await.unwrap().len(), 1);
    log.close().await.unwrap(); // closing twice is harmless
}

#[tokio::test]
async fn an_event_too_large_for_a_record_is_refused_whole() {
    use bus::event::{EventDraft, PendingEvent};
    use bus::store::segment::MAX_BODY_LEN;
    use bus::store::StoreError;

    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), 1 << 20);
    log.append(vec![event(&json!("before"))]).await.unwrap();
    // A payload as long as the longest record body: with the rest of its event, its
    // record would not fit. (Zeros are allocated lazily, and the log does not parse
    // payloads; the event itself takes 2 GiB of memory for a moment.)
    let payload = vec![0u8; MAX_BODY_LEN];
    let huge = PendingEvent::new(&EventDraft {
        subject: "orders.big",
        payload: Some(&payload),
        ..EventDraft::default()
    })
    .unwrap();
    drop(payload);
    let err = log
        .append(vec![event(&json!("with it")), huge])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::EventTooLarge { len, max }
            if len > MAX_BODY_LEN as u64 && max == MAX_BODY_LEN as u64),
        "{err}"
    );
    assert_eq!(log.committed(), 1, "nothing of the batch is stored");

    // The log goes on, and a reopen finds exactly what was acknowledged.
    log.append(vec![event(&json!("after"))]).await.unwrap();
    log.close().await.unwrap();
    drop(log);
    let log = open(data.path(), 1 << 20);
    assert_eq!(log.recovery().truncated, None);
    let payloads: Vec<_> = read_all(&log, 10)
        .iter()
        .map(|e| json(e)["payload"].clone())
        .collect();
    assert_eq!(payloads, [json!("before"), json!("after")]);
}

#[tokio::test]
async fn subjects_longer_than_the_stored_layout_holds_are_refused() {
    use bus::event::{EventDraft, PendingEvent, MAX_SUBJECT_LEN};

    assert_eq!(MAX_SUBJECT_LEN, 65535);
    let subject = |len: usize| format!("orders.{}", "s".repeat(len - "orders.".len()));
    let too_long = subject(MAX_SUBJECT_LEN + 1);
    let err = PendingEvent::new(&EventDraft {
        subject: &too_long,
        ..EventDraft::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("65535"), "{err}");

    // The longest one is stored and read back whole.
    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), 1 << 20);
    let longest = subject(MAX_SUBJECT_LEN);
    let event = PendingEvent::new(&EventDraft {
        subject: &longest,
        ..EventDraft::default()
    })
    .unwrap();
    log.append(vec![event]).await.unwrap();
    assert_eq!(log.read(0, 1).await.unwrap()[0].subject(), longest);
}
