//! `bus bench publish|fanout|replay|resume|ack|reply|idle|durable-acks|durable-catchup`:
//! end-to-end measurements over HTTP,
//! against a running server (`--host`) or one started for the run (`--embedded`: a
//! `bus server` child process on a temporary directory, so that its CPU and memory are its
//! own and not the load generator's).
//!
//! Every run checks what it measures: publishes must be acknowledged with 202, deliveries
//! are counted for missing, duplicate and out-of-order events, replays must return every
//! event in order. A figure is only printed for correct work.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::bench::percentile;

/// Where the server under test is.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The server to measure.
    #[arg(long, env = "BUS_HOST", default_value = crate::client::DEFAULT_HOST)]
    pub host: String,
    /// Start a server for the run instead (`bus server` on a temporary directory).
    #[arg(long)]
    pub embedded: bool,
    /// With --embedded: the server's fsync policy.
    #[arg(long, default_value = "always")]
    pub fsync: String,
    /// With --embedded: extra `bus server` flags, e.g. "--secret-key k".
    #[arg(long, default_value = "")]
    pub server_args: String,
    /// The namespace to use (the server must declare it; --embedded does).
    #[arg(long, default_value = "bench")]
    pub namespace: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A server started for a run; stopped when dropped.
struct Embedded {
    child: Child,
    dir: PathBuf,
    /// The server's log lines with its statistics, written as it shuts down.
    statistics: Arc<std::sync::Mutex<Vec<String>>>,
    /// Drains the server's standard error.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Embedded {
    /// Stops the server (SIGTERM, as an operator would) and waits for it to exit.
    fn stop(&mut self) {
        // Once reaped, its process id may be another process's: signal it only while it
        // has not been (`try_wait` answers from what `wait` kept, without a system call).
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill only sends a signal to the child we started.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
            let _ = self.child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server under test: its address, and its process id when known (for memory).
struct Server {
    host: String,
    pid: Option<u32>,
    _embedded: Option<Embedded>,
}

impl Server {
    /// Stops an embedded server; the reads it made from its segment files (rather than
    /// its in-memory tail) in `namespace`, from the statistics it logs as it stops.
    fn stop(mut self, namespace: &str) -> Option<u64> {
        let embedded = self._embedded.as_mut()?;
        embedded.stop();
        let lines = embedded
            .statistics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let wanted = format!("namespace=\"{namespace}\"");
        let wanted_plain = format!("namespace={namespace} ");
        lines
            .iter()
            .find(|line| line.contains(&wanted) || line.contains(&wanted_plain))
            .and_then(|line| number_after(line.as_bytes(), b"disk_reads="))
    }
}

impl Target {
    async fn start(&self) -> anyhow::Result<Server> {
        self.start_with(&[]).await
    }

    /// Starts the server, embedded with `extra` flags before the user's.
    async fn start_with(&self, extra: &[&str]) -> anyhow::Result<Server> {
        if !self.embedded {
            return Ok(Server {
                host: self.host.clone(),
                pid: None,
                _embedded: None,
            });
        }
        let dir = std::env::temp_dir().join(format!("bus-bench-server-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let exe = std::env::current_exe().context("finding the bus binary")?;
        let mut command = Command::new(exe);
        command
            .args(["server", "--addr", "127.0.0.1:0", "--namespaces"])
            .arg(&self.namespace)
            .args(["--fsync", &self.fsync, "--path"])
            .arg(&dir)
            .args(extra)
            .args(self.server_args.split_whitespace())
            // The listening line is logged at INFO; the reader below drains the rest.
            .env("BUS_LOG_LEVEL", "INFO")
            .env("BUS_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting bus server")?;
        let stderr = child.stderr.take().context("server stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let statistics = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = Arc::clone(&statistics);
        let reader = std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("namespace statistics") {
                    kept.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                    continue;
                }
                if !sent {
                    if let Some(addr) = line
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix("addr="))
                    {
                        let _ = tx.send(addr.to_owned());
                        sent = true;
                    }
                }
            }
        });
        let pid = child.id();
        let embedded = Embedded {
            child,
            dir,
            statistics,
            reader: Some(reader),
        };
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await?
            .context("the embedded server did not start")?;
        Ok(Server {
            host: format!("http://{addr}"),
            pid: Some(pid),
            _embedded: Some(embedded),
        })
    }
}

fn subject(target: &Target, rest: &str) -> String {
    format!("{}.{rest}", target.namespace)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(target: &Target, name: &str, fields: serde_json::Value) {
    if target.json {
        let mut object = json!({ "bench": name });
        if let (Some(out), Some(fields)) = (object.as_object_mut(), fields.as_object()) {
            out.extend(fields.clone());
        }
        println!("{object}");
        return;
    }
    println!("bus bench {name}");
    if let Some(fields) = fields.as_object() {
        for (key, value) in fields {
            let text = match value {
                serde_json::Value::Number(n) if n.is_f64() => {
                    format!("{:.3}", n.as_f64().unwrap_or_default())
                }
                other => other.to_string(),
            };
            println!("  {key:<24} {text}");
        }
    }
}

/// One keep-alive HTTP/1.1 connection that sends publishes and acks and expects `202`
/// answers. Written by hand so that the load generator costs little of the CPU it shares
/// with the server.
struct Poster {
    stream: TcpStream,
    authority: String,
    buf: Vec<u8>,
}

impl Poster {
    async fn connect(host: &str) -> anyhow::Result<Poster> {
        let authority = host
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let stream = TcpStream::connect(&authority)
            .await
            .with_context(|| format!("connecting to {authority}"))?;
        stream.set_nodelay(true)?;
        Ok(Poster {
            stream,
            authority,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Publishes `body`; returns the answer's head, lowercased.
    async fn post(&mut self, body: &[u8]) -> anyhow::Result<String> {
        self.call("POST", "/", body, "202").await
    }

    /// Acknowledges an event.
    async fn ack(&mut self, consumer_id: &str, event_id: &str) -> anyhow::Result<String> {
        let target = format!("/?consumer_id={consumer_id}&event_id={event_id}");
        self.call("PUT", &target, b"", "202").await
    }

    /// Sends one request and reads its answer, which must have status `expect`; returns
    /// the answer's head, lowercased.
    async fn call(
        &mut self,
        method: &str,
        target: &str,
        body: &[u8],
        expect: &str,
    ) -> anyhow::Result<String> {
        let mut request = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.authority,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        self.send(&request, expect).await
    }

    async fn send(&mut self, request: &[u8], expect: &str) -> anyhow::Result<String> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        let mut chunk = [0u8; 2048];
        loop {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
            let Some(end) = find(&self.buf, b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
            if !head.starts_with(&format!("http/1.1 {expect}")) {
                bail!(
                    "the server answered {}",
                    head.lines().next().unwrap_or_default()
                );
            }
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut have = self.buf.len() - end - 4;
            while have < length {
                let n = self.stream.read(&mut chunk).await?;
                if n == 0 {
                    bail!("the server closed the connection");
                }
                have += n;
            }
            return Ok(head);
        }
    }
}

/// Opens a manual-ack subscription at `url`; its consumer id and its (streaming) answer.
async fn subscribe_manual(url: &str) -> anyhow::Result<(String, reqwest::Response)> {
    let response = reqwest::get(url).await?;
    if response.status() != 200 {
        bail!("subscribe answered {}", response.status());
    }
    let consumer_id = response
        .headers()
        .get("x-bus-consumer-id")
        .and_then(|v| v.to_str().ok())
        .context("no consumer id")?
        .to_owned();
    Ok((consumer_id, response))
}

/// Removes the complete SSE frames from `pending` and returns the ids of the events
/// among them.
fn take_event_ids(pending: &mut Vec<u8>) -> Vec<String> {
    let mut ids = Vec::new();
    // One pass, and one drain at the end: draining frame by frame moves the rest of a
    // large chunk once per frame.
    let mut start = 0;
    while let Some(end) = find(&pending[start..], b"\n\n") {
        let frame = &pending[start..start + end];
        if let Some(id) = frame
            .split(|&b| b == b'\n')
            .find_map(|line| line.strip_prefix(b"id: "))
        {
            ids.push(String::from_utf8_lossy(id).into_owned());
        }
        start += end + 2;
    }
    pending.drain(..start);
    ids
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A JSON event body with a payload of about `size` bytes that carries `sent` (ns).
fn event_body(subject: &str, size: usize, sent: u64) -> String {
    let fill = "x".repeat(size.saturating_sub(40));
    format!(r#"{{"subject":"{subject}","payload":{{"sent":{sent},"fill":"{fill}"}}}}"#)
}

#[derive(Debug, Args)]
pub struct PublishBench {
    #[command(flatten)]
    pub target: Target,
    /// Keep-alive connections, each publishing as fast as its answers come.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Events in all.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Events per request (1: one event object; more: a JSON array).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
}

pub async fn publish(args: PublishBench) -> anyhow::Result<()> {
    if args.connections == 0 || args.batch == 0 {
        bail!("--connections and --batch must be at least 1");
    }
    let server = args.target.start().await?;
    let subject = subject(&args.target, "publish");
    let requests = args.events.div_ceil(args.batch as u64);
    let per_connection = requests.div_ceil(args.connections as u64);
    let body = if args.batch == 1 {
        event_body(&subject, args.payload, 0)
    } else {
        let one = event_body(&subject, args.payload, 0);
        format!("[{}]", vec![one; args.batch].join(","))
    };
    let body = Arc::new(body.into_bytes());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let body = Arc::clone(&body);
        let host = server.host.clone();
        tasks.push(tokio::spawn(async move {
            let mut poster = Poster::connect(&host).await?;
            let mut latencies = Vec::with_capacity(per_connection as usize);
            for _ in 0..per_connection {
                let sent = Instant::now();
                poster.post(&body).await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let events = latencies.len() as u64 * args.batch as u64;
    report(
        &args.target,
        "publish",
        json!({
            "connections": args.connections,
            "batch": args.batch,
            "payload_bytes": args.payload,
            "events": events,
            "seconds": elapsed.as_secs_f64(),
            "events_per_sec": events as f64 / elapsed.as_secs_f64(),
            "requests_per_sec": latencies.len() as f64 / elapsed.as_secs_f64(),
            "latency_p50_ms": ms(percentile(&latencies, 0.50)),
            "latency_p99_ms": ms(percentile(&latencies, 0.99)),
            "latency_p999_ms": ms(percentile(&latencies, 0.999)),
        }),
    );
    Ok(())
}

/// Stores `count` events on `subject` in batches of 1000 (setting up replay and resume).
async fn fill(host: &str, subject: &str, count: u64, payload: usize) -> anyhow::Result<()> {
    let mut poster = Poster::connect(host).await?;
    let mut left = count;
    while left > 0 {
        let n = left.min(1000) as usize;
        let one = event_body(subject, payload, 0);
        let body = format!("[{}]", vec![one; n].join(","));
        poster.post(body.as_bytes()).await?;
        left -= n as u64;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ReplayBench {
    #[command(flatten)]
    pub target: Target,
    /// Events to store and then read back from the oldest.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
}

pub async fn replay(args: ReplayBench) -> anyhow::Result<()> {
    let server = args.target.start().await?;
    let subject = subject(&args.target, "replay");
    fill(&server.host, &subject, args.events, args.payload).await?;
    let url = format!(
        "{}/?subject={subject}&start=oldest&until=now",
        server.host.trim_end_matches('/')
    );
    let started = Instant::now();
    let response = reqwest::get(&url).await?;
    if response.status() != 200 {
        bail!("subscribe answered {}", response.status());
    }
    let mut body = response.bytes_stream();
    let (mut frames, mut bytes, mut tail) = (0u64, 0u64, Vec::new());
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        // Count frame ends; a terminator may straddle two chunks.
        tail.extend_from_slice(&chunk);
        frames += tail.windows(2).filter(|w| w == b"\n\n").count() as u64;
        let keep = tail.len().min(1);
        tail.drain(..tail.len() - keep);
    }
    let elapsed = started.elapsed();
    // Every event, then the `done` frame.
    let events = frames.saturating_sub(1);
    if events < args.events {
        bail!("replay returned {events} of {} events", args.events);
    }
    report(
        &args.target,
        "replay",
        json!({
            "events": events,
            "seconds": elapsed.as_secs_f64(),
            "events_per_sec": events as f64 / elapsed.as_secs_f64(),
            "mb_per_sec": bytes as f64 / elapsed.as_secs_f64() / 1e6,
        }),
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ResumeBench {
    #[command(flatten)]
    pub target: Target,
    /// Events in the namespace before resuming.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
    /// Measurements of each kind (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
}

pub async fn resume(args: ResumeBench) -> anyhow::Result<()> {
    let server = args.target.start().await?;
    let subject = subject(&args.target, "resume");
    let base = server.host.trim_end_matches('/').to_owned();
    let http = reqwest::Client::new();
    // Resume from an event in the middle of the log: its id comes from its publish.
    let half = args.events / 2;
    fill(&server.host, &subject, half, 64).await?;
    let head = Poster::connect(&server.host)
        .await?
        .post(event_body(&subject, 64, 0).as_bytes())
        .await?;
    let middle_id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-bus-event-id:"))
        .map(|v| v.trim().to_owned())
        .context("the publish answer has no event id")?;
    fill(&server.host, &subject, args.events - half, 64).await?;
    let mut by_kind = Vec::new();
    for kind in ["start=<id>", "Last-Event-ID", "start=newest"] {
        let mut times = Vec::with_capacity(args.rounds);
        for _ in 0..args.rounds {
            let started = Instant::now();
            let request = match kind {
                "start=<id>" => http.get(format!("{base}/?subject={subject}&start={middle_id}")),
                "Last-Event-ID" => http
                    .get(format!("{base}/?subject={subject}&start=oldest"))
                    .header("Last-Event-ID", &middle_id),
                _ => http.get(format!("{base}/?subject={subject}&start=newest")),
            };
            let response = request.send().await?;
            if kind == "start=newest" {
                // Nothing to deliver yet: the subscription is live once it answers, and
                // the next event published reaches it.
                let mut body = response.bytes_stream();
                let mut poster = Poster::connect(&server.host).await?;
                poster.post(event_body(&subject, 64, 0).as_bytes()).await?;
                let _ = body.next().await;
            } else {
                let mut body = response.bytes_stream();
                let _ = body.next().await.context("no event came")??;
            }
            times.push(started.elapsed());
        }
        times.sort_unstable();
        by_kind.push((kind, percentile(&times, 0.5), percentile(&times, 1.0)));
    }
    let mut fields = serde_json::Map::new();
    fields.insert("events_in_namespace".into(), json!(args.events + 1));
    fields.insert("resumed_after_position".into(), json!(half));
    for (kind, median, max) in by_kind {
        fields.insert(format!("{kind} first event median ms"), json!(ms(median)));
        fields.insert(format!("{kind} first event max ms"), json!(ms(max)));
    }
    report(&args.target, "resume", serde_json::Value::Object(fields));
    Ok(())
}

#[derive(Debug, Args)]
pub struct FanoutBench {
    #[command(flatten)]
    pub target: Target,
    /// Subscribers on the subject.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Publishing connections.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Events in all.
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    /// Events per second from all publishers together (0: as fast as they can).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Events per publish request (a batch when more than 1).
    #[arg(long, default_value_t = 1)]
    pub batch: u64,
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
}

pub async fn fanout(args: FanoutBench) -> anyhow::Result<()> {
    crate::cli::server::raise_open_file_limit();
    let server = args.target.start().await?;
    let subject = subject(&args.target, "fanout");
    let url = format!("{}/?subject={subject}", server.host.trim_end_matches('/'));
    let http = reqwest::Client::new();
    let mut subscribers = Vec::new();
    for _ in 0..args.subscribers {
        let response = http.get(&url).send().await?;
        if response.status() != 200 {
            bail!("subscribe answered {}", response.status());
        }
        let mut body = response.bytes_stream();
        let events = args.events;
        subscribers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(events as usize);
            let (mut received, mut duplicates, mut out_of_order) = (0u64, 0u64, 0u64);
            let mut last_index = -1i64;
            let mut pending = Vec::new();
            while received < events {
                let chunk = match tokio::time::timeout(Duration::from_secs(10), body.next()).await {
                    Ok(Some(chunk)) => chunk?,
                    Ok(None) | Err(_) => break,
                };
                let now = now_nanos();
                // The load generator shares the machine: scan, do not parse.
                scan_data_lines(&mut pending, &chunk, |index, sent| {
                    if index == last_index {
                        duplicates += 1;
                        return;
                    }
                    if index < last_index {
                        out_of_order += 1;
                    }
                    last_index = index;
                    received += 1;
                    latencies.push(Duration::from_nanos(now.saturating_sub(sent)));
                });
            }
            anyhow::Ok((received, duplicates, out_of_order, latencies))
        }));
    }
    let published = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let batch = args.batch.max(1);
    let per_publisher = args.events.div_ceil(args.publishers as u64 * batch);
    let interval = (args.rate > 0)
        .then(|| Duration::from_secs_f64(args.publishers as f64 * batch as f64 / args.rate as f64));
    let mut publishers = Vec::new();
    for p in 0..args.publishers as u64 {
        let host = server.host.clone();
        let subject = subject.clone();
        let published = Arc::clone(&published);
        let total = args.events;
        let payload = args.payload;
        publishers.push(tokio::spawn(async move {
            let mut poster = Poster::connect(&host).await?;
            let mut next = Instant::now();
            for i in 0..per_publisher {
                let first = (p * per_publisher + i) * batch;
                if first >= total {
                    break;
                }
                let n = batch.min(total - first) as usize;
                if let Some(every) = interval {
                    next += every;
                    tokio::time::sleep_until(next.into()).await;
                }
                let one = event_body(&subject, payload, now_nanos());
                let body = if n == 1 {
                    one
                } else {
                    format!("[{}]", vec![one; n].join(","))
                };
                poster.post(body.as_bytes()).await?;
                published.fetch_add(n as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for publisher in publishers {
        publisher.await??;
    }
    let published = published.load(Ordering::Relaxed);
    let (mut delivered, mut duplicates, mut out_of_order, mut missing) = (0u64, 0, 0, 0);
    let mut latencies = Vec::new();
    for subscriber in subscribers {
        let (received, dup, ooo, lat) = subscriber.await??;
        delivered += received;
        duplicates += dup;
        out_of_order += ooo;
        missing += published.saturating_sub(received);
        latencies.extend(lat);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    report(
        &args.target,
        "fanout",
        json!({
            "subscribers": args.subscribers,
            "publishers": args.publishers,
            "batch": batch,
            "rate": args.rate,
            "published": published,
            "deliveries": delivered,
            "seconds": elapsed.as_secs_f64(),
            "deliveries_per_sec": delivered as f64 / elapsed.as_secs_f64(),
            "latency_p50_ms": ms(percentile(&latencies, 0.50)),
            "latency_p99_ms": ms(percentile(&latencies, 0.99)),
            "latency_p999_ms": ms(percentile(&latencies, 0.999)),
            "missing": missing,
            "duplicates": duplicates,
            "out_of_order": out_of_order,
        }),
    );
    if missing + duplicates + out_of_order > 0 {
        bail!("deliveries were wrong: {missing} missing, {duplicates} duplicates, {out_of_order} out of order");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct AckBench {
    #[command(flatten)]
    pub target: Target,
    /// Events to store and then consume with manual acks.
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    /// Unacknowledged events the server may have out at once (`max_inflight`); 1 is the
    /// reference's stop-and-wait. The consumer acks what it has received in one request.
    #[arg(long, default_value_t = 1)]
    pub window: usize,
}

pub async fn ack(args: AckBench) -> anyhow::Result<()> {
    let server = args.target.start().await?;
    let subject = subject(&args.target, "ack");
    fill(&server.host, &subject, args.events, 64).await?;
    let url = format!(
        "{}/?subject={subject}&start=oldest&ack=manual&redelivery=30s&max_inflight={}",
        server.host.trim_end_matches('/'),
        args.window
    );
    let (consumer_id, response) = subscribe_manual(&url).await?;
    let mut body = response.bytes_stream();
    let mut acker = Poster::connect(&server.host).await?;
    let started = Instant::now();
    let mut acked = 0u64;
    let mut pending = Vec::new();
    while acked < args.events {
        let chunk = body.next().await.context("the stream ended")??;
        pending.extend_from_slice(&chunk);
        // Everything received so far is acked in one request (with a window of 1, that
        // is one event: stop-and-wait).
        let ids = take_event_ids(&mut pending);
        if !ids.is_empty() {
            acker.ack(&consumer_id, &ids.join(",")).await?;
            acked += ids.len() as u64;
        }
    }
    let elapsed = started.elapsed();
    report(
        &args.target,
        "ack",
        json!({
            "events": acked,
            "window": args.window,
            "seconds": elapsed.as_secs_f64(),
            "acked_events_per_sec": acked as f64 / elapsed.as_secs_f64(),
        }),
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ReplyBench {
    #[command(flatten)]
    pub target: Target,
    /// Request/reply round trips, one after the other.
    #[arg(long, default_value_t = 5_000)]
    pub requests: u64,
}

/// Round trips of `POST /?reply=1` answered by a worker that replies in its ack (`PUT` with
/// the reply as body), one request at a time.
pub async fn reply(args: ReplyBench) -> anyhow::Result<()> {
    let server = args.target.start().await?;
    let subject = subject(&args.target, "reply");
    let host = server.host.trim_end_matches('/').to_owned();
    let (consumer_id, response) = subscribe_manual(&format!(
        "{host}/?subject={subject}&ack=manual&redelivery=30s"
    ))
    .await?;
    let mut replier = Poster::connect(&host).await?;
    let worker = tokio::spawn(async move {
        let mut body = response.bytes_stream();
        let mut pending = Vec::new();
        while let Some(chunk) = body.next().await {
            pending.extend_from_slice(&chunk?);
            for id in take_event_ids(&mut pending) {
                let target = format!("/?consumer_id={consumer_id}&event_id={id}");
                replier
                    .call("PUT", &target, b"{\"ok\":true}", "202")
                    .await?;
            }
        }
        anyhow::Ok(())
    });
    let mut requester = Poster::connect(&host).await?;
    let request = format!(r#"{{"subject":"{subject}","payload":{{"question":1}}}}"#);
    let mut latencies = Vec::with_capacity(args.requests as usize);
    let started = Instant::now();
    for _ in 0..args.requests {
        let sent = Instant::now();
        requester
            .call("POST", "/?reply=1&timeout=5s", request.as_bytes(), "200")
            .await?;
        latencies.push(sent.elapsed());
    }
    let elapsed = started.elapsed();
    worker.abort();
    latencies.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    report(
        &args.target,
        "reply",
        json!({
            "requests": args.requests,
            "seconds": elapsed.as_secs_f64(),
            "round_trips_per_sec": args.requests as f64 / elapsed.as_secs_f64(),
            "latency_p50_ms": ms(percentile(&latencies, 0.50)),
            "latency_p99_ms": ms(percentile(&latencies, 0.99)),
            "latency_p999_ms": ms(percentile(&latencies, 0.999)),
        }),
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct IdleBench {
    #[command(flatten)]
    pub target: Target,
    /// Idle subscriptions to hold open.
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// The server's process id, to read its memory (known with --embedded).
    #[arg(long)]
    pub pid: Option<u32>,
}

pub async fn idle(args: IdleBench) -> anyhow::Result<()> {
    crate::cli::server::raise_open_file_limit();
    // The server notices a closed idle stream when it next writes to it: pings every
    // second let the memory measured after closing be that of a server without them.
    let server = args.target.start_with(&["--ping-interval", "1s"]).await?;
    let pid = args.pid.or(server.pid);
    let rss = || pid.and_then(resident_kib);
    let before = rss();
    let subject = subject(&args.target, "idle");
    let authority = server
        .host
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    // Raw connections: a subscription costs this process a socket and a few bytes.
    let request = format!(
        "GET /?subject={subject} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/event-stream\r\n\r\n"
    );
    let mut streams = Vec::with_capacity(args.subscribers);
    let started = Instant::now();
    for _ in 0..args.subscribers {
        let mut stream = TcpStream::connect(&authority).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 512];
        let n = stream.read(&mut head).await?;
        if !head[..n].starts_with(b"HTTP/1.1 200") {
            bail!(
                "subscribe answered {}",
                String::from_utf8_lossy(&head[..n.min(40)])
            );
        }
        streams.push(stream);
    }
    let opened = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = rss();
    drop(streams);
    // The server trims freed memory every 5 s after many streams closed.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = rss();
    let mib = |kib: Option<u64>| kib.map(|k| k as f64 / 1024.0);
    report(
        &args.target,
        "idle",
        json!({
            "subscriptions": args.subscribers,
            "open_seconds": opened.as_secs_f64(),
            "server_rss_before_mib": mib(before),
            "server_rss_open_mib": mib(during),
            "server_rss_after_close_mib": mib(after),
            "kib_per_subscription": match (before, during) {
                (Some(b), Some(d)) => Some(d.saturating_sub(b) as f64 / args.subscribers as f64),
                _ => None,
            },
        }),
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct DurableAcksBench {
    #[command(flatten)]
    pub target: Target,
    /// Durable consumers acking while the publishers run (0: the publishers alone).
    #[arg(long, default_value_t = 200)]
    pub consumers: usize,
    /// Events stored before the run for the consumers to work through (each consumer
    /// reads all of them; enough that none runs dry while the publishers run).
    #[arg(long, default_value_t = 20_000)]
    pub backlog: u64,
    /// Each consumer's window (`max_inflight`).
    #[arg(long, default_value_t = 100)]
    pub window: usize,
    /// Pause between a consumer's acks, in milliseconds (0: each acks what it has
    /// received as soon as its previous ack is answered).
    #[arg(long, default_value_t = 0)]
    pub ack_interval_ms: u64,
    /// How long the publishers run, in seconds (a time, not a count: with the consumers
    /// taking most of the CPU, a count would take minutes).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Keep-alive connections publishing single events, each as fast as its answers come.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// How long the consumers ack before the publishers start, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub warmup_ms: u64,
}

/// Single-event publish latency while durable consumers ack: every consumer's progress
/// changes all the time, so each one stores it every 50 ms (a write, two fsyncs and a
/// rename) while the publishers run.
pub async fn durable_acks(args: DurableAcksBench) -> anyhow::Result<()> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    crate::cli::server::raise_open_file_limit();
    let server = args.target.start().await?;
    let host = server.host.trim_end_matches('/').to_owned();
    let acks_subject = subject(&args.target, "acks");
    if args.consumers > 0 {
        fill(&host, &acks_subject, args.backlog, 64).await?;
    }
    let http = reqwest::Client::new();
    let acked = Arc::new(AtomicU64::new(0));
    let dry = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::with_capacity(args.consumers);
    for i in 0..args.consumers {
        let url = format!(
            "{host}/?subject={acks_subject}&start=oldest&ack=manual&consumer=acker-{i}&max_inflight={}&redelivery=60s",
            args.window
        );
        let response = http.get(&url).send().await?;
        if response.status() != 200 {
            bail!("subscribe answered {}", response.status());
        }
        let consumer_id = response
            .headers()
            .get("x-bus-consumer-id")
            .and_then(|v| v.to_str().ok())
            .context("no consumer id")?
            .to_owned();
        let mut acker = Poster::connect(&host).await?;
        let (acked, dry) = (Arc::clone(&acked), Arc::clone(&dry));
        let (backlog, pause) = (args.backlog, Duration::from_millis(args.ack_interval_ms));
        consumers.push(tokio::spawn(async move {
            let mut body = response.bytes_stream();
            let (mut pending, mut mine) = (Vec::new(), 0u64);
            while let Some(chunk) = body.next().await {
                pending.extend_from_slice(&chunk?);
                let ids = take_event_ids(&mut pending);
                if ids.is_empty() {
                    continue;
                }
                acker.ack(&consumer_id, &ids.join(",")).await?;
                acked.fetch_add(ids.len() as u64, Ordering::Relaxed);
                mine += ids.len() as u64;
                if mine >= backlog {
                    dry.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(args.warmup_ms)).await;

    let subject = subject(&args.target, "publish");
    let body = Arc::new(event_body(&subject, args.payload, 0).into_bytes());
    let acked_before = acked.load(Ordering::Relaxed);
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let body = Arc::clone(&body);
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let mut poster = Poster::connect(&host).await?;
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let sent = Instant::now();
                poster.post(&body).await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let acks = acked.load(Ordering::Relaxed) - acked_before;
    let dry = dry.load(Ordering::Relaxed);
    for consumer in consumers {
        if consumer.is_finished() {
            // It ran dry (reported below) or failed.
            consumer.await??;
        } else {
            consumer.abort();
        }
    }
    latencies.sort_unstable();
    report(
        &args.target,
        "durable-acks",
        json!({
            "consumers": args.consumers,
            "window": args.window,
            "ack_interval_ms": args.ack_interval_ms,
            "connections": args.connections,
            "events": latencies.len(),
            "seconds": elapsed.as_secs_f64(),
            "events_per_sec": latencies.len() as f64 / elapsed.as_secs_f64(),
            "latency_p50_ms": ms(percentile(&latencies, 0.50)),
            "latency_p99_ms": ms(percentile(&latencies, 0.99)),
            "latency_p999_ms": ms(percentile(&latencies, 0.999)),
            "acks_while_publishing": acks,
            "acks_per_sec": acks as f64 / elapsed.as_secs_f64(),
            "consumers_run_dry": dry,
        }),
    );
    if dry > 0 {
        bail!("{dry} consumers ran out of events: give a larger --backlog");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct DurableCatchupBench {
    #[command(flatten)]
    pub target: Target,
    /// Events in the namespace. For the reads to go to the segment files, their frames
    /// must take more than the server's in-memory tail (`--tail-size`, 16 MiB by
    /// default): 1,000,000 events of 128-byte payloads take ~250 MB.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// The durable consumer's window (`max_inflight`).
    #[arg(long, default_value_t = 100)]
    pub window: usize,
}

/// A durable consumer catching up a whole log while acking everything, against a replay
/// (`start=oldest`, no acks) of the same log. With --embedded, each runs on a server of
/// its own, filled the same way, so that the disk reads each server reports at shutdown
/// are that reader's.
pub async fn durable_catchup(args: DurableCatchupBench) -> anyhow::Result<()> {
    let subject = subject(&args.target, "catchup");
    let mut fields = serde_json::Map::new();
    fields.insert("events".into(), json!(args.events));
    fields.insert("window".into(), json!(args.window));
    let mut rates = Vec::new();
    for reader in ["replay", "durable_consumer"] {
        let server = args.target.start().await?;
        let host = server.host.trim_end_matches('/').to_owned();
        fill(&host, &subject, args.events, args.payload).await?;
        let started = Instant::now();
        let read = if reader == "replay" {
            replay_all(&host, &subject).await?
        } else {
            let (acked, requests) = catch_up(&host, &subject, args.window, args.events).await?;
            fields.insert("ack_requests".into(), json!(requests));
            acked
        };
        let elapsed = started.elapsed();
        if read < args.events {
            bail!("{reader} read {read} of {} events", args.events);
        }
        let rate = read as f64 / elapsed.as_secs_f64();
        rates.push(rate);
        fields.insert(format!("{reader}_seconds"), json!(elapsed.as_secs_f64()));
        fields.insert(format!("{reader}_events_per_sec"), json!(rate));
        if let Some(reads) = server.stop(&args.target.namespace) {
            fields.insert(format!("{reader}_disk_reads"), json!(reads));
        }
    }
    fields.insert("replay_over_consumer".into(), json!(rates[0] / rates[1]));
    report(
        &args.target,
        "durable-catchup",
        serde_json::Value::Object(fields),
    );
    Ok(())
}

/// Reads `subject` from the oldest event to the end (`until=now`); the events read.
async fn replay_all(host: &str, subject: &str) -> anyhow::Result<u64> {
    let response =
        reqwest::get(format!("{host}/?subject={subject}&start=oldest&until=now")).await?;
    if response.status() != 200 {
        bail!("subscribe answered {}", response.status());
    }
    let mut body = response.bytes_stream();
    let (mut frames, mut tail) = (0u64, Vec::new());
    while let Some(chunk) = body.next().await {
        tail.extend_from_slice(&chunk?);
        frames += tail.windows(2).filter(|w| w == b"\n\n").count() as u64;
        let keep = tail.len().min(1);
        tail.drain(..tail.len() - keep);
    }
    // Every event, then the `done` frame.
    Ok(frames.saturating_sub(1))
}

/// A new durable consumer reads `subject` from the oldest event and acks every event,
/// until `events` are acked; the events acked and the ack requests. Acks are pipelined:
/// the stream is read on while the previous ack is on its way, and each ack carries every
/// event received since.
async fn catch_up(
    host: &str,
    subject: &str,
    window: usize,
    events: u64,
) -> anyhow::Result<(u64, u64)> {
    let (consumer_id, response) = subscribe_manual(&format!(
        "{host}/?subject={subject}&start=oldest&ack=manual&consumer=catchup&max_inflight={window}&redelivery=60s"
    ))
    .await?;
    let (ids_tx, mut ids_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
    let mut acker = Poster::connect(host).await?;
    let acking = tokio::spawn(async move {
        let (mut acked, mut requests) = (0u64, 0u64);
        while let Some(mut ids) = ids_rx.recv().await {
            // Everything received meanwhile goes in the same request (an ack's line is
            // limited, hence at most 500 ids).
            while ids.len() < 500 {
                match ids_rx.try_recv() {
                    Ok(more) => ids.extend(more),
                    Err(_) => break,
                }
            }
            acker.ack(&consumer_id, &ids.join(",")).await?;
            acked += ids.len() as u64;
            requests += 1;
            if acked >= events {
                break;
            }
        }
        anyhow::Ok((acked, requests))
    });
    let mut body = response.bytes_stream();
    let (mut pending, mut received) = (Vec::new(), 0u64);
    while received < events {
        let Some(chunk) = body.next().await else {
            bail!("the stream ended after {received} events");
        };
        pending.extend_from_slice(&chunk?);
        let ids = take_event_ids(&mut pending);
        received += ids.len() as u64;
        if !ids.is_empty() && ids_tx.send(ids).is_err() {
            break;
        }
    }
    drop(ids_tx);
    acking.await?
}

/// A process's resident memory in KiB, from /proc.
fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Feeds `chunk` of an event stream; calls `on_event(index, sent)` for each complete
/// `data:` line (the event's `index` and its payload's `sent` time).
fn scan_data_lines(pending: &mut Vec<u8>, chunk: &[u8], mut on_event: impl FnMut(i64, u64)) {
    pending.extend_from_slice(chunk);
    let mut start = 0;
    while let Some(end) = pending[start..].iter().position(|&b| b == b'\n') {
        let line = &pending[start..start + end];
        if let Some(json) = line.strip_prefix(b"data: ") {
            let index = number_after(json, b"\"index\":").unwrap_or(0) as i64;
            let sent = number_after(json, b"\"sent\":").unwrap_or_else(now_nanos);
            on_event(index, sent);
        }
        start += end + 1;
    }
    pending.drain(..start);
}

/// The unsigned number right after the last occurrence of `key` in `json`.
fn number_after(json: &[u8], key: &[u8]) -> Option<u64> {
    let at = json.windows(key.len()).rposition(|w| w == key)? + key.len();
    let digits = json[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&json[at..at + digits])
        .ok()?
        .parse()
        .ok()
}
