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

/// Metric families by name: their type and the names of their labels.
type Families = std::collections::BTreeMap<String, (String, std::collections::BTreeSet<String>)>;

/// The families of a metrics text (`# TYPE name kind`), with the label names their samples
/// use (without `node`, on every sample, and `le`, of histogram buckets).
fn exported_families(metrics: &str) -> Families {
    let mut families = Families::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.insert(name.to_owned(), (kind.to_owned(), Default::default()));
        }
    }
    for line in metrics
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
    {
        let series = line.rsplit_once(' ').unwrap().0;
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let family = ["", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let family = name.strip_suffix(suffix)?;
                families.contains_key(family).then_some(family)
            })
            .unwrap_or_else(|| panic!("a sample of no family: {line}"));
        let names = labels
            .trim_end_matches('}')
            .split(',')
            .filter_map(|pair| Some(pair.split_once('=')?.0.to_owned()))
            .filter(|name| name != "node" && name != "le");
        families.get_mut(family).unwrap().1.extend(names);
    }
    families
}

/// HTTP_API.md's metrics table: name → (type, label names).
fn documented_families() -> Families {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/HTTP_API.md"))
        .expect("HTTP_API.md");
    let section = doc
        .split("### Metrics\n")
        .nth(1)
        .expect("HTTP_API.md has a ### Metrics section");
    let mut families = Families::new();
    for row in section.lines().filter(|line| line.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let name = cells[0].trim_start_matches("| ").trim_matches('`');
        let labels = cells[2]
            .split(", ")
            .filter(|label| *label != "—")
            .map(|label| label.trim_matches('`').to_owned())
            .collect();
        families.insert(name.to_owned(), (cells[1].to_owned(), labels));
    }
    families
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exported_metric_family_is_documented_in_http_api_md() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &["--node-name", "n1"]).await;
    // Some of everything, so that the labelled families have samples.
    let mut worker = server
        .subscribe("subject=app.>&ack=manual&consumer=docs&redelivery=30s")
        .await;
    let keyed = json!({"subject": "app.k", "key": "once"}).to_string();
    assert_eq!(server.post(keyed.clone()).await.status(), 202);
    assert_eq!(server.post(keyed).await.status(), 409);
    assert!(worker.next(Duration::from_secs(5)).await.is_some());
    assert_eq!(get_text(&server, "no/such/path").await.0, 404);
    assert_eq!(get_text(&server, "healthz").await.0, 200);
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, format!("{}metrics", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);

    let text = server.metrics().await;
    let exported = exported_families(&text);
    let documented = documented_families();
    assert!(documented.len() >= 30, "{documented:?}");
    for (name, (kind, labels)) in &exported {
        let Some((documented_kind, documented_labels)) = documented.get(name) else {
            panic!("{name} is exported but not in HTTP_API.md's metrics table");
        };
        assert_eq!(kind, documented_kind, "the type of {name}");
        assert!(
            labels.is_subset(documented_labels),
            "{name} has labels {labels:?}; HTTP_API.md says {documented_labels:?}"
        );
    }
    for name in documented.keys() {
        // The process families are read from Linux's /proc.
        if cfg!(target_os = "linux") || !name.starts_with("process_") {
            assert!(
                exported.contains_key(name),
                "{name} is documented, not exported"
            );
        }
    }

    // What the traffic above counted.
    let requests = |route: &str, code: &str| {
        let labels = [format!("route=\"{route}\""), format!("code=\"{code}\"")];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        metric(&text, "bus_http_requests_total", &labels).unwrap_or(0.0)
    };
    assert_eq!(requests("publish", "202"), 1.0, "{text}");
    assert_eq!(requests("publish", "409"), 1.0);
    assert_eq!(requests("subscribe", "200"), 1.0);
    assert_eq!(requests("other", "404"), 1.0);
    assert_eq!(requests("health", "200"), 1.0);
    assert_eq!(requests("options", "204"), 1.0);
    assert!(!text.contains("no/such"), "raw paths never become labels");
    assert_eq!(
        metric(&text, "bus_duplicates_refused_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "bus_auth_failures_total", &["reason=\"forbidden\""]),
        Some(0.0)
    );
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        metric(&text, "bus_build_info", &[&version, "commit=\""]),
        Some(1.0)
    );
    if cfg!(target_os = "linux") {
        assert!(metric(&text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
        assert!(metric(&text, "process_open_fds", &[]).unwrap() >= 3.0);
        let started = metric(&text, "process_start_time_seconds", &[]).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            started <= now + 1.0 && started > now - 24.0 * 3600.0,
            "{started}"
        );
    }
    // The metrics request itself is counted once it is answered.
    let again = server.metrics().await;
    assert!(metric(&again, "bus_http_requests_total", &["route=\"metrics\""]).unwrap() >= 1.0);
    drop(worker);
    server.stop().await;
}

/// A server process with `--access-log`, JSON logs; its standard error.
fn access_logged_server(extra: &[&str]) -> (tempfile::TempDir, Background, String) {
    let data = tempfile::tempdir().unwrap();
    let host = format!("127.0.0.1:{}", free_port());
    let path = data.path().display().to_string();
    let mut args = vec![
        "server",
        "--log-format",
        "json",
        "--addr",
        &host,
        "--path",
        &path,
        "--namespaces",
        "app",
    ];
    args.extend_from_slice(extra);
    let mut server = Background::start(&args);
    server.wait_for_stderr("listening");
    (data, server, host)
}

/// Sends a raw HTTP/1.1 request and reads the answer until the server closes, or for
/// `wait` (an event stream) before closing.
fn raw_request(host: &str, request: &str, wait: Duration) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The access lines of a server's standard error, as JSON, waiting until there are `n`.
fn access_lines(server: &mut Background, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        server.errors.extend(server.stderr.try_iter());
        let lines: Vec<serde_json::Value> = server
            .errors
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["fields"]["message"] == "access")
            .collect();
        if lines.len() >= n || std::time::Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_access_log_tells_each_answer_and_never_a_token() {
    const SECRET: &str = "secret-in-the-query-7f3a";
    let (_data, mut server, host) = access_logged_server(&["--access-log"]);
    let body = r#"{"subject":"app.logged","payload":1}"#;
    let publish = format!(
        "POST /?access_token={SECRET} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_request(&host, &publish, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    // A stream, left after a moment: its line comes when it ends.
    let subscribe = format!(
        "GET /?subject=app.%3E&start=oldest&access_token={SECRET} HTTP/1.1\r\nHost: t\r\n\r\n"
    );
    let answer = raw_request(&host, &subscribe, Duration::from_millis(500));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let missing = format!("GET /no/{SECRET} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert!(raw_request(&host, &missing, Duration::from_secs(5)).starts_with("HTTP/1.1 404"));

    let lines = access_lines(&mut server, 3);
    assert_eq!(lines.len(), 3, "{:?}", server.errors);
    for line in &server.errors {
        assert!(!line.contains(SECRET), "a secret in the log: {line}");
        assert!(
            !line.contains("access_token"),
            "the query in the log: {line}"
        );
    }
    let fields = |route: &str| {
        lines
            .iter()
            .map(|line| &line["fields"])
            .find(|fields| fields["route"] == route)
            .unwrap_or_else(|| panic!("no {route} line in {lines:?}"))
            .clone()
    };
    let published = fields("publish");
    assert_eq!(published["method"], "POST");
    assert_eq!(published["status"], 202);
    assert_eq!(published["namespace"], "app");
    assert_eq!(published["complete"], true);
    assert_eq!(published["bytes"], 0, "a 202 has no body");
    assert_eq!(published["version"], "HTTP/1.1");
    assert!(published["duration_ms"].as_f64().is_some(), "{published}");
    let streamed = fields("subscribe");
    assert_eq!(streamed["status"], 200);
    assert_eq!(streamed["namespace"], "app");
    // The client left: the stream did not end by itself, and its event was sent.
    assert_eq!(streamed["complete"], false);
    assert!(
        streamed["bytes"].as_u64().unwrap() > body.len() as u64,
        "{streamed}"
    );
    assert!(
        streamed["duration_ms"].as_f64().unwrap() >= 400.0,
        "{streamed}"
    );
    let other = fields("other");
    assert_eq!(other["status"], 404);
    assert!(other.get("namespace").is_none(), "{other}");
}

#[test]
fn without_the_flag_nothing_is_access_logged() {
    let (_data, mut server, host) = access_logged_server(&[]);
    let answer = raw_request(
        &host,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        access_lines(&mut server, 0).is_empty(),
        "{:?}",
        server.errors
    );
}

#[test]
fn log_level_takes_per_module_filters_and_is_in_help() {
    let help = crate::common::cli::run(&["server", "--help"], None);
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("--log-level"), "{}", help.stdout);
    assert!(help.stdout.contains("BUS_LOG_LEVEL"), "{}", help.stdout);
    assert!(help.stdout.contains("--access-log"), "{}", help.stdout);

    // Warnings only, but the CLI's module at DEBUG and the access lines at INFO: the
    // start-up's INFO lines are gone, its DEBUG line from `bus::cli` is there.
    let data = tempfile::tempdir().unwrap();
    let host = format!("127.0.0.1:{}", free_port());
    let path = data.path().display().to_string();
    let mut server = Background::start(&[
        "server",
        "--log-level",
        "WARN,bus::cli=debug,bus::access=info",
        "--access-log",
        "--addr",
        &host,
        "--path",
        &path,
        "--namespaces",
        "app",
    ]);
    server.wait_for_stderr("open-file limit raised");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&host).is_err() {
        assert!(std::time::Instant::now() < deadline, "{:?}", server.errors);
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = raw_request(
        &host,
        "GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    server.wait_for_stderr("route=");
    assert!(
        !server.errors.iter().any(|line| line.contains("listening")),
        "{:?}",
        server.errors
    );
    drop(server);

    // The environment variable takes the same filters; a bad one is a usage error.
    let bad = crate::common::cli::run_with_env(
        &["server", "--namespaces", "app"],
        None,
        &[("BUS_LOG_LEVEL", "bus=loud")],
    );
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("loud"), "{}", bad.stderr);
}
