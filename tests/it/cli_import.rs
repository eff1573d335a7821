//! `bus import` as a real process, on the data directory the reference server (ella.to/bus)
//! wrote itself (`tests/fixtures/ella-bus-data`, copied from the project's shared
//! fixtures): what a `bus` server then streams must be what the reference streamed, and
//! damage, a second import and a foreign target must be handled as the README says.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bus::reference::log_file;
use bus::reference::ReferenceCipher;
use bus::timestamp::Timestamp;
use serde_json::Value;

use crate::common::cli::*;
use crate::common::process::ServerProcess;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ella-bus-data")
}

/// The reference's data directory.
fn reference_data() -> PathBuf {
    fixture().join("data")
}

/// What the reference streamed for `<namespace>.>`, one event JSON per line.
fn streamed(namespace: &str) -> Vec<String> {
    std::fs::read_to_string(fixture().join(format!("{namespace}.jsonl")))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The contents of the records of a reference log file.
fn records(path: &Path) -> Vec<Vec<u8>> {
    let mut file = log_file::LogFile::open(path).unwrap();
    let mut out = Vec::new();
    while let Some(record) = file.next_record().unwrap() {
        out.push(record.content);
    }
    out
}

/// A writable copy of the reference's data directory.
fn copy_of_reference(into: &Path) -> PathBuf {
    let dir = into.join("reference");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["app.log", "orders.log"] {
        std::fs::copy(reference_data().join(name), dir.join(name)).unwrap();
    }
    dir
}

fn import(reference: &Path, target: &Path, extra: &[&str]) -> Run {
    let reference = reference.display().to_string();
    let target = target.display().to_string();
    let mut args = vec!["import", "--reference-path", &reference, "--path", &target];
    args.extend(extra);
    run(&args, None)
}

/// The events of a namespace of a `bus` data directory, read by `bus dump`.
fn dumped(target: &Path, namespace: &str) -> Vec<Value> {
    let path = target.display().to_string();
    run(&["dump", "--path", &path, "--namespace", namespace], None)
        .ok()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

fn reference_ids(namespace: &str) -> Vec<String> {
    streamed(namespace)
        .iter()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// The JSON a `bus` server streams for an event the reference streamed as `line` at
/// `index`: the same members in the same order and the same bytes, but for the two
/// normalisations `bus` applies to every event it stores (HTTP_API.md): `created_at` in
/// its fixed UTC form with nine fraction digits (the same instant), the payload compact;
/// and `index` added.
fn as_bus_streams_it(line: &str, index: usize) -> String {
    let at = line.find(",\"payload\":").expect("a payload");
    assert!(line.ends_with('}'));
    let (head, payload) = (
        &line[..at],
        &line[at + ",\"payload\":".len()..line.len() - 1],
    );
    let event: Value = serde_json::from_str(line).unwrap();
    let created_at = event["created_at"].as_str().unwrap();
    let ours = Timestamp::parse(created_at).unwrap().to_string();
    let head = head.replace(
        &format!("\"created_at\":\"{created_at}\""),
        &format!("\"created_at\":\"{ours}\""),
    );
    let payload = String::from_utf8(bus::event::compact_json(payload.as_bytes())).unwrap();
    format!("{head},\"payload\":{payload},\"index\":{index}}}")
}

/// `(id, data)` of the `msg` frames of an SSE body.
fn frames(body: &str) -> Vec<(String, String)> {
    body.split("\n\n")
        .filter(|frame| frame.lines().any(|l| l == "event: msg"))
        .map(|frame| {
            let field = |name: &str| {
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name:?} in {frame:?}"))
                    .to_owned()
            };
            (field("id: "), field("data: "))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_server_streams_what_the_reference_streamed() {
    let target = tempfile::tempdir().unwrap();
    let imported = import(&reference_data(), target.path(), &[]);
    imported.ok();
    assert_eq!(
        imported.stderr,
        "app: imported 204 events\norders: imported 3 events\n"
    );

    let mut server = ServerProcess::start_on(target.path(), &["--namespaces", "app,orders"]);
    let http = reqwest::Client::new();
    for namespace in ["app", "orders"] {
        let url = format!(
            "{}?subject={namespace}.>&start=oldest&until=now",
            server.url
        );
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body = tokio::time::timeout(Duration::from_secs(30), response.text())
            .await
            .expect("the stream ends (until=now)")
            .unwrap();
        let got = frames(&body);
        let expected = streamed(namespace);
        assert_eq!(got.len(), expected.len(), "{namespace}");
        for (index, ((id, data), line)) in got.iter().zip(&expected).enumerate() {
            let reference: Value = serde_json::from_str(line).unwrap();
            let ours: Value = serde_json::from_str(data).unwrap();
            assert_eq!(id, reference["id"].as_str().unwrap());
            // Field by field as values: what a client decodes is the same.
            for field in [
                "id",
                "subject",
                "trace_id",
                "key",
                "response_subject",
                "payload",
            ] {
                assert_eq!(ours.get(field), reference.get(field), "{field} of {line}");
            }
            assert_eq!(
                Timestamp::parse(ours["created_at"].as_str().unwrap()).unwrap(),
                Timestamp::parse(reference["created_at"].as_str().unwrap()).unwrap(),
                "{line}"
            );
            assert_eq!(ours["index"], index, "{line}");
            // And byte for byte, but for bus's two documented normalisations.
            assert_eq!(data, &as_bus_streams_it(line, index));
        }
    }
    // What the fixture covers: every optional field, and payloads that change when made
    // compact (so the byte comparison above is not vacuous).
    let all: Vec<String> = [streamed("app"), streamed("orders")].concat();
    for member in [
        "\"trace_id\"",
        "\"key\"",
        "\"response_subject\"",
        "\"payload\":null",
    ] {
        assert!(all.iter().any(|l| l.contains(member)), "{member}");
    }
    assert!(all.iter().any(|l| l.contains("{\"i\": 0")));
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn importing_again_adds_only_what_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("bus");

    // A reference that had written only its first 100 app events.
    let early = dir.path().join("early");
    std::fs::create_dir_all(&early).unwrap();
    let app = records(&reference_data().join("app.log"));
    let first: Vec<&[u8]> = app[..100].iter().map(Vec::as_slice).collect();
    std::fs::write(early.join("app.log"), log_file::encode(&first)).unwrap();
    let run = import(&early, &target, &[]);
    assert_eq!(run.ok(), "");
    assert_eq!(run.stderr, "app: imported 100 events\n");

    // The same reference later: only the other 104 are added.
    let run = import(&reference_data(), &target, &["--namespaces", "app"]);
    run.ok();
    assert_eq!(
        run.stderr,
        "app: imported 104 new events (100 were imported before)\n"
    );
    // Again: nothing.
    let run = import(&reference_data(), &target, &[]);
    run.ok();
    assert_eq!(
        run.stderr,
        "app: nothing new to import (204 events were imported before)\norders: imported 3 events\n"
    );
    let events = dumped(&target, "app");
    assert_eq!(ids(&events), reference_ids("app"));
    assert_eq!(ids(&dumped(&target, "orders")), reference_ids("orders"));
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event["index"], index);
    }

    // Events published to bus since do not stop a later import, which finds nothing new.
    let path = target.display().to_string();
    run_restore(&path, "{\"subject\":\"app.after\",\"payload\":1}\n");
    let run = import(&reference_data(), &target, &["--namespaces", "app"]);
    run.ok();
    assert_eq!(
        run.stderr,
        "app: nothing new to import (204 events were imported before); the namespace also \
         holds 1 events published to bus since\n"
    );
    assert_eq!(dumped(&target, "app").len(), 205);
}

fn run_restore(path: &str, lines: &str) {
    run(&["restore", "--path", path], Some(lines)).ok();
}

#[test]
fn a_target_holding_other_events_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("bus");
    let path = target.display().to_string();
    run_restore(&path, "{\"subject\":\"app.mine\",\"payload\":1}\n");
    let run = import(&reference_data(), &target, &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("namespace app of the target already holds other events"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("e_dc7b591ksdua9bnpqm10"),
        "{}",
        run.stderr
    );
    // The check comes first: not even the orders namespace was created.
    assert!(!target.join("orders").exists());
    assert_eq!(dumped(&target, "app").len(), 1);
}

#[test]
fn a_truncated_log_file_is_refused_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let reference = copy_of_reference(dir.path());
    let app = reference.join("app.log");
    // Cut into the last record, which starts at byte 48502 (the header says so too).
    let bytes = std::fs::read(&app).unwrap();
    assert_eq!(bytes.len(), 48643);
    std::fs::write(&app, &bytes[..48600]).unwrap();
    let target = dir.path().join("bus");

    let run = import(&reference, &target, &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let message = &run.stderr;
    assert!(message.contains(&app.display().to_string()), "{message}");
    assert!(
        message.contains("record 203 at byte offset 48502 is cut off"),
        "{message}"
    );
    assert!(message.contains("--skip-damaged"), "{message}");
    assert!(!target.join("app").exists() && !target.join("orders").exists());

    // With --skip-damaged: the 203 records before it, and the loss said.
    let run = import(&reference, &target, &["--skip-damaged"]);
    run.ok();
    assert!(
        run.stderr
            .contains("app: imported 203 events; could not read the last 1 records (cut off)"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("left out 1 damaged records"),
        "{}",
        run.stderr
    );
    assert_eq!(
        ids(&dumped(&target, "app")),
        reference_ids("app")[..203].to_vec()
    );
}

#[test]
fn a_record_that_is_not_an_event_is_refused_or_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let reference = copy_of_reference(dir.path());
    let app = reference.join("app.log");
    // Record 1 starts at byte 181; its content at 189 (`{"id":…`).
    let mut bytes = std::fs::read(&app).unwrap();
    assert_eq!(&bytes[189..195], b"{\"id\":");
    bytes[189] = b'x';
    std::fs::write(&app, &bytes).unwrap();
    let target = dir.path().join("bus");

    let run = import(&reference, &target, &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("record 1 at byte offset 181 is not an event's JSON"),
        "{}",
        run.stderr
    );
    assert!(!target.join("app").exists());

    let run = import(&reference, &target, &["--skip-damaged"]);
    run.ok();
    assert!(
        run.stderr.contains("app: left out: ")
            && run.stderr.contains("record 1 at byte offset 181"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("app: imported 203 events; left out 1 damaged records"),
        "{}",
        run.stderr
    );
    let mut expected = reference_ids("app");
    expected.remove(1);
    assert_eq!(ids(&dumped(&target, "app")), expected);

    // Importing again with the same flag finds the same events there: nothing new.
    let run = import(
        &reference,
        &target,
        &["--skip-damaged", "--namespaces", "app"],
    );
    run.ok();
    assert!(
        run.stderr
            .contains("app: nothing new to import (203 events"),
        "{}",
        run.stderr
    );
}

#[test]
fn bytes_after_the_committed_records_are_reported_and_not_imported() {
    let dir = tempfile::tempdir().unwrap();
    let reference = copy_of_reference(dir.path());
    let orders = reference.join("orders.log");
    let mut bytes = std::fs::read(&orders).unwrap();
    assert_eq!(bytes.len(), 537);
    // An append whose batch the reference never committed (its header still counts 3).
    bytes.extend_from_slice(&9i64.to_le_bytes());
    bytes.extend_from_slice(b"{\"id\":\"e");
    std::fs::write(&orders, &bytes).unwrap();
    let target = dir.path().join("bus");
    let run = import(&reference, &target, &["--namespaces", "orders"]);
    run.ok();
    assert!(
        run.stderr.contains(
            "16 bytes at byte offset 537, after the 3 records its header counts, were not imported"
        ),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("orders: imported 3 events"),
        "{}",
        run.stderr
    );
    assert_eq!(ids(&dumped(&target, "orders")), reference_ids("orders"));
}

/// A copy of the reference's data directory with every record sealed as
/// [`ReferenceCipher`] reads it (no file encrypted by the reference is at hand).
fn encrypted_reference(into: &Path, secret: &str, block_size: usize) -> PathBuf {
    let dir = into.join("encrypted");
    std::fs::create_dir_all(&dir).unwrap();
    let cipher = ReferenceCipher::new(secret, block_size).unwrap();
    for name in ["app.log", "orders.log"] {
        let sealed: Vec<Vec<u8>> = records(&reference_data().join(name))
            .iter()
            .map(|content| cipher.seal(content, block_size))
            .collect();
        let sealed: Vec<&[u8]> = sealed.iter().map(Vec::as_slice).collect();
        std::fs::write(dir.join(name), log_file::encode(&sealed)).unwrap();
    }
    dir
}

#[test]
fn encrypted_reference_files_are_read_with_their_key() {
    let dir = tempfile::tempdir().unwrap();
    // A small block size, so that most records take several blocks.
    let reference = encrypted_reference(dir.path(), "old secret", 256);
    let target = dir.path().join("bus");

    let run = import(&reference, &target, &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("app.log: record 0 at byte offset 16 is not an event's JSON")
            && run.stderr.contains("--reference-secret-key"),
        "{}",
        run.stderr
    );
    let run = import(
        &reference,
        &target,
        &[
            "--reference-secret-key",
            "wrong",
            "--reference-block-size",
            "256",
        ],
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("record 0 at byte offset 16 could not be decrypted"),
        "{}",
        run.stderr
    );
    let run = import(
        &reference,
        &target,
        &[
            "--reference-secret-key",
            "old secret",
            "--reference-block-size",
            "256",
        ],
    );
    run.ok();
    assert_eq!(
        run.stderr,
        "app: imported 204 events\norders: imported 3 events\n"
    );
    for namespace in ["app", "orders"] {
        let events = dumped(&target, namespace);
        let expected = streamed(namespace);
        assert_eq!(events.len(), expected.len());
        for (index, (event, line)) in events.iter().zip(&expected).enumerate() {
            assert_eq!(
                event,
                &serde_json::from_str::<Value>(&as_bus_streams_it(line, index)).unwrap()
            );
        }
    }
}

#[test]
fn wrong_directories_and_namespaces_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("bus");
    let missing = dir.path().join("nowhere");
    let run = import(&missing, &target, &[]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("--reference-path") && run.stderr.contains("nowhere"),
        "{}",
        run.stderr
    );
    let run = import(dir.path(), &target, &[]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("holds no <namespace>.log file"),
        "{}",
        run.stderr
    );
    let run = import(&reference_data(), &target, &["--namespaces", "billing"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("there is no billing.log in")
            && run.stderr.contains("(its namespaces: app, orders)"),
        "{}",
        run.stderr
    );
    let run = import(&reference_data(), &target, &["--namespaces", "_bus_"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("inbox events"), "{}", run.stderr);
    assert!(!target.exists());
}

#[test]
fn help_shows_an_example() {
    let help = run(&["import", "--help"], None);
    let text = help.ok();
    assert!(text.contains("bus import --reference-path"), "{text}");
    assert!(text.contains("--skip-damaged"), "{text}");
    assert!(text.contains("--reference-secret-key"), "{text}");
}
