//! Segment rolling, reads across segment boundaries, and finding events by position and
//! by id (server-assigned and client-supplied) after a reopen.

use bus::store::{Appended, StoreError};
use bus::timestamp::Timestamp;
use serde_json::json;

use crate::common::*;

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

/// An event whose `created_at` the client chose.
fn dated(created_at: &str, payload: &serde_json::Value) -> bus::event::PendingEvent {
    let payload = serde_json::to_vec(payload).unwrap();
    bus::event::PendingEvent::new(&bus::event::EventDraft {
        subject: "orders.created",
        payload: Some(&payload),
        created_at: Some(Timestamp::parse(created_at).unwrap()),
        ..bus::event::EventDraft::default()
    })
    .unwrap()
}

/// Segments this small hold one batch each: a segment is sealed at the first batch
/// boundary at or after its size.
const ONE_BATCH: u64 = 100;

#[tokio::test]
async fn age_retention_goes_by_commit_time_not_by_the_dates_clients_chose() {
    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), ONE_BATCH);
    // Segment 0 was committed just now, but its newest event says it is from 2000.
    log.append(vec![
        event(&json!(0)),
        event(&json!(1)),
        dated("2000-01-01T00:00:00Z", &json!(2)),
    ])
    .await
    .unwrap();
    // Segment 1 is dated far in the future by its newest event.
    log.append(vec![
        event(&json!(3)),
        dated("2200-01-01T00:00:00Z", &json!(4)),
    ])
    .await
    .unwrap();
    log.append(vec![event(&json!(5))]).await.unwrap();
    assert_eq!(log.segment_count(), 3);

    let hour = Some(std::time::Duration::from_secs(3600));
    assert_eq!(
        log.enforce_retention(hour, None).unwrap(),
        [],
        "events committed a moment ago are kept for an hour, whatever their created_at"
    );
    assert_eq!(log.first_position(), 0);

    // The commit times are kept with the segments: the same after a reopen.
    log.close().await.unwrap();
    drop(log);
    let log = open(data.path(), ONE_BATCH);
    assert_eq!(log.enforce_retention(hour, None).unwrap(), []);

    // Once their commit is older than the limit, both sealed segments go, the one dated
    // 2200 included; the segment being written stays.
    std::thread::sleep(std::time::Duration::from_millis(60));
    let deleted = log
        .enforce_retention(Some(std::time::Duration::from_millis(30)), None)
        .unwrap();
    assert_eq!(deleted, [(0, 3), (3, 2)]);
    assert_eq!(log.first_position(), 5);
    let dir = log_dir(data.path());
    for base in [0, 3] {
        for ext in ["log", "idx", "ids", "tim"] {
            let file = dir.join(format!("{base:020}.{ext}"));
            assert!(!file.exists(), "{} was left behind", file.display());
        }
    }
    assert!(dir.join(format!("{:020}.tim", 5)).exists());
    assert_eq!(read_all_from(&log, 5).len(), 1);
}

/// Every committed event from `from` on.
fn read_all_from(log: &bus::store::Log, from: u64) -> Vec<bus::event::StoredEvent> {
    let mut events = Vec::new();
    let mut next = from;
    loop {
        let got = log.read_blocking(next, 1000).expect("read");
        let Some(last) = got.last() else {
            return events;
        };
        next = last.position() + 1;
        events.extend(got);
    }
}

#[tokio::test]
async fn finding_the_first_event_committed_at_or_after_a_time() {
    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), TINY);
    let (y2000, y2100) = (
        Timestamp::parse("2000-01-01T00:00:00Z").unwrap(),
        Timestamp::parse("2100-01-01T00:00:00Z").unwrap(),
    );
    // (first position, commit time) of each append: each append is its own group commit,
    // and each holds a server-dated event, whose created_at is the group's commit time.
    let mut groups: Vec<(u64, Timestamp)> = Vec::new();
    for i in 0..40u64 {
        let mut batch = vec![event(&json!(i))];
        match i % 5 {
            1 => batch.insert(0, dated("1700-01-01T00:00:00Z", &json!("old"))),
            3 => batch.push(dated("2200-01-01T00:00:00Z", &json!("future"))),
            4 => batch.push(event(&json!("second"))),
            _ => {}
        }
        let appended = log.append(batch).await.unwrap();
        let commit = appended
            .iter()
            .map(|a| a.created_at)
            .find(|t| *t > y2000 && *t < y2100)
            .unwrap();
        groups.push((appended[0].position, commit));
    }
    assert!(log.segment_count() > 5, "the search crosses segments");
    check_search(&log, &groups).await;
    log.close().await.unwrap();
    drop(log);
    check_search(&open(data.path(), TINY), &groups).await;
}

/// Checks `first_committed_at_or_after` at, just before and just after each group's
/// commit time, and far before and after all of them, against a linear scan.
async fn check_search(log: &bus::store::Log, groups: &[(u64, Timestamp)]) {
    let end = log.committed();
    let expected = |time: Timestamp| {
        groups
            .iter()
            .find(|(_, t)| *t >= time)
            .map_or(end, |(position, _)| *position)
    };
    let nanos = Timestamp::from_unix_nanos;
    let far = [
        Timestamp::parse("1690-01-01T00:00:00Z").unwrap(),
        Timestamp::parse("2000-01-01T00:00:00Z").unwrap(),
        Timestamp::parse("2100-01-01T00:00:00Z").unwrap(),
        Timestamp::parse("2250-01-01T00:00:00Z").unwrap(),
    ];
    let probes = groups
        .iter()
        .flat_map(|&(_, t)| [t, nanos(t.unix_nanos() - 1), nanos(t.unix_nanos() + 1)])
        .chain(far);
    for probe in probes {
        assert_eq!(
            log.first_committed_at_or_after(probe).await.unwrap(),
            expected(probe),
            "start time {probe}"
        );
    }
}

#[tokio::test]
async fn segments_written_without_commit_times_fall_back_to_created_at() {
    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), ONE_BATCH);
    log.append(vec![dated("2000-01-01T00:00:00Z", &json!("old"))])
        .await
        .unwrap();
    let mut times = vec![Timestamp::from_unix_nanos(0)];
    for i in 1..7 {
        let appended = log.append(vec![event(&json!(i))]).await.unwrap();
        times.push(appended[0].created_at);
    }
    log.close().await.unwrap();
    drop(log);
    // What a log written by a version without `.tim` files looks like.
    for entry in std::fs::read_dir(log_dir(data.path())).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "tim") {
            std::fs::remove_file(path).unwrap();
        }
    }

    let before_open = Timestamp::now();
    let log = open(data.path(), ONE_BATCH);
    assert_eq!(log.segment_count(), 7);
    // Sealed segments are searched by their events' created_at…
    for (position, &time) in times.iter().enumerate().take(6).skip(1) {
        assert_eq!(
            log.first_committed_at_or_after(time).await.unwrap(),
            position as u64
        );
    }
    // …the segment being written, by the time it was recovered: its event is delivered
    // to any start time before the recovery, never skipped.
    assert_eq!(log.first_committed_at_or_after(times[6]).await.unwrap(), 6);
    assert_eq!(
        log.first_committed_at_or_after(before_open).await.unwrap(),
        6
    );
    let appended = log.append(vec![event(&json!(7))]).await.unwrap();
    assert!(appended[0].created_at >= before_open);
    // Retention by age judges the old segments by their newest event's created_at, as
    // before: the one dated 2000 goes, the next one is recent.
    let deleted = log
        .enforce_retention(Some(std::time::Duration::from_secs(3600)), None)
        .unwrap();
    assert_eq!(deleted, [(0, 1)]);
    assert_eq!(log.first_position(), 1);
}
