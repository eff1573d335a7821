//! Opening a log after damage: an interrupted last write is truncated with a warning that
//! names the file and the bytes dropped; damage before the tail stops the open with an
//! error naming file and offset; nothing is skipped silently.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bus::store::{Log, StoreError};
use serde_json::json;

use crate::common::*;

const SEGMENT: u64 = 1 << 20;

/// A log of `n` single-event appends, closed cleanly; returns the ids.
async fn log_with(data: &Path, n: u64) -> Vec<String> {
    let log = open(data, SEGMENT);
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            log.append(vec![event(&json!({"n": i}))]).await.unwrap()[0]
                .id
                .clone(),
        );
    }
    log.close().await.unwrap();
    ids
}

/// Opens the log while capturing what it logs.
fn open_capturing(data: &Path) -> (Result<Log, StoreError>, String) {
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let result = tracing::subscriber::with_default(subscriber, || {
        Log::open(&log_dir(data), NAMESPACE, &config(data, SEGMENT))
    });
    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    (result, text)
}

/// Opens a log that must refuse to open; returns why.
fn open_err(data: &Path, what: &str) -> StoreError {
    match Log::open(&log_dir(data), NAMESPACE, &config(data, SEGMENT)) {
        Ok(_) => panic!("{what}"),
        Err(e) => e,
    }
}

fn flip_byte(file: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], offset).unwrap();
}

fn file_len(file: &Path) -> u64 {
    std::fs::metadata(file).unwrap().len()
}

#[tokio::test]
async fn a_cut_short_last_record_is_truncated_with_a_warning() {
    let data = tempfile::tempdir().unwrap();
    let ids = log_with(data.path(), 10).await;
    let segment = &segment_files(data.path())[0];
    let offsets = record_offsets(segment);
    let full = file_len(segment);
    OpenOptions::new()
        .write(true)
        .open(segment)
        .unwrap()
        .set_len(full - 3)
        .unwrap();

    let (log, logged) = open_capturing(data.path());
    let log = log.expect("a torn tail does not stop the open");
    let truncation = log
        .recovery()
        .truncated
        .clone()
        .expect("truncation reported");
    assert_eq!(truncation.file, *segment);
    assert_eq!(truncation.offset, offsets[9]);
    assert_eq!(truncation.bytes_dropped, full - 3 - offsets[9]);
    assert!(logged.contains("WARN"), "{logged}");
    assert!(logged.contains(&segment.display().to_string()), "{logged}");
    assert!(
        logged.contains(&format!("bytes_dropped={}", truncation.bytes_dropped)),
        "{logged}"
    );
    assert_eq!(file_len(segment), offsets[9]);

    assert_eq!(log.committed(), 9);
    let events = read_all(&log, 100);
    assert_eq!(events.len(), 9);
    assert_eq!(json(&events[8])["payload"]["n"], 8);

    // Position 9 is reused, but not the lost event's id: ids stay unique.
    assert_eq!(log.find_id(&ids[9]).await.unwrap(), None);
    assert_eq!(log.find_id(&ids[8]).await.unwrap(), Some(8));
    let new = log.append(vec![event(&json!("again"))]).await.unwrap();
    assert_eq!(new[0].position, 9);
    assert_ne!(new[0].id, ids[9]);
    log.close().await.unwrap();
    drop(log);

    let log = open(data.path(), SEGMENT);
    assert_eq!(log.recovery().truncated, None, "repaired for good");
    assert_eq!(log.committed(), 10);
    assert_eq!(log.find_id(&new[0].id).await.unwrap(), Some(9));
    assert_eq!(log.find_id(&ids[9]).await.unwrap(), None);
}

#[tokio::test]
async fn a_damaged_last_record_is_truncated() {
    let data = tempfile::tempdir().unwrap();
    log_with(data.path(), 5).await;
    let segment = &segment_files(data.path())[0];
    let last = *record_offsets(segment).last().unwrap();
    flip_byte(segment, last + 20);

    let (log, logged) = open_capturing(data.path());
    let log = log.unwrap();
    let truncation = log.recovery().truncated.clone().unwrap();
    assert_eq!(truncation.offset, last);
    assert!(
        truncation.reason.contains("checksum"),
        "{}",
        truncation.reason
    );
    assert!(logged.contains("WARN"), "{logged}");
    assert_eq!(log.committed(), 4);
}

#[tokio::test]
async fn damage_before_the_tail_stops_the_open_with_file_and_offset() {
    let data = tempfile::tempdir().unwrap();
    log_with(data.path(), 10).await;
    let segment = &segment_files(data.path())[0];
    let offsets = record_offsets(segment);
    let before = std::fs::read(segment).unwrap();

    for (record, byte) in [(2usize, 30u64), (4, 1), (0, 9)] {
        // A flip in the body, in the length word, and in the first byte of a body.
        flip_byte(segment, offsets[record] + byte);
        let err = open_err(
            data.path(),
            &format!("damage in record {record} was not detected"),
        );
        let message = err.to_string();
        assert!(
            message.contains(&segment.display().to_string()),
            "{message}"
        );
        assert!(
            message.contains(&format!("offset {}", offsets[record])),
            "{message}"
        );
        assert_eq!(
            std::fs::read(segment).unwrap().len(),
            before.len(),
            "nothing was truncated"
        );
        flip_byte(segment, offsets[record] + byte);
    }
    // Undamaged again: opens with every event.
    assert_eq!(open(data.path(), SEGMENT).committed(), 10);
}

#[tokio::test]
async fn an_incomplete_batch_is_dropped_as_a_whole() {
    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), SEGMENT);
    log.append(vec![event(&json!("single"))]).await.unwrap();
    let batch = log
        .append((0..3).map(|i| event(&json!({"b": i}))).collect())
        .await
        .unwrap();
    assert_eq!(batch[0].position, 1);
    log.close().await.unwrap();
    drop(log);

    // Cut exactly after the batch's second record: every remaining record is intact,
    // but the batch lacks its last one.
    let segment = &segment_files(data.path())[0];
    let offsets = record_offsets(segment);
    OpenOptions::new()
        .write(true)
        .open(segment)
        .unwrap()
        .set_len(offsets[3])
        .unwrap();

    let log = open(data.path(), SEGMENT);
    let truncation = log.recovery().truncated.clone().unwrap();
    assert_eq!(truncation.offset, offsets[1]);
    assert!(truncation.reason.contains("batch"), "{}", truncation.reason);
    assert_eq!(log.committed(), 1, "none of the batch survives");
    assert_eq!(log.find_id(&batch[0].id).await.unwrap(), None);
}

#[tokio::test]
async fn an_interrupted_segment_creation_is_undone() {
    let data = tempfile::tempdir().unwrap();
    log_with(data.path(), 3).await;
    // A crash right after creating the next segment file, before its header was written.
    let next = log_dir(data.path()).join(format!("{:020}.log", 3));
    std::fs::write(&next, b"BUS").unwrap();
    let log = open(data.path(), SEGMENT);
    assert_eq!(log.committed(), 3);
    assert!(!next.exists());
    let appended = log.append(vec![event(&json!(3))]).await.unwrap();
    assert_eq!(appended[0].position, 3);
}

#[tokio::test]
async fn a_log_in_use_cannot_be_opened_twice() {
    let data = tempfile::tempdir().unwrap();
    let _log = open(data.path(), SEGMENT);
    let err = open_err(data.path(), "second open refused");
    assert!(err.to_string().contains("in use"), "{err}");
}

#[tokio::test]
async fn segments_without_metadata_are_refused() {
    let data = tempfile::tempdir().unwrap();
    log_with(data.path(), 2).await;
    std::fs::remove_file(log_dir(data.path()).join("meta.json")).unwrap();
    let err = open_err(data.path(), "open refused");
    assert!(err.to_string().contains("meta.json"), "{err}");
}

#[tokio::test]
async fn damage_in_a_sealed_segment_is_reported_when_read() {
    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), 512);
    for i in 0..20 {
        log.append(vec![event(&json!({"n": i}))]).await.unwrap();
    }
    log.close().await.unwrap();
    drop(log);
    let sealed = &segment_files(data.path())[0];
    let offsets = record_offsets(sealed);
    flip_byte(sealed, offsets[1] + 40);

    // Sealed segments are not re-read at open (that would read the whole log)…
    let log = open(data.path(), 512);
    // …but every read checks each record's checksum.
    let err = log.read(0, 100).await.expect_err("damage detected");
    let message = err.to_string();
    assert!(message.contains(&sealed.display().to_string()), "{message}");
    assert!(
        message.contains(&format!("offset {}", offsets[1])),
        "{message}"
    );
    // Events of other segments are still served.
    let later = log.read(log.committed() - 1, 1).await.unwrap();
    assert_eq!(later.len(), 1);
}

#[tokio::test]
async fn a_lost_sealed_index_is_rebuilt() {
    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), 512);
    let mut appended = Vec::new();
    for i in 0..20 {
        let id = format!("e_client-{i}");
        appended.extend(
            log.append(vec![event_with_id(&id, &json!(i))])
                .await
                .unwrap(),
        );
        appended.extend(log.append(vec![event(&json!(i))]).await.unwrap());
    }
    let before = read_all(&log, 100);
    log.close().await.unwrap();
    drop(log);
    let dir = log_dir(data.path());
    std::fs::remove_file(dir.join(format!("{:020}.idx", 0))).unwrap();
    std::fs::remove_file(dir.join(format!("{:020}.ids", 0))).unwrap();

    let log = open(data.path(), 512);
    assert_eq!(log.recovery().rebuilt_indexes.len(), 1);
    assert_eq!(read_all(&log, 3), before);
    for a in &appended {
        assert_eq!(
            log.find_id(&a.id).await.unwrap(),
            Some(a.position),
            "{}",
            a.id
        );
    }
}

/// Where the records of a segment end, by its `.idx` (the last entry).
fn records_end(log_file: &Path) -> u64 {
    let index = std::fs::read(log_file.with_extension("idx")).unwrap();
    u64::from_le_bytes(index[index.len() - 8..].try_into().unwrap())
}

#[tokio::test]
async fn space_prepared_ahead_is_trimmed_at_seal_and_close_and_dropped_after_a_crash() {
    let data = tempfile::tempdir().unwrap();
    // Small segments, so that some are sealed while the writer prepares space ahead.
    let log = open(data.path(), 4096);
    for i in 0..200 {
        log.append(vec![event(&json!({"n": i}))]).await.unwrap();
    }
    let segments = segment_files(data.path());
    assert!(segments.len() > 2, "{segments:?}");
    for sealed in &segments[..segments.len() - 1] {
        assert_eq!(
            file_len(sealed),
            records_end(sealed),
            "{}",
            sealed.display()
        );
    }
    // With a sync per group, the active segment holds written zeros past its records.
    let active = segments.last().unwrap();
    let (end, len) = (records_end(active), file_len(active));
    assert!(
        len > end,
        "no space prepared: {len} bytes, records end at {end}"
    );
    let bytes = std::fs::read(active).unwrap();
    assert!(bytes[end as usize..].iter().all(|&b| b == 0));

    // What a crash leaves: the files as they are now.
    let image = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(log_dir(image.path())).unwrap();
    for entry in std::fs::read_dir(log_dir(data.path())).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, log_dir(image.path()).join(path.file_name().unwrap())).unwrap();
    }
    let (recovered, logged) = open_capturing(image.path());
    let recovered = recovered.unwrap();
    let truncation = recovered.recovery().truncated.clone().unwrap();
    assert_eq!(truncation.offset, end);
    assert_eq!(truncation.bytes_dropped, len - end);
    assert!(
        truncation.reason.contains("only zeros follow"),
        "{truncation:?}"
    );
    assert!(logged.contains("only zeros follow"), "{logged}");
    assert_eq!(read_all(&recovered, 50).len(), 200);
    recovered.close().await.unwrap();

    log.close().await.unwrap();
    assert_eq!(file_len(active), end, "closing trims the prepared space");
    let reopened = open(data.path(), 4096);
    assert_eq!(reopened.recovery().truncated, None);
    assert_eq!(read_all(&reopened, 50).len(), 200);
}

/// The commit times in a segment's `.tim` file (16-byte header, then one little-endian
/// 64-bit count of nanoseconds since the Unix epoch per event).
fn commit_times(log_file: &Path) -> Vec<i64> {
    let bytes = std::fs::read(log_file.with_extension("tim")).unwrap();
    assert_eq!(&bytes[..8], b"BUSTIM\x00\x01");
    bytes[16..]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[tokio::test]
async fn lost_commit_times_are_filled_with_the_recovery_time_and_extra_ones_dropped() {
    let data = tempfile::tempdir().unwrap();
    log_with(data.path(), 10).await;
    let segment = &segment_files(data.path())[0];
    let written = commit_times(segment);
    assert_eq!(written.len(), 10);
    assert!(written.windows(2).all(|w| w[0] <= w[1]), "{written:?}");
    let tim = segment.with_extension("tim");

    // A crash lost the last five entries, and left zeros where the third was.
    let f = OpenOptions::new().write(true).open(&tim).unwrap();
    f.set_len(16 + 5 * 8).unwrap();
    f.write_all_at(&[0u8; 8], 16 + 2 * 8).unwrap();
    drop(f);
    let recovery_started = bus::timestamp::Timestamp::now().unix_nanos();
    let log = open(data.path(), SEGMENT);
    let recovered = commit_times(segment);
    assert_eq!(recovered.len(), 10);
    assert_eq!(recovered[..2], written[..2], "the valid entries are kept");
    // The others are dated no earlier than the truth: such events are kept longer and
    // delivered to a start time before the recovery, never skipped.
    for (i, &time) in recovered.iter().enumerate().skip(2) {
        assert!(time >= recovery_started, "entry {i}");
    }
    let start = bus::timestamp::Timestamp::from_unix_nanos(written[7]);
    assert_eq!(log.first_committed_at_or_after(start).await.unwrap(), 2);
    // Commit times go on from there.
    let appended = log.append(vec![event(&json!("next"))]).await.unwrap();
    assert!(appended[0].created_at.unix_nanos() >= recovered[9]);
    log.close().await.unwrap();
    drop(log);
    assert_eq!(commit_times(segment).len(), 11);

    // Entries past the events kept (their records were lost) are dropped.
    let offsets = record_offsets(segment);
    OpenOptions::new()
        .write(true)
        .open(segment)
        .unwrap()
        .set_len(offsets[10] + 5)
        .unwrap();
    let log = open(data.path(), SEGMENT);
    assert_eq!(log.committed(), 10);
    assert_eq!(commit_times(segment).len(), 10);
    assert_eq!(commit_times(segment)[..], recovered[..]);
}

#[tokio::test]
async fn commit_times_never_go_backwards_across_a_restart() {
    let data = tempfile::tempdir().unwrap();
    log_with(data.path(), 3).await;
    let segment = &segment_files(data.path())[0];
    // The last commit was an hour ahead of the clock as it is now (the clock was put
    // back since).
    let ahead = bus::timestamp::Timestamp::now().unix_nanos() + 3_600_000_000_000;
    let tim = OpenOptions::new()
        .write(true)
        .open(segment.with_extension("tim"))
        .unwrap();
    tim.write_all_at(&ahead.to_le_bytes(), 16 + 2 * 8).unwrap();
    drop(tim);

    let log = open(data.path(), SEGMENT);
    let appended = log.append(vec![event(&json!("after"))]).await.unwrap();
    assert!(appended[0].created_at.unix_nanos() >= ahead);
    assert!(commit_times(segment).windows(2).all(|w| w[0] <= w[1]));
}

#[tokio::test]
async fn verification_checks_the_commit_times() {
    use bus::store::inspect::LogFiles;

    let data = tempfile::tempdir().unwrap();
    let log = open(data.path(), 512);
    for i in 0..20 {
        log.append(vec![event(&json!({"n": i}))]).await.unwrap();
    }
    log.close().await.unwrap();
    drop(log);
    let verify = || {
        LogFiles::open(&log_dir(data.path()), None)
            .unwrap()
            .verify(|_| {})
            .unwrap()
    };
    let clean = verify();
    assert!(
        clean.damage.is_empty() && clean.repairable.is_empty(),
        "{clean:?}"
    );

    let segments = segment_files(data.path());
    assert!(segments.len() > 2);
    let sealed = segments[0].with_extension("tim");
    let active = segments.last().unwrap().with_extension("tim");
    // A sealed segment's time goes backwards: the server would not notice.
    let f = OpenOptions::new().write(true).open(&sealed).unwrap();
    f.write_all_at(&1i64.to_le_bytes(), 16 + 8).unwrap();
    drop(f);
    // The active segment lost an entry: the server dates it when it opens the log.
    let len = file_len(&active);
    OpenOptions::new()
        .write(true)
        .open(&active)
        .unwrap()
        .set_len(len - 8)
        .unwrap();
    let found = verify();
    assert_eq!(found.damage.len(), 1, "{found:?}");
    assert_eq!(found.damage[0].file, sealed);
    assert_eq!(found.damage[0].offset, 16 + 8);
    assert!(found.damage[0].reason.contains("backwards"), "{found:?}");
    assert_eq!(found.repairable.len(), 1, "{found:?}");
    assert_eq!(found.repairable[0].file, active);

    // A segment sealed by a version without commit times is not a problem.
    std::fs::remove_file(&sealed).unwrap();
    let found = verify();
    assert!(found.damage.is_empty(), "{found:?}");
}
