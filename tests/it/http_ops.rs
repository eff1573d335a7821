//! The operators' endpoints over real HTTP: liveness, readiness, Prometheus metrics that
//! count what really happened, and JSON logs.

use std::time::Duration;

use serde_json::json;

use crate::common::cli::{free_port, Background};
use crate::common::http::*;

/// The value of one sample line (`name{labels} value`) of a metrics text.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
        .parse()
        .unwrap()
}

async fn get_text(server: &TestServer, path: &str) -> (u16, String, String) {
    let response = reqwest::get(format!("{}{path}", server.url)).await.unwrap();
    let status = response.status().as_u16();
    let content_type = header(&response, "content-type");
    (status, content_type, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_and_readiness() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    assert_eq!(get_text(&server, "healthz").await.0, 200);
    assert_eq!(get_text(&server, "health").await.2, "ok\n");
    let (status, _, text) = get_text(&server, "readyz").await;
    assert_eq!((status, text.as_str()), (200, "ready\n"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_publishes_deliveries_syncs_and_redeliveries() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &["--node-name", "n1"]).await;
    let mut follower = server.subscribe("subject=app.>").await;
    let mut worker = server
        .subscribe("subject=app.>&ack=manual&redelivery=100ms&redelivery_count=2")
        .await;
    let response = server
        .post(json!([{"subject": "app.a"}, {"subject": "app.b"}]).to_string())
        .await;
    assert_eq!(response.status(), 202);
    server.publish(&json!({"subject": "app.c"})).await;
    assert_eq!(follower.take(3).await.len(), 3);
    // The worker never acks its first event: it comes twice, then the worker moves on.
    let first = worker.next(Duration::from_secs(5)).await.unwrap();
    let again = worker.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.id, again.id);
    let _second = worker.next(Duration::from_secs(5)).await.unwrap();

    let (status, content_type, text) = get_text(&server, "metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    for family in [
        "bus_events_published_total counter",
        "bus_events_delivered_total counter",
        "bus_publish_duration_seconds histogram",
        "bus_fsync_duration_seconds histogram",
        "bus_group_commit_events histogram",
        "bus_subscriptions_active gauge",
        "bus_connections_active gauge",
        "bus_redeliveries_total counter",
        "bus_inbox_dropped_total counter",
        "bus_log_disk_bytes gauge",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family}\n")),
            "{family}:\n{text}"
        );
    }
    assert_eq!(
        sample(
            &text,
            "bus_events_published_total{node=\"n1\",namespace=\"app\"}"
        ),
        3.0
    );
    assert_eq!(
        sample(
            &text,
            "bus_events_published_total{node=\"n1\",namespace=\"orders\"}"
        ),
        0.0
    );
    assert_eq!(
        sample(&text, "bus_log_events{node=\"n1\",namespace=\"app\"}"),
        3.0
    );
    // 3 to the follower, 3 (first, again, second) to the worker.
    assert_eq!(
        sample(
            &text,
            "bus_events_delivered_total{node=\"n1\",namespace=\"app\"}"
        ),
        6.0
    );
    assert_eq!(sample(&text, "bus_redeliveries_total{node=\"n1\"}"), 1.0);
    assert_eq!(
        sample(&text, "bus_publish_duration_seconds_count{node=\"n1\"}"),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            "bus_publish_duration_seconds_bucket{node=\"n1\",le=\"+Inf\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            "bus_group_commit_events_sum{node=\"n1\",namespace=\"app\"}"
        ),
        3.0
    );
    assert_eq!(
        sample(
            &text,
            "bus_group_commit_events_count{node=\"n1\",namespace=\"app\"}"
        ),
        2.0
    );
    assert!(
        sample(
            &text,
            "bus_fsync_duration_seconds_count{node=\"n1\",namespace=\"app\"}"
        ) >= 2.0
    );
    assert_eq!(sample(&text, "bus_subscriptions_active{node=\"n1\"}"), 2.0);
    assert!(sample(&text, "bus_connections_active{node=\"n1\"}") >= 2.0);
    assert!(sample(&text, "bus_log_disk_bytes{node=\"n1\",namespace=\"app\"}") > 0.0);

    drop(follower);
    drop(worker);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, _, text) = get_text(&server, "metrics").await;
    assert_eq!(sample(&text, "bus_subscriptions_active{node=\"n1\"}"), 0.0);
    server.stop().await;
}

#[test]
fn logs_can_be_json_lines() {
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let path = data.path().display().to_string();
    let mut server = Background::start(&[
        "server",
        "--log-format",
        "json",
        "--addr",
        &addr,
        "--path",
        &path,
        "--namespaces",
        "app",
    ]);
    server.wait_for_stderr("listening");
    for line in &server.errors {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(value["level"].is_string(), "{line}");
    }
    let listening: serde_json::Value = server
        .errors
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|v| v["fields"]["message"] == "bus server listening")
        .unwrap();
    assert_eq!(listening["fields"]["addr"], addr);
}

/// Sets or clears the immutable attribute of a directory: nothing, not even root, can
/// then create a file in it.
fn immutable(dir: &std::path::Path, on: bool) -> bool {
    std::process::Command::new("chattr")
        .arg(if on { "+i" } else { "-i" })
        .arg(dir)
        .status()
        .is_ok_and(|status| status.success())
}

struct Mutable(std::path::PathBuf);

impl Drop for Mutable {
    fn drop(&mut self) {
        immutable(&self.0, false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_log_answers_503_with_retry_after() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &["--segment-size", "4KiB"]).await;
    server
        .publish(&json!({"subject": "app.a", "payload": 0}))
        .await;
    let namespace = data.path().join("app");
    if !immutable(&namespace, true) {
        eprintln!("skipped: chattr +i needs root on ext4 or similar (CI runs as root)");
        server.stop().await;
        return;
    }
    let _mutable = Mutable(namespace.clone());
    // Sealing a full segment creates files: with the directory immutable, it fails and
    // the log halts.
    let payload = "x".repeat(500);
    let mut refused = None;
    for n in 0..100 {
        let response = server
            .post(json!({"subject": "app.a", "payload": [n, payload]}).to_string())
            .await;
        if response.status() != 202 {
            refused = Some(response.status());
            break;
        }
    }
    assert!(refused.is_some(), "the log never needed a new segment");
    let response = server
        .post(json!({"subject": "app.a", "payload": "after"}).to_string())
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "retry-after"), "1");
    let text = response.text().await.unwrap();
    assert!(text.contains("must be restarted"), "{text}");
    let ready = reqwest::get(format!("{}readyz", server.url)).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(header(&ready, "retry-after"), "1");
    server.stop().await;
}
