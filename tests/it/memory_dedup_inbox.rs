//! Memory under hostile load, with the real server process: inbox subscribers that stop
//! reading, deduplication keys by the hundred thousand (also rebuilt at a restart, also
//! from a log holding keys far beyond today's limit), and keyed subjects without end. The
//! server's resident memory (`/proc/PID/status`) stays under the documented bounds, and
//! it then serves a normal client.
//!
//! Memory is the server's own (`RssAnon`: heap and stacks), not the page cache of files
//! it maps; the in-memory tail of recent events (`--tail-size`, bounded by design) is
//! kept small so that what is measured is the bound under test.

use std::io::Write;
use std::time::Duration;

use serde_json::json;

use crate::common::cli::run;
use crate::common::http::Sse;
use crate::common::process::ServerProcess;

const MIB: u64 = 1 << 20;

async fn post(client: &reqwest::Client, url: &str, body: String) -> u16 {
    client
        .post(url)
        .body(body)
        .send()
        .await
        .expect("POST")
        .status()
        .as_u16()
}

/// A normal client is served: it publishes, and a subscriber gets the event.
async fn serves_a_normal_client(server: &ServerProcess) {
    let client = reqwest::Client::new();
    let response = client
        .get(format!("{}?subject=app.check&start=oldest", server.url))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(response.status(), 200);
    let mut sse = Sse::new(response);
    let body = json!({"subject": "app.check", "payload": "hello"}).to_string();
    assert_eq!(post(&client, &server.url, body).await, 202);
    let frame = sse.next(Duration::from_secs(10)).await.expect("the event");
    assert_eq!(frame.json()["payload"], "hello");
}

/// Subscribes to `subject` over a raw connection and never reads from it.
fn stalled_subscriber(server: &ServerProcess, subject: &str) -> std::net::TcpStream {
    let address = server
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    // The smallest receive buffer: the kernel holds little on the server's behalf.
    let request = format!("GET /?subject={subject} HTTP/1.1\r\nHost: t\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("subscribe");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_subscribers_that_stop_reading_hold_a_bounded_backlog() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_on(data.path(), &["--namespaces", "app"]);
    let before = server.anon_resident_bytes();
    let stalled: Vec<_> = (0..3)
        .map(|_| stalled_subscriber(&server, "_bus_.stalled"))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 40 events of 8 MiB each to the inbox (the reference's largest body).
    let client = reqwest::Client::new();
    let payload = "x".repeat(8 * MIB as usize - 100);
    for n in 0..40 {
        let body =
            json!({"subject": "_bus_.stalled", "payload": payload, "trace_id": n.to_string()});
        assert_eq!(post(&client, &server.url, body.to_string()).await, 202);
    }
    drop(payload);
    // Each subscriber holds at most 4 MiB of waiting events beyond one, and the events
    // are shared between them: about 3 events of 8 MiB in all, plus what is in flight.
    let grown = server.anon_resident_bytes().saturating_sub(before);
    eprintln!("grew by {} MiB", grown / MIB);
    assert!(grown < 96 * MIB, "grew by {} MiB", grown / MIB);
    serves_a_normal_client(&server).await;
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deduplication_window_stays_within_its_budget_also_when_rebuilt() {
    let data = tempfile::tempdir().unwrap();
    let args = [
        "--namespaces",
        "app",
        "--dup-memory",
        "8MiB",
        "--dup-size",
        "1000000",
        "--tail-size",
        "1MiB",
    ];
    let server = ServerProcess::start_on(data.path(), &args);
    let before = server.anon_resident_bytes();
    let client = reqwest::Client::new();
    // 100,000 keys of 1 KiB (the longest allowed) on one subject: 100 MiB of keys.
    for batch in 0..100 {
        let events: Vec<_> = (0..1000)
            .map(|n| json!({"subject": "app.keyed", "key": format!("{batch:04}-{n:04}-{}", "k".repeat(1014))}))
            .collect();
        assert_eq!(
            post(&client, &server.url, json!(events).to_string()).await,
            202
        );
    }
    let grown = server.anon_resident_bytes().saturating_sub(before);
    eprintln!("grew by {} MiB", grown / MIB);
    // The window's 8 MiB, the 1 MiB tail, and what the allocator keeps of the 100 bodies
    // of 1 MiB it was handed (without the bound: over 200 MiB).
    assert!(grown < 40 * MIB, "grew by {} MiB", grown / MIB);
    // The newest keys are remembered; the oldest were let go.
    let newest = json!({"subject": "app.keyed", "key": format!("0099-0999-{}", "k".repeat(1014))});
    assert_eq!(post(&client, &server.url, newest.to_string()).await, 409);
    let oldest = json!({"subject": "app.keyed", "key": format!("0000-0000-{}", "k".repeat(1014))});
    assert_eq!(post(&client, &server.url, oldest.to_string()).await, 202);
    serves_a_normal_client(&server).await;
    drop(server);

    // Rebuilt at the restart: within the same budget.
    let (server, peak) = ServerProcess::start_on_measuring(data.path(), &args);
    eprintln!("peak of {} MiB while rebuilding", peak / MIB);
    assert!(
        peak < before + 24 * MIB,
        "peak of {} MiB while rebuilding",
        peak / MIB
    );
    let newest = json!({"subject": "app.keyed", "key": format!("0099-0998-{}", "k".repeat(1014))});
    assert_eq!(post(&client, &server.url, newest.to_string()).await, 409);
    serves_a_normal_client(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_longer_than_the_limit_in_an_old_log_are_not_rebuilt() {
    // A log written before keys had a limit (restored offline, which no HTTP limit
    // stops): 280 events with keys of 1 MiB.
    let data = tempfile::tempdir().unwrap();
    let key = "k".repeat(MIB as usize);
    let lines: String = (0..280)
        .map(|n| {
            format!(
                "{}\n",
                json!({"id": format!("e_old{n:05}"), "subject": "app.big", "key": format!("{n}{key}"), "created_at": "2026-11-30T10:00:00Z"})
            )
        })
        .collect();
    let input = data.path().join("old.jsonl");
    std::fs::write(&input, lines).unwrap();
    let path = data.path().join("data");
    let restored = run(
        &[
            "restore",
            "--path",
            path.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(restored.code, 0, "{}", restored.stderr);

    let (server, peak) = ServerProcess::start_on_measuring(&path, &["--namespaces", "app"]);
    eprintln!("peak of {} MiB while rebuilding", peak / MIB);
    assert!(
        peak < 64 * MIB,
        "peak of {} MiB while rebuilding",
        peak / MIB
    );
    serves_a_normal_client(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_keyed_subjects_are_pruned_across_subjects() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_on(
        data.path(),
        &[
            "--namespaces",
            "app",
            "--dup-ttl",
            "0",
            "--dup-memory",
            "4MiB",
            "--tail-size",
            "1MiB",
        ],
    );
    let before = server.anon_resident_bytes();
    let client = reqwest::Client::new();
    // 100,000 subjects with one key each (BUS_ATTACK_BATCHES=500 for the 500,000).
    let batches: usize = std::env::var("BUS_ATTACK_BATCHES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    for batch in 0..batches {
        let events: Vec<_> = (0..1000)
            .map(|n| json!({"subject": format!("app.s{batch}x{n}"), "key": "k"}))
            .collect();
        assert_eq!(
            post(&client, &server.url, json!(events).to_string()).await,
            202
        );
    }
    let grown = server.anon_resident_bytes().saturating_sub(before);
    eprintln!("grew by {} MiB", grown / MIB);
    assert!(grown < 16 * MIB, "grew by {} MiB", grown / MIB);
    // The newest subjects keep their key; the oldest were forgotten.
    let newest = json!({"subject": format!("app.s{}x999", batches - 1), "key": "k"});
    assert_eq!(post(&client, &server.url, newest.to_string()).await, 409);
    let oldest = json!({"subject": "app.s0x0", "key": "k"});
    assert_eq!(post(&client, &server.url, oldest.to_string()).await, 202);
    serves_a_normal_client(&server).await;
}
