//! `bus server` as a process: it stops cleanly on SIGTERM and SIGINT (exit 0, logs marked
//! cleanly closed) even with a thousand open streams, keeps everything across a restart,
//! reads its settings from flags and `BUS_*` variables, refuses bad settings with a
//! message naming them, and refuses a second server on the same directory.

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::process::*;

fn clean_end(data: &Path, namespace: &str) -> Option<u64> {
    let text = std::fs::read_to_string(data.join(namespace).join("meta.json")).unwrap();
    let meta: Value = serde_json::from_str(&text).unwrap();
    meta["clean_end"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_stop_the_server_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    for (round, signal_name) in ["TERM", "INT"].into_iter().enumerate() {
        let mut server = ServerProcess::start_on(data.path(), &["--namespaces", "app,orders"]);
        // A log is marked open before its first append (so that a crash is seen as one),
        // not at start-up: a server that only reads writes nothing.
        let opened = if round == 0 { None } else { Some(0) };
        assert_eq!(
            clean_end(data.path(), "orders"),
            opened,
            "orders at start-up"
        );
        let published = client
            .post(&server.url)
            .body(json!({"subject": "app.x"}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(published.status(), 202);
        assert_eq!(
            clean_end(data.path(), "app"),
            None,
            "marked open once written to"
        );
        server.signal(signal_name);
        let status = server.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "SIG{signal_name}: exit status {status}");
        let log = server.logged();
        assert!(
            log.iter().any(|l| l.contains("bus server stopped")),
            "{log:?}"
        );
        assert_eq!(clean_end(data.path(), "app"), Some(round as u64 + 1));
        assert_eq!(clean_end(data.path(), "orders"), Some(0));
    }
}

/// Reads `n` events from a fresh `start=oldest` subscription: (id, JSON) pairs.
async fn read_events(
    client: &reqwest::Client,
    url: &str,
    pattern: &str,
    n: usize,
) -> Vec<(String, Value)> {
    let response = client
        .get(format!("{url}?subject={pattern}&start=oldest"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    while events.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("events arrive")
            .expect("stream open")
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let mut id = None;
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    events.push((
                        id.take().expect("id before data"),
                        serde_json::from_str(v).unwrap(),
                    ));
                }
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_a_restart_with_the_same_ids_and_order() {
    let data = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app"]);
    let mut published = Vec::new();
    for i in 0..20 {
        let body = json!({"subject": format!("app.s{}", i % 3), "trace_id": format!("t{i}"), "payload": {"i": i, "s": "héllo"}});
        let response = client
            .post(&server.url)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        published.push(
            response.headers()["x-bus-event-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    let before = read_events(&client, &server.url, "app.>", 20).await;
    let mut server = server;
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(10)).success());

    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app"]);
    let after = read_events(&client, &server.url, "app.>", 20).await;
    assert_eq!(before, after, "same ids, order and payloads");
    let ids: Vec<&String> = after.iter().map(|(id, _)| id).collect();
    assert_eq!(ids, published.iter().collect::<Vec<_>>());

    // New events get new ids and come after the old ones.
    let response = client
        .post(&server.url)
        .body(json!({"subject": "app.s0", "payload": "new"}).to_string())
        .send()
        .await
        .unwrap();
    let new_id = response.headers()["x-bus-event-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!published.contains(&new_id));
    assert_eq!(response.headers()["x-bus-event-index"], "20");
    let all = read_events(&client, &server.url, "app.>", 21).await;
    assert_eq!(all[..20], after[..]);
    assert_eq!(all[20].0, new_id);
    // Resuming from an id of the previous run works too.
    let resumed = client
        .get(format!(
            "{}?subject=app.>&start={}",
            server.url, published[18]
        ))
        .send()
        .await
        .unwrap();
    let mut body = resumed.bytes_stream();
    let chunk = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&chunk).contains(&published[19]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_thousand_open_streams_exits_promptly() {
    const STREAMS: usize = 1000;
    raise_open_file_limit();
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start_on(data.path(), &["--namespaces", "app"]);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut streams = Vec::with_capacity(STREAMS);
    for i in 0..STREAMS {
        let query = match i % 3 {
            0 => "subject=app.>".to_owned(),
            1 => "subject=app.x&ack=manual".to_owned(),
            _ => format!("subject=_bus_.i{i}"),
        };
        let response = client
            .get(format!("{}?{query}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        streams.push(response.bytes_stream());
    }
    // One event reaches the wildcard streams: they are really open.
    let response = client
        .post(&server.url)
        .body(json!({"subject": "app.x"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let first = tokio::time::timeout(Duration::from_secs(10), streams[0].next())
        .await
        .unwrap();
    assert!(first.is_some());

    let signalled = Instant::now();
    server.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = server.wait_exit(Duration::from_secs(10));
        (status, server.logged())
    })
    .await
    .unwrap();
    assert!(
        status.0.success(),
        "exit status {}: {:?}",
        status.0,
        status.1
    );
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // Every stream ended (cleanly or by the connection closing), none hangs.
    for mut stream in streams {
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
        assert!(end.is_ok(), "a stream stayed open after shutdown");
    }
    assert_eq!(clean_end(data.path(), "app"), Some(1));
}

#[test]
fn settings_come_from_the_environment_and_flags_win() {
    let data = tempfile::tempdir().unwrap();
    let env_path = data.path().join("from-env");
    let flag_path = data.path().join("from-flag");
    let mut command = bus();
    command
        .args(["server"])
        .env("BUS_ADDR", "127.0.0.1:0")
        .env("BUS_PATH", &env_path)
        .env("BUS_NAMESPACES", "alpha,beta")
        .env("BUS_FSYNC", "interval=50ms")
        .env("BUS_SEGMENT_SIZE", "1MiB")
        .env("BUS_DUP_SIZE", "10")
        .env("BUS_DUP_TTL", "1m")
        .env("BUS_PING_INTERVAL", "10s")
        .env("BUS_LOG_LEVEL", "DEBUG");
    let mut server = ServerProcess::start(command);
    assert!(
        server.url.starts_with("http://127.0.0.1:"),
        "{}",
        server.url
    );
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert!(env_path.join("alpha").join("meta.json").exists());
    assert!(env_path.join("beta").join("meta.json").exists());

    let mut command = bus();
    command
        .args(["server", "--addr", "127.0.0.1:0", "--path"])
        .arg(&flag_path)
        .env("BUS_PATH", &env_path)
        .env("BUS_NAMESPACES", "gamma");
    let mut server = ServerProcess::start(command);
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert!(flag_path.join("gamma").join("meta.json").exists());
    assert!(!env_path.join("gamma").exists());
}

#[test]
fn bad_settings_are_refused_with_a_clear_message() {
    let data = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["server"], "--namespaces"),
        (
            &["server", "--namespaces", "app", "--fsync", "sometimes"],
            "invalid fsync policy",
        ),
        (
            &["server", "--namespaces", "app", "--segment-size", "12x"],
            "unknown unit",
        ),
        (&["server", "--namespaces", "_bus_"], "reserved"),
        (&["server", "--namespaces", "a.b"], "invalid namespace"),
        (&["server", "--namespaces", "app,app"], "declared twice"),
        (&["server", "--namespaces", " , "], "no namespaces"),
        (
            &["server", "--namespaces", "app", "--dup-ttl", "soon"],
            "invalid duration",
        ),
        (
            &["server", "--namespaces", "app", "--ping-interval", "0s"],
            "greater than zero",
        ),
        (
            &[
                "server",
                "--namespaces",
                "app",
                "--secret-key",
                "k",
                "--block-size",
                "10",
            ],
            "block size 10 is out of range",
        ),
        (
            &["server", "--namespaces", "app", "--addr", "nowhere:99999"],
            "listening on",
        ),
    ];
    for (args, expected) in cases {
        let output = bus()
            .args(*args)
            .args(["--path"])
            .arg(data.path())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let output = bus()
        .args(["server", "--namespaces", "app", "--path"])
        .arg(data.path())
        .env("BUS_LOG_LEVEL", "LOUD")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("BUS_LOG_LEVEL"));
}

#[test]
fn a_second_server_on_the_same_directory_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let mut first = ServerProcess::start_on(data.path(), &["--namespaces", "app"]);
    let output = bus()
        .args([
            "server",
            "--addr",
            "127.0.0.1:0",
            "--namespaces",
            "app",
            "--path",
        ])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("in use"));
    first.signal("TERM");
    assert!(first.wait_exit(Duration::from_secs(10)).success());
}
