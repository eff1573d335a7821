//! Helpers for tests that talk to a real server over HTTP: start one on 127.0.0.1:0 in
//! this process, publish, and read Server-Sent Events the way a client does.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bus::config::ServerConfig;
use bus::server::RunningServer;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::jetstream::JetStreamServer;

/// A server on a fresh data directory (or a given one), listening on 127.0.0.1:0.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub url: String,
    pub client: reqwest::Client,
    /// The nats-server it stores its events in, when the tests run on JetStream.
    _nats: Option<Arc<JetStreamServer>>,
}

/// Which store the servers of the HTTP tests run on: `BUS_TEST_STORE=jetstream` runs them
/// on JetStream (`.ci/run` runs the HTTP tests on both); anything else, the file store.
pub fn on_jetstream() -> bool {
    std::env::var("BUS_TEST_STORE").as_deref() == Ok("jetstream")
}

/// For tests of what only the file store has (its files, its segments): true, after
/// saying so, when the tests run on JetStream, where the test has no meaning.
pub fn skip_unless_file_store() -> bool {
    if on_jetstream() {
        eprintln!("skipped: about the file store's files (run without BUS_TEST_STORE)");
    }
    on_jetstream()
}

/// The nats-server of a data directory, while a server of it lives: a test that restarts
/// its server (same directory) finds its events again.
fn nats_for(data: &std::path::Path) -> Arc<JetStreamServer> {
    static SERVERS: Mutex<Vec<(PathBuf, Weak<JetStreamServer>)>> = Mutex::new(Vec::new());
    let mut servers = SERVERS.lock().unwrap_or_else(|p| p.into_inner());
    servers.retain(|(_, server)| server.strong_count() > 0);
    if let Some(server) = servers
        .iter()
        .find(|(path, _)| path == data)
        .and_then(|(_, server)| server.upgrade())
    {
        return server;
    }
    let server = Arc::new(
        JetStreamServer::start().expect("BUS_TEST_STORE=jetstream needs nats-server 2.12 or later"),
    );
    servers.push((data.to_path_buf(), Arc::downgrade(&server)));
    server
}

impl TestServer {
    /// `args` are `bus server` flags; `--addr` defaults to `127.0.0.1:0` (a fixed
    /// address lets a restarted server be found again), `--namespaces` to `app,orders`.
    pub async fn start(data: &std::path::Path, args: &[&str]) -> TestServer {
        // Tests talk to it with reqwest, which needs a TLS provider installed.
        bus::client::install_tls_provider();
        let mut all = vec!["--path".to_owned(), data.display().to_string()];
        if !args.contains(&"--addr") {
            all.extend(["--addr".to_owned(), "127.0.0.1:0".to_owned()]);
        }
        if !args.contains(&"--namespaces") {
            all.extend(["--namespaces".to_owned(), "app,orders".to_owned()]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        let nats = (on_jetstream() && !args.contains(&"--store")).then(|| nats_for(data));
        if let Some(nats) = &nats {
            all.extend(["--store", "jetstream", "--nats-url"].map(String::from));
            all.push(nats.url());
        }
        let config = ServerConfig::from_args(all).expect("valid flags");
        let server = bus::server::start(&config).await.expect("server starts");
        let url = format!("http://{}/", server.local_addr());
        TestServer {
            server: Some(server),
            url,
            client: reqwest::Client::new(),
            _nats: nats,
        }
    }

    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("clean shutdown");
        }
    }

    /// `GET /consumers/{namespace}`: the durable consumers as listed; panics unless 200.
    pub async fn list_consumers(&self, namespace: &str) -> serde_json::Value {
        self.get_json(&format!("consumers/{namespace}")).await
    }

    /// `GET /{path}`'s JSON answer; panics unless it is 200 with JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /{path}: {e}"));
        let status = response.status();
        let body = response.text().await.expect("body");
        assert_eq!(status, 200, "GET /{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /{path}: {e}: {body}"))
    }

    /// POSTs a raw body.
    pub async fn post(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST")
    }

    /// Sends `method /?query` without a body and returns the response (for error checks).
    pub async fn request(&self, method: reqwest::Method, query: &str) -> reqwest::Response {
        self.client
            .request(method, format!("{}?{query}", self.url))
            .send()
            .await
            .expect("request")
    }

    /// Publishes a JSON value; panics unless it is accepted.
    pub async fn publish(&self, event: &Value) -> Published {
        self.accepted(event, self.post(event.to_string()).await)
            .await
    }

    /// Publishes a JSON value with a bearer token; panics unless it is accepted.
    pub async fn publish_with_token(&self, event: &Value, token: &str) -> Published {
        let response = self
            .client
            .post(&self.url)
            .bearer_auth(token)
            .body(event.to_string())
            .send()
            .await
            .expect("POST");
        self.accepted(event, response).await
    }

    async fn accepted(&self, event: &Value, response: reqwest::Response) -> Published {
        let status = response.status();
        let published = Published {
            id: header(&response, "x-bus-event-id"),
            created_at: header(&response, "x-bus-event-created-at"),
            index: header(&response, "x-bus-event-index")
                .parse()
                .unwrap_or(i64::MIN),
        };
        assert_eq!(
            status,
            202,
            "publish {event}: {}",
            response.text().await.unwrap()
        );
        published
    }

    /// Opens an event stream with this query string (without the leading `?`).
    pub async fn subscribe(&self, query: &str) -> Sse {
        self.subscribe_with(query, &[]).await
    }

    pub async fn subscribe_with(&self, query: &str, headers: &[(&str, &str)]) -> Sse {
        let mut request = self.client.get(format!("{}?{query}", self.url));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = tokio::time::timeout(Duration::from_secs(5), request.send())
            .await
            .expect("the response head arrives without waiting for events")
            .expect("GET");
        assert_eq!(response.status(), 200, "subscribe {query}");
        Sse::new(response)
    }

    /// Publishes `n` events to `subject` with payloads 0..n; returns their ids.
    pub async fn publish_numbered(&self, subject: &str, n: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            ids.push(
                self.publish(&json!({"subject": subject, "payload": i}))
                    .await
                    .id,
            );
        }
        ids
    }

    pub async fn ack(&self, consumer_id: &str, event_id: &str) -> reqwest::StatusCode {
        self.client
            .put(format!(
                "{}?consumer_id={consumer_id}&event_id={event_id}",
                self.url
            ))
            .send()
            .await
            .expect("PUT")
            .status()
    }

    /// `GET /metrics`: the Prometheus text; panics unless 200.
    pub async fn metrics(&self) -> String {
        let response = self
            .client
            .get(format!("{}metrics", self.url))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status(), 200);
        response.text().await.expect("metrics text")
    }
}

/// The value of the sample of family `name` whose labels include each of `labels`
/// (`namespace="app"`), whatever its other labels (`node`); `None` if there is none.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (series, value) = rest.rsplit_once(' ')?;
        if !(series.is_empty() || series.starts_with('{')) {
            return None; // another family whose name starts with `name`
        }
        labels
            .iter()
            .all(|label| series.contains(label))
            .then(|| value.parse().ok())?
    })
}

/// A response header as text ("" if absent).
pub fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[derive(Debug, Clone)]
pub struct Published {
    pub id: String,
    pub created_at: String,
    pub index: i64,
}

/// One SSE frame: its fields, or a comment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Vec<String>,
    pub comments: Vec<String>,
}

impl Frame {
    pub fn json(&self) -> Value {
        assert_eq!(self.data.len(), 1, "one data line per event: {self:?}");
        serde_json::from_str(&self.data[0]).expect("data is JSON")
    }
}

/// An open event stream, read frame by frame.
pub struct Sse {
    pub consumer_id: String,
    pub content_type: String,
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: Vec<u8>,
    /// Every byte received, for checks on the exact wire format.
    pub raw: Vec<u8>,
}

impl Sse {
    pub fn new(response: reqwest::Response) -> Sse {
        Sse {
            consumer_id: header(&response, "x-bus-consumer-id"),
            content_type: header(&response, "content-type"),
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            raw: Vec::new(),
        }
    }

    /// The next frame (events, errors and comments alike), or `None` when the stream
    /// ends or nothing arrives within `wait`.
    pub async fn next_frame(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = find(&self.buffer, b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return Some(parse_frame(&block[..end]));
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => {
                    self.raw.extend_from_slice(&chunk);
                    self.buffer.extend_from_slice(&chunk);
                }
                Ok(Some(Err(_))) | Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next event or error frame, skipping comments (pings).
    pub async fn next(&mut self, wait: Duration) -> Option<Frame> {
        loop {
            let frame = self.next_frame(wait).await?;
            if frame.event.is_some() || !frame.data.is_empty() {
                return Some(frame);
            }
        }
    }

    /// The next `n` events; panics if one does not come within 10 s.
    pub async fn take(&mut self, n: usize) -> Vec<Frame> {
        let mut frames = Vec::with_capacity(n);
        for i in 0..n {
            let frame = self
                .next(Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("event {i} of {n} did not arrive"));
            assert_eq!(frame.event.as_deref(), Some("msg"), "{frame:?}");
            frames.push(frame);
        }
        frames
    }

    /// Asserts that the stream ends (the server closes it) within `wait`, with no frame
    /// before the end.
    pub async fn expect_end(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if !self.buffer.is_empty() {
                panic!(
                    "unexpected bytes before the end: {:?}",
                    String::from_utf8_lossy(&self.buffer)
                );
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => {
                    self.raw.extend_from_slice(&chunk);
                    self.buffer.extend_from_slice(&chunk);
                }
                Ok(Some(Err(_))) | Ok(None) => return,
                Err(_) => panic!("the stream is still open after {wait:?}"),
            }
        }
    }

    /// Asserts that no event arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(frame) = self.next(wait).await {
            panic!("unexpected frame {frame:?}");
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_frame(block: &[u8]) -> Frame {
    let text = std::str::from_utf8(block).expect("SSE is UTF-8");
    let mut frame = Frame::default();
    for line in text.split('\n') {
        if let Some(comment) = line.strip_prefix(':') {
            frame.comments.push(comment.trim_start().to_owned());
        } else if let Some(id) = line.strip_prefix("id: ") {
            frame.id = Some(id.to_owned());
        } else if let Some(event) = line.strip_prefix("event: ") {
            frame.event = Some(event.to_owned());
        } else if let Some(data) = line.strip_prefix("data: ") {
            frame.data.push(data.to_owned());
        } else {
            panic!("unexpected SSE line {line:?}");
        }
    }
    frame
}
