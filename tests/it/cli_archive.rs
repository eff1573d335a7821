//! `bus dump`, `bus restore`, `bus copy` and `bus debug` as real processes, on real
//! servers and real data directories with several segments.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::cli::*;
use crate::common::process::ServerProcess;

fn host(server: &ServerProcess) -> String {
    server.url.trim_end_matches('/').to_owned()
}

fn stop(mut server: ServerProcess) {
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

/// Publishes a varied set of events to `app` and `orders` over HTTP: single events with
/// every field, `null` and absent payloads, response subjects, and batches.
async fn publish_variety(url: &str, count: usize) {
    let http = reqwest::Client::new();
    for n in 0..count {
        let body = match n % 5 {
            0 => json!({"subject": "app.a", "payload": {"n": n, "text": "x".repeat(n % 97)}}),
            1 => {
                json!({"subject": "app.b.c", "trace_id": format!("t{n}"), "key": format!("k{n}"), "payload": null})
            }
            2 => {
                json!({"subject": "orders.new", "response_subject": "_bus_.reply", "payload": [n]})
            }
            3 => json!([{"subject": "app.batch", "payload": n}, {"subject": "app.batch"}]),
            _ => json!({"subject": "app.a", "id": format!("e_custom{n}"), "payload": "ünïcode"}),
        };
        let response = http.post(url).body(body.to_string()).send().await.unwrap();
        assert_eq!(response.status(), 202, "{body}");
    }
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn server_on(data: &Path, extra: &[&str]) -> ServerProcess {
    let mut args = vec!["--namespaces", "app,orders"];
    args.extend(extra);
    ServerProcess::start_on(data, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_and_restore_through_servers_keep_everything() {
    let first_data = tempfile::tempdir().unwrap();
    let first = server_on(first_data.path(), &["--segment-size", "4KiB"]);
    publish_variety(&first.url, 200).await;
    let first_host = host(&first);

    let dump = run(
        &["dump", "--host", &first_host, "--namespace", "app,orders"],
        None,
    );
    let dumped = dump.ok().to_owned();
    let events = lines(&dumped);
    assert_eq!(events.len(), 240, "{}", dump.stderr);
    // Piped, no progress bar: only the summary.
    assert_eq!(dump.stderr, "dumped 240 events\n");
    // Namespace by namespace, each in log order.
    let app_count = events
        .iter()
        .filter(|e| e["subject"].as_str().unwrap().starts_with("app."))
        .count();
    for (i, event) in events.iter().enumerate() {
        let index = event["index"].as_u64().unwrap() as usize;
        assert_eq!(index, if i < app_count { i } else { i - app_count });
    }

    // Into a fresh server, from a file.
    let second_data = tempfile::tempdir().unwrap();
    let second = server_on(second_data.path(), &[]);
    let second_host = host(&second);
    let file = second_data.path().join("dump.jsonl");
    std::fs::write(&file, &dumped).unwrap();
    let restore = run(
        &[
            "restore",
            "--host",
            &second_host,
            "--input",
            file.to_str().unwrap(),
        ],
        None,
    );
    restore.ok();
    assert!(
        restore.stderr.contains("restored 240 events"),
        "{restore:?}"
    );
    let again = run(
        &["dump", "--host", &second_host, "--namespace", "app,orders"],
        None,
    );
    assert_eq!(again.ok(), dumped, "ids, order, payloads and times survive");

    // Restoring the same events again duplicates nothing.
    let twice = run(&["restore", "--host", &second_host], Some(&dumped));
    assert_eq!(twice.code, 1, "{twice:?}");
    // The server recognises the batch by a deduplication key or by an id, whichever it
    // checks first; either way nothing of it is stored.
    assert!(
        twice.stderr.contains("(409)")
            && (twice.stderr.contains("already exists")
                || twice.stderr.contains("key was processed before")),
        "{twice:?}"
    );
    assert!(twice.stderr.contains("restoring lines 1-"), "{twice:?}");
    let after = run(
        &["dump", "--host", &second_host, "--namespace", "app,orders"],
        None,
    );
    assert_eq!(after.ok(), dumped);

    // Offline: the stopped server's directory dumps the same, and restores into a new
    // directory that a server then serves identically.
    stop(first);
    let offline = run(
        &["dump", "--path", first_data.path().to_str().unwrap()],
        None,
    );
    assert_eq!(offline.ok(), dumped);
    let third_data = tempfile::tempdir().unwrap();
    run(
        &[
            "restore",
            "--path",
            third_data.path().to_str().unwrap(),
            "--input",
            file.to_str().unwrap(),
        ],
        None,
    )
    .ok();
    let third = server_on(third_data.path(), &[]);
    let served = run(
        &["dump", "--host", &host(&third), "--namespace", "app,orders"],
        None,
    );
    assert_eq!(served.ok(), dumped);

    // A running server's directory is not read behind its back.
    let busy = run(
        &["dump", "--path", third_data.path().to_str().unwrap()],
        None,
    );
    assert_eq!(busy.code, 1);
    assert!(
        busy.stderr.contains("in use by a running bus server"),
        "{busy:?}"
    );

    // Bad input is refused with its line number.
    let bad = run(
        &["restore", "--host", &second_host],
        Some("{\"subject\":\"app.x\"}\nnot json\n"),
    );
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("line 2"), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_debug_on_a_directory_with_several_segments() {
    let source = tempfile::tempdir().unwrap();
    let server = server_on(source.path(), &["--segment-size", "4KiB"]);
    publish_variety(&server.url, 300).await;
    stop(server);
    let source_path = source.path().to_str().unwrap();
    let dumped = run(&["dump", "--path", source_path], None).ok().to_owned();

    let debug = run(&["debug", "--path", source_path], None);
    let text = debug.ok();
    assert!(
        text.contains("namespace app") && text.contains("namespace orders"),
        "{text}"
    );
    assert!(
        text.contains("events:    300"),
        "app holds 300 events:\n{text}"
    );
    assert!(
        text.contains("events:    60"),
        "orders holds 60 events:\n{text}"
    );
    let app_segments = std::fs::read_dir(source.path().join("app"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count();
    assert!(
        app_segments > 3,
        "the test needs several segments, got {app_segments}"
    );
    assert!(
        text.contains(&format!("segments:  {app_segments} (")),
        "{text}"
    );
    assert!(text.contains("first:     position 0, e_"), "{text}");
    assert!(text.contains("last:      position 299, e_"), "{text}");

    let list = run(
        &[
            "debug",
            "--path",
            source_path,
            "--namespace",
            "orders",
            "--list",
        ],
        None,
    );
    let listed: Vec<&str> = list.ok().lines().filter(|l| l.contains(".log:")).collect();
    assert_eq!(listed.len(), 60);
    assert!(
        listed[0]
            .trim_start()
            .starts_with("0\t00000000000000000000.log:24\te_"),
        "{}",
        listed[0]
    );

    let verify = run(&["debug", "--path", source_path, "--verify"], None);
    assert!(
        verify.ok().contains("verify:    ok, 300 records checked"),
        "{verify:?}"
    );

    // Copy, then copy again: the second run stops at the first id already there, unless
    // told to skip those.
    let target = tempfile::tempdir().unwrap();
    let target_path = target.path().to_str().unwrap();
    let copy = run(&["copy", "--from", source_path, "--to", target_path], None);
    copy.ok();
    assert!(copy.stderr.contains("app: copied 300 events"), "{copy:?}");
    assert_eq!(run(&["dump", "--path", target_path], None).ok(), dumped);
    let again = run(&["copy", "--from", source_path, "--to", target_path], None);
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("already in the log"), "{again:?}");
    let skipping = run(
        &[
            "copy",
            "--from",
            source_path,
            "--to",
            target_path,
            "--skip-ids",
        ],
        None,
    );
    skipping.ok();
    assert!(
        skipping.stderr.contains("copied 0 events, skipped 300"),
        "{skipping:?}"
    );
    assert_eq!(run(&["dump", "--path", target_path], None).ok(), dumped);
    // A flipped byte in the middle of a sealed segment: verify names file and offset
    // and exits 4; dump and copy refuse to go past it.
    let first_segment = std::fs::read_dir(source.path().join("app"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .min_by_key(|p| p.file_name().unwrap().to_owned())
        .unwrap();
    let mut bytes = std::fs::read(&first_segment).unwrap();
    let offset = 24 + 8 + 10; // inside the first record's body
    bytes[offset] ^= 0x20;
    std::fs::write(&first_segment, &bytes).unwrap();
    let verify = run(&["debug", "--path", source_path, "--verify"], None);
    assert_eq!(verify.code, 1, "{verify:?}");
    let name = first_segment.file_name().unwrap().to_str().unwrap();
    let damage = verify
        .stdout
        .lines()
        .find(|l| l.starts_with("  DAMAGE:"))
        .unwrap_or_else(|| panic!("{verify:?}"));
    assert!(
        damage.contains(name) && damage.contains("at offset 24"),
        "{damage}"
    );
    assert!(
        verify.stderr.contains("damaged data in namespace app"),
        "{verify:?}"
    );
    let dump = run(&["dump", "--path", source_path], None);
    assert_eq!(dump.code, 1);
    assert!(
        dump.stderr.contains(name) && dump.stderr.contains("offset 24"),
        "{dump:?}"
    );
    let other = tempfile::tempdir().unwrap();
    let copy = run(
        &[
            "copy",
            "--from",
            source_path,
            "--to",
            other.path().to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(copy.code, 1);
    assert!(copy.stderr.contains("checksum"), "{copy:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_write_is_reported_and_left_out_but_not_repaired_offline() {
    let data = tempfile::tempdir().unwrap();
    let server = server_on(data.path(), &[]);
    publish_variety(&server.url, 5).await;
    stop(server);
    let path = data.path().to_str().unwrap();
    let before = run(&["dump", "--path", path], None).ok().to_owned();

    // Half of a record: what a crash in the middle of an append leaves.
    let segment = data.path().join("app/00000000000000000000.log");
    let len = std::fs::metadata(&segment).unwrap().len();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap();
    std::io::Write::write_all(&mut file, &[40, 0, 0, 0, 1, 2, 3, 4, b'{', b'"']).unwrap();
    drop(file);

    let dump = run(&["dump", "--path", path], None);
    assert_eq!(dump.ok(), before);
    assert!(
        dump.stderr.contains("ignored an interrupted last write"),
        "{dump:?}"
    );
    let debug = run(
        &["debug", "--path", path, "--namespace", "app", "--verify"],
        None,
    );
    let text = debug.ok();
    assert!(
        text.contains(&format!("torn tail: {} at offset {len}", segment.display())),
        "{text}"
    );
    assert!(
        text.contains("repairable:") && text.contains("verify:    ok"),
        "{text}"
    );
    // Reading changed nothing; the server repairs it when it opens the log.
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), len + 10);
    let server = server_on(data.path(), &[]);
    stop(server);
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), len);
    assert_eq!(run(&["dump", "--path", path], None).ok(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_gives_a_time_to_events_with_gos_zero_time_as_a_publish_does() {
    let data = tempfile::tempdir().unwrap();
    let path = data.path().to_str().unwrap();
    let input = "{\"subject\":\"app.x\",\"created_at\":\"0001-01-01T00:00:00Z\",\"payload\":1}\n\
                 {\"subject\":\"app.x\",\"created_at\":\"2020-01-02T03:04:05Z\",\"payload\":2}\n";
    run(&["restore", "--path", path], Some(input)).ok();
    let dumped = run(&["dump", "--path", path], None).ok().to_owned();
    let times: Vec<String> = lines(&dumped)
        .iter()
        .map(|event| event["created_at"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(times.len(), 2, "{dumped}");
    assert!(
        times[0].starts_with("20"),
        "the log's time, not Go's zero: {}",
        times[0]
    );
    assert_eq!(
        times[1], "2020-01-02T03:04:05.000000000Z",
        "a real time is kept"
    );
}
