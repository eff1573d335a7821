//! The storage contract: what every implementation of `bus::store::api` ([`EventLog`] and
//! [`ConsumerStore`]) must do, written once against the traits and run against each
//! backend.
//!
//! Each contract is a plain `async fn <contract>(backend: &dyn Backend)` below; the
//! `backends!` invocation at the end generates one `#[tokio::test]` per (backend,
//! contract), named `store_contract::<backend>::<contract>`, so a failure names both.
//!
//! Adding a backend: implement [`Backend`] for it (open a namespace's log, hand out its
//! consumer store, reopen a log as a restarted server would, say whether it is durable) and
//! add one line to `backends!`. Only the durability checks are skipped for a backend that
//! says it is not durable; everything else applies to all of them. A contract a backend is
//! known to break, or to do otherwise on purpose, is `#[ignore]`d for that backend alone,
//! with the reason, by the backend's macro (`jetstream_differences`).
//!
//! The file store runs in three configurations: the server's defaults (everything recent
//! read from the in-memory tail, one segment), tiny segments and tail (reads from disk
//! that stop at segment ends, retention with sealed segments to delete) and the same,
//! encrypted at rest. The JetStream store runs on a nats-server of its own per test.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::jetstream::JetStreamServer;

use bus::event::{EventDraft, PendingEvent, StoredEvent};
use bus::store::jetstream::{
    connect as connect_jetstream, JetStreamConfig, JetStreamLog, DEFAULT_KEY_WINDOW,
};
use bus::store::memory::{MemoryConsumers, MemoryLog};
use bus::store::{
    ids, Appended, BoxFuture, Cipher, ConsumerName, ConsumerProgress, ConsumerStore, ErrorKind,
    EventLog, FileConsumers, KeyedEvent, Log, Owner, StoreConfig,
};
use bus::timestamp::Timestamp;
use serde_json::{json, Value};

/// How long anything that should happen at once may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The backends

/// A storage backend as the contracts see it.
trait Backend: Send + Sync {
    /// Opens the log of `namespace`, creating it if it does not exist.
    fn open<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Arc<dyn EventLog>>;

    /// The backend's store of consumers' progress; `None` for a backend that runs its
    /// consumers itself (JetStream: the HTTP suite runs them on it).
    fn consumers(&self) -> Option<Arc<dyn ConsumerStore>>;

    /// Whether what was stored survives [`Backend::reopen`]. The durability checks are
    /// skipped for a backend that says it is not; nothing else is.
    fn durable(&self) -> bool;

    /// What a restarted server does: closes `log` and lets go of it, then opens its
    /// namespace again; [`Backend::consumers`] hands out a fresh store from then on.
    fn reopen(&self, log: Arc<dyn EventLog>) -> BoxFuture<'_, Arc<dyn EventLog>> {
        Box::pin(async move {
            let namespace = log.namespace().to_owned();
            log.close().await.expect("close the log");
            drop(log);
            self.restarted();
            self.open(&namespace).await
        })
    }

    /// What a restart does to the backend's own state, between closing and opening.
    fn restarted(&self) {}
}

/// The file store (`store::Log` and `store::FileConsumers`) in a temporary directory.
struct FileBackend {
    dir: tempfile::TempDir,
    config: StoreConfig,
}

impl FileBackend {
    /// The server's defaults: 128 MiB segments, a 16 MiB tail, fsync always.
    fn defaults() -> FileBackend {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = StoreConfig::new(dir.path());
        FileBackend { dir, config }
    }

    /// Segments of 2 KiB and a 1 KiB tail: most reads come from disk and stop at a
    /// segment's end, and retention has sealed segments to delete.
    fn small_segments() -> FileBackend {
        let mut backend = FileBackend::defaults();
        backend.config.segment_size = 2 << 10;
        backend.config.tail_bytes = 1 << 10;
        backend
    }

    /// [`FileBackend::small_segments`], encrypted at rest.
    fn encrypted() -> FileBackend {
        let mut backend = FileBackend::small_segments();
        backend.config.cipher = Some(Cipher::new("the storage contract", 512).expect("cipher"));
        backend
    }

    fn open_log(&self, namespace: &str) -> BoxFuture<'_, Arc<dyn EventLog>> {
        let dir = self.dir.path().join(namespace);
        let namespace = namespace.to_owned();
        let config = self.config.clone();
        Box::pin(async move {
            let log = tokio::task::spawn_blocking(move || Log::open(&dir, &namespace, &config))
                .await
                .expect("open task")
                .expect("open the log");
            Arc::new(log) as Arc<dyn EventLog>
        })
    }
}

impl Backend for FileBackend {
    fn open<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Arc<dyn EventLog>> {
        self.open_log(namespace)
    }

    fn consumers(&self) -> Option<Arc<dyn ConsumerStore>> {
        // Stateless: every handle reads and writes the same files.
        Some(Arc::new(FileConsumers::new(self.dir.path())))
    }

    fn durable(&self) -> bool {
        true
    }
}

/// The in-memory store (`store::memory`): a restart forgets everything.
struct MemoryBackend {
    consumers: Mutex<Arc<MemoryConsumers>>,
}

impl MemoryBackend {
    fn new() -> MemoryBackend {
        MemoryBackend {
            consumers: Mutex::new(Arc::new(MemoryConsumers::default())),
        }
    }
}

impl Backend for MemoryBackend {
    fn open<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Arc<dyn EventLog>> {
        Box::pin(async move { Arc::new(MemoryLog::new(namespace)) as Arc<dyn EventLog> })
    }

    fn consumers(&self) -> Option<Arc<dyn ConsumerStore>> {
        Some(Arc::clone(&self.consumers.lock().unwrap()) as Arc<dyn ConsumerStore>)
    }

    fn durable(&self) -> bool {
        false
    }

    /// The consumers' progress was in memory: gone.
    fn restarted(&self) {
        *self.consumers.lock().unwrap() = Arc::new(MemoryConsumers::default());
    }
}

/// The JetStream store (`store::jetstream`) on a nats-server started for the test; `None`
/// when nats-server 2.12 or later is not installed.
struct JetStreamBackend {
    _server: JetStreamServer,
    client: async_nats::Client,
    context: async_nats::jetstream::Context,
    tail_bytes: usize,
    cipher: Option<Cipher>,
}

impl JetStreamBackend {
    /// The server's defaults: a 16 MiB tail, so a log reads its own appends from memory.
    async fn defaults() -> Option<JetStreamBackend> {
        JetStreamBackend::start(StoreConfig::new("unused").tail_bytes, None).await
    }

    /// A 1 KiB tail: reads are fetched from JetStream, in runs.
    async fn small_tail() -> Option<JetStreamBackend> {
        JetStreamBackend::start(1 << 10, None).await
    }

    /// [`JetStreamBackend::small_tail`], encrypted at rest.
    async fn encrypted() -> Option<JetStreamBackend> {
        let cipher = Cipher::new("the storage contract", 512).expect("cipher");
        JetStreamBackend::start(1 << 10, Some(cipher)).await
    }

    async fn start(tail_bytes: usize, cipher: Option<Cipher>) -> Option<JetStreamBackend> {
        let server = JetStreamServer::start()?;
        let config = JetStreamConfig {
            url: server.url(),
            replicas: 1,
            token: None,
            creds: None,
        };
        let (client, context) = connect_jetstream(&config).await.expect("connect to NATS");
        Some(JetStreamBackend {
            _server: server,
            client,
            context,
            tail_bytes,
            cipher,
        })
    }
}

impl Backend for JetStreamBackend {
    fn open<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Arc<dyn EventLog>> {
        Box::pin(async move {
            Arc::new(
                JetStreamLog::open(
                    &self.client,
                    &self.context,
                    namespace,
                    1,
                    self.cipher.as_ref(),
                    self.tail_bytes,
                    Some(DEFAULT_KEY_WINDOW),
                )
                .await
                .expect("open the stream"),
            ) as Arc<dyn EventLog>
        })
    }

    fn consumers(&self) -> Option<Arc<dyn ConsumerStore>> {
        None
    }

    fn durable(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

fn pending(draft: EventDraft<'_>) -> PendingEvent {
    PendingEvent::new(&draft).expect("a valid event")
}

/// An event with a subject and a JSON payload, everything else left to the log.
fn plain(subject: &str, payload: &Value) -> PendingEvent {
    let payload = serde_json::to_vec(payload).unwrap();
    pending(EventDraft {
        subject,
        payload: Some(&payload),
        ..EventDraft::default()
    })
}

fn with_id(id: &str, payload: &Value) -> PendingEvent {
    let payload = serde_json::to_vec(payload).unwrap();
    pending(EventDraft {
        subject: "orders.created",
        payload: Some(&payload),
        id: Some(id),
        ..EventDraft::default()
    })
}

fn keyed(subject: &str, key: &str, created_at: Option<Timestamp>) -> PendingEvent {
    pending(EventDraft {
        subject,
        key,
        payload: Some(b"1"),
        created_at,
        ..EventDraft::default()
    })
}

fn time(text: &str) -> Timestamp {
    Timestamp::parse(text).expect("a valid time")
}

async fn append(log: &dyn EventLog, batch: Vec<PendingEvent>) -> Vec<Appended> {
    let size = batch.len();
    let appended = log.append(batch).await.expect("append");
    assert_eq!(appended.len(), size, "one answer per event of the batch");
    appended
}

/// The kind of error an append that must fail fails with.
async fn refused(log: &dyn EventLog, batch: Vec<PendingEvent>) -> ErrorKind {
    match log.append(batch).await {
        Ok(appended) => panic!("the append was accepted: {appended:?}"),
        Err(e) => e.kind,
    }
}

/// Every committed event from `from` on, read `max` at a time, checking what every read
/// promises: events in order from where it started, at most `max`, never none below the
/// watermark, none at it.
async fn read_from(log: &dyn EventLog, from: u64, max: usize) -> Vec<StoredEvent> {
    let end = log.committed();
    let mut events = Vec::new();
    let mut next = from;
    while next < end {
        let got = log.read(next, max).await.expect("read");
        assert!(
            !got.is_empty(),
            "read({next}, {max}) returned nothing below the watermark {end}"
        );
        assert!(
            got.len() <= max,
            "read({next}, {max}) returned {}",
            got.len()
        );
        for (i, event) in got.iter().enumerate() {
            assert_eq!(event.position(), next + i as u64, "read({next}, {max})");
        }
        next += got.len() as u64;
        events.extend(got);
    }
    let past = log.read(end, max).await.expect("read at the watermark");
    assert!(past.is_empty(), "read at the watermark {end}: {past:?}");
    events
}

async fn read_all(log: &dyn EventLog) -> Vec<StoredEvent> {
    read_from(log, log.first_position(), 1000).await
}

/// Runs blocking calls (the consumer store, `visit_recent_keys`) on the blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("blocking task")
}

async fn recent_keys(log: &Arc<dyn EventLog>, events: u64, max_key_len: usize) -> Vec<KeyedEvent> {
    let log = Arc::clone(log);
    blocking(move || {
        let mut keys = Vec::new();
        log.visit_recent_keys(events, max_key_len, &mut |event| keys.push(event))
            .expect("visit_recent_keys");
        keys
    })
    .await
}

fn subjects_and_keys(keys: &[KeyedEvent]) -> Vec<(&str, &str)> {
    keys.iter()
        .map(|k| (k.subject.as_str(), k.key.as_str()))
        .collect()
}

fn stored_json(event: &StoredEvent) -> Value {
    serde_json::from_slice(&event.json()).expect("the stored JSON parses")
}

fn name(text: &str) -> ConsumerName {
    ConsumerName::parse(text).expect("a valid consumer name")
}

fn progress(pattern: &str, next: u64, unacked: Vec<u64>) -> ConsumerProgress {
    ConsumerProgress {
        pattern: pattern.to_owned(),
        next,
        unacked,
        ..ConsumerProgress::default()
    }
}

// ---------------------------------------------------------------------------------------
// The contracts

/// Appends get positions 0, 1, 2, … in commit order, a batch's contiguous; `committed()`
/// is the next position; what `append` answered is what is stored.
async fn positions_are_gapless_in_commit_order(backend: &dyn Backend) {
    let log = backend.open("orders").await;
    let mut answers = Vec::new();
    let mut expected = 0;
    for size in [1, 3, 1, 2, 5, 1] {
        let batch = (0..size)
            .map(|i| plain("orders.created", &json!({"size": size, "i": i})))
            .collect();
        let appended = append(&*log, batch).await;
        let positions: Vec<u64> = appended.iter().map(|a| a.position).collect();
        let wanted: Vec<u64> = (expected..expected + size).collect();
        assert_eq!(
            positions, wanted,
            "a batch of {size} after {expected} events"
        );
        expected += size;
        assert_eq!(
            log.committed(),
            expected,
            "committed() is the next position"
        );
        answers.extend(appended);
    }

    let stored = read_all(&*log).await;
    assert_eq!(stored.len() as u64, expected);
    for (event, appended) in stored.iter().zip(&answers) {
        assert_eq!(event.position(), appended.position);
        assert_eq!(event.id(), appended.id, "the id append answered is stored");
        assert_eq!(stored_json(event)["index"], appended.position);
        assert_eq!(event.created_at(), Some(appended.created_at));
    }
    let mut ids: Vec<&str> = stored.iter().map(StoredEvent::id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as u64, expected, "ids are unique");
}

/// Publishers appending at the same time: every position is taken once, each batch's
/// contiguous; when an append returns, the watermark covers its events; the watermark
/// never goes back (as `committed()` or through `watch_committed()`), and once every
/// append has returned it is the number of events appended.
async fn concurrent_appends_are_gapless_and_the_watermark_keeps_up(backend: &dyn Backend) {
    const PUBLISHERS: u64 = 16;
    const ROUNDS: u64 = 100;
    let log = backend.open("orders").await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observer = tokio::spawn({
        let log = Arc::clone(&log);
        let done = Arc::clone(&done);
        async move {
            let mut watermark = log.watch_committed();
            let (mut last_committed, mut last_watched) = (0, 0);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let committed = log.committed();
                assert!(
                    committed >= last_committed,
                    "committed() went back from {last_committed} to {committed}"
                );
                last_committed = committed;
                let watched = *watermark.borrow_and_update();
                assert!(
                    watched >= last_watched,
                    "watch_committed() went back from {last_watched} to {watched}"
                );
                last_watched = watched;
                tokio::task::yield_now().await;
            }
        }
    });
    // Publishers on threads of their own, so that appends really do run at the same time.
    let runtime = tokio::runtime::Handle::current();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|publisher| {
            let log = Arc::clone(&log);
            let runtime = runtime.clone();
            tokio::task::spawn_blocking(move || {
                let mut answers = Vec::new();
                for round in 0..ROUNDS {
                    let size = 1 + (publisher + round) % 3;
                    let batch = (0..size)
                        .map(|i| {
                            plain("orders.created", &json!({"p": publisher, "r": round, "i": i}))
                        })
                        .collect();
                    let appended = runtime.block_on(append(&*log, batch));
                    let end = appended.last().unwrap().position + 1;
                    let committed = log.committed();
                    assert!(
                        committed >= end,
                        "an append of positions up to {end} returned, but committed() is {committed}"
                    );
                    answers.push(appended);
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for publisher in publishers {
        answers.extend(publisher.await.expect("publisher"));
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    observer.await.expect("observer");

    let mut taken: Vec<u64> = Vec::new();
    for appended in &answers {
        for (i, a) in appended.iter().enumerate() {
            assert_eq!(
                a.position,
                appended[0].position + i as u64,
                "a batch is contiguous"
            );
            taken.push(a.position);
        }
    }
    taken.sort_unstable();
    let total = taken.len() as u64;
    assert_eq!(
        taken,
        (0..total).collect::<Vec<_>>(),
        "no position twice, none skipped"
    );
    assert_eq!(
        log.committed(),
        total,
        "the watermark once every append returned"
    );
    assert_eq!(*log.watch_committed().borrow(), total);

    let stored = read_all(&*log).await;
    assert_eq!(stored.len() as u64, total);
    for appended in answers.iter().flatten() {
        let event = &stored[appended.position as usize];
        assert_eq!(event.id(), appended.id, "the id append answered is stored");
    }
}

/// `watch_committed()` starts at the watermark and wakes a waiter when an append
/// advances it, and what the watermark announces can be read at once.
async fn the_watermark_wakes_waiters(backend: &dyn Backend) {
    let log = backend.open("orders").await;
    let mut idle = log.watch_committed();
    assert_eq!(*idle.borrow_and_update(), 0);

    let (ready, waiting) = tokio::sync::oneshot::channel();
    let waiter = tokio::spawn({
        let log = Arc::clone(&log);
        let mut watermark = log.watch_committed();
        async move {
            let seen = *watermark.borrow_and_update();
            assert_eq!(seen, 0);
            let _ = ready.send(());
            watermark
                .changed()
                .await
                .expect("the watermark's sender is alive");
            let announced = *watermark.borrow_and_update();
            // What the watermark announces is readable, all of it.
            let readable = read_from(&*log, 0, 100).await.len() as u64;
            (announced, readable)
        }
    });
    waiting.await.expect("the waiter started");
    append(
        &*log,
        vec![plain("orders.a", &json!(1)), plain("orders.b", &json!(2))],
    )
    .await;
    let (announced, readable) = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("the waiter was not woken")
        .expect("waiter");
    assert_eq!(announced, 2, "a batch becomes visible whole");
    assert!(readable >= announced, "read {readable} of {announced}");

    assert!(
        idle.has_changed().expect("sender alive"),
        "a receiver that was not waiting sees the change"
    );
    assert_eq!(*idle.borrow_and_update(), 2);
    append(&*log, vec![plain("orders.c", &json!(3))]).await;
    tokio::time::timeout(PATIENCE, idle.changed())
        .await
        .expect("the watermark did not change")
        .expect("sender alive");
    assert_eq!(*idle.borrow(), 3);
    assert_eq!(*log.watch_committed().borrow(), log.committed());
}

/// The events of a batch get consecutive positions and come back from `read` in order,
/// every field as given: subject, payload (or none), key, trace id, response subject, a
/// client's id and creation time; the stored JSON is exactly what the event encodes to
/// (fixed member order) and the SSE frame carries it.
async fn a_batch_is_stored_whole_and_intact(backend: &dyn Backend) {
    let log = backend.open("orders").await;
    append(&*log, vec![plain("orders.first", &json!("before"))]).await;

    let payload = serde_json::to_vec(&json!({"text": "é \"quoted\" \n", "n": [1, 2.5, null]}))
        .expect("payload");
    let drafts = [
        EventDraft {
            subject: "orders.full",
            trace_id: "trace-1",
            key: "key \"1\"",
            response_subject: "_bus_.inbox.abc",
            payload: Some(&payload),
            ..EventDraft::default()
        },
        EventDraft {
            subject: "orders.empty",
            ..EventDraft::default()
        },
        EventDraft {
            subject: "orders.client",
            payload: Some(b"null"),
            id: Some("e_client-chosen.1"),
            created_at: Some(time("2001-02-03T04:05:06.789Z")),
            ..EventDraft::default()
        },
        EventDraft {
            subject: "orders.last",
            payload: Some(b"[]"),
            key: "k",
            ..EventDraft::default()
        },
    ];
    let batch: Vec<PendingEvent> = drafts.iter().map(|d| pending(d.clone())).collect();
    let appended = append(&*log, batch.clone()).await;
    let positions: Vec<u64> = appended.iter().map(|a| a.position).collect();
    assert_eq!(
        positions,
        [1, 2, 3, 4],
        "consecutive, after the first event"
    );
    assert_eq!(appended[2].id, "e_client-chosen.1", "a client's id is kept");
    assert_eq!(
        appended[2].created_at,
        time("2001-02-03T04:05:06.789Z"),
        "a client's creation time is kept"
    );

    let read = read_from(&*log, 1, 10).await;
    assert_eq!(read.len(), 4);
    for (i, ((event, draft), (given, answer))) in read
        .iter()
        .zip(&drafts)
        .zip(batch.iter().zip(&appended))
        .enumerate()
    {
        let position = 1 + i as u64;
        assert_eq!(event.position(), position);
        assert_eq!(event.id(), answer.id);
        assert_eq!(event.subject(), draft.subject);
        let response_subject = Some(draft.response_subject).filter(|s| !s.is_empty());
        assert_eq!(event.response_subject().as_deref(), response_subject);
        let payload = draft.payload.unwrap_or(b"null");
        assert_eq!(&event.payload_json()[..], payload, "payload of {position}");
        assert_eq!(event.created_at(), Some(answer.created_at));

        // The JSON, byte for byte: what the event encodes to with what append assigned.
        let mut json = Vec::new();
        given.write_json(
            &mut json,
            &answer.id,
            &answer.created_at.format(),
            position as i64,
        );
        assert_eq!(
            String::from_utf8_lossy(&event.json()),
            String::from_utf8_lossy(&json),
            "stored JSON of {position}"
        );
        let frame = format!(
            "id: {}\nevent: msg\ndata: {}\n\n",
            answer.id,
            String::from_utf8_lossy(&json)
        );
        assert_eq!(String::from_utf8_lossy(event.sse_frame()), frame);

        // And as a reader parses it.
        let value = stored_json(event);
        let text = |field: &str| value.get(field).and_then(Value::as_str).unwrap_or("");
        assert_eq!(text("id"), answer.id);
        assert_eq!(text("subject"), draft.subject);
        assert_eq!(text("trace_id"), draft.trace_id);
        assert_eq!(text("key"), draft.key);
        assert_eq!(text("response_subject"), draft.response_subject);
        assert_eq!(text("created_at"), answer.created_at.to_string());
        assert_eq!(value["index"], position);
        match draft.payload {
            Some(p) => assert_eq!(
                value["payload"],
                serde_json::from_slice::<Value>(p).unwrap()
            ),
            None => assert!(value.get("payload").is_none(), "no payload member"),
        }
    }
    assert_eq!(
        read[0].response_subject().as_deref(),
        Some("_bus_.inbox.abc")
    );
    assert_eq!(stored_json(&read[0])["payload"]["text"], "é \"quoted\" \n");

    // A batch that cannot be stored whole is not stored at all: its last event reuses an
    // id, so its first (valid on its own) must not appear either.
    let before = log.committed();
    let kind = refused(
        &*log,
        vec![
            with_id("e_would-be-fine", &json!(1)),
            plain("orders.x", &json!(2)),
            with_id("e_client-chosen.1", &json!(3)),
        ],
    )
    .await;
    assert_eq!(kind, ErrorKind::Conflict);
    assert_eq!(
        log.committed(),
        before,
        "nothing of a refused batch is committed"
    );
    assert_eq!(log.find_id("e_would-be-fine").await.unwrap(), None);
    assert_eq!(read_all(&*log).await.len() as u64, before);
    let next = append(&*log, vec![with_id("e_would-be-fine", &json!(4))]).await;
    assert_eq!(next[0].position, before, "no gap after a refused batch");
}

/// `read(from, max)`: never empty below the watermark, empty at and after it, at most
/// `max` events, in order from `from`; it may return fewer (events of 100 KiB make reads
/// stop early on the backends that bound a read's bytes).
async fn reads_stop_at_the_watermark_and_respect_max(backend: &dyn Backend) {
    let log = backend.open("orders").await;
    assert!(log.read(0, 10).await.unwrap().is_empty(), "an empty log");
    assert!(log.read(5, 10).await.unwrap().is_empty());

    let big = "x".repeat(100 << 10);
    for i in 0..30u64 {
        let payload = if i % 10 == 9 {
            json!({"i": i, "big": big})
        } else {
            json!({"i": i})
        };
        append(&*log, vec![plain("orders.created", &payload)]).await;
    }
    let end = log.committed();
    assert_eq!(end, 30);
    let reference = read_from(&*log, 0, 1000).await;
    assert_eq!(reference.len(), 30);
    for (i, event) in reference.iter().enumerate() {
        assert_eq!(stored_json(event)["payload"]["i"], i as u64);
    }

    for from in 0..end {
        for max in [1, 2, 7, 1000] {
            let got = log.read(from, max).await.expect("read");
            assert!(!got.is_empty(), "read({from}, {max}) below the watermark");
            assert!(got.len() <= max, "read({from}, {max}) gave {}", got.len());
            assert!(
                from + got.len() as u64 <= end,
                "read({from}, {max}) past the watermark"
            );
            for (i, event) in got.iter().enumerate() {
                assert_eq!(
                    event,
                    &reference[from as usize + i],
                    "read({from}, {max}), event {i}"
                );
            }
        }
        // Reading on from anywhere reaches the watermark with nothing skipped.
        assert_eq!(read_from(&*log, from, 3).await, reference[from as usize..]);
    }
    for from in [end, end + 1, end + 1000] {
        assert!(
            log.read(from, 10).await.expect("read").is_empty(),
            "read({from}) at or past the watermark {end}"
        );
    }
}

/// Ids: server-assigned ones resolve to their position; unknown ones to nothing; a
/// client's ids are kept and resolve; an id that exists (the client's or the server's),
/// one repeated within a batch, or one of the form this log assigns itself, is refused
/// as a conflict and changes nothing.
async fn ids_resolve_and_are_never_reused(backend: &dyn Backend) {
    let log = backend.open("orders").await;
    assert_eq!(log.find_id("e_nothing-yet").await.unwrap(), None);
    let mut appended = append(&*log, vec![plain("orders.a", &json!(0))]).await;
    appended.extend(
        append(
            &*log,
            vec![
                plain("orders.b", &json!(1)),
                with_id("e_client-1", &json!(2)),
                plain("orders.c", &json!(3)),
            ],
        )
        .await,
    );
    appended.extend(append(&*log, vec![with_id("e_client:2~x", &json!(4))]).await);
    assert_eq!(appended[2].id, "e_client-1");
    assert_eq!(appended[4].id, "e_client:2~x");

    for a in &appended {
        assert_eq!(
            log.find_id(&a.id).await.expect("find_id"),
            Some(a.position),
            "id {}",
            a.id
        );
    }
    let stored = read_all(&*log).await;
    for (event, a) in stored.iter().zip(&appended) {
        assert_eq!(event.id(), a.id);
    }
    for unknown in ["e_unknown", "e_client-10", "e_client", "not-an-id", ""] {
        assert_eq!(
            log.find_id(unknown).await.expect("find_id"),
            None,
            "{unknown:?}"
        );
    }

    let committed = log.committed();
    // An existing client id, alone, in a batch, or as a server-assigned id.
    for batch in [
        vec![with_id("e_client-1", &json!("again"))],
        vec![
            plain("orders.d", &json!(5)),
            with_id("e_client:2~x", &json!(6)),
        ],
        vec![with_id(&appended[0].id, &json!("a server id"))],
        vec![with_id("e_twice", &json!(7)), with_id("e_twice", &json!(8))],
    ] {
        let ids: Vec<Option<String>> = batch
            .iter()
            .map(|e| e.client_id().map(str::to_owned))
            .collect();
        assert_eq!(refused(&*log, batch).await, ErrorKind::Conflict, "{ids:?}");
    }
    // The form of this log's own ids, at a position not reached yet: it would collide
    // with the id the log will assign there.
    if let Some((generation, _)) = ids::decode(&appended[0].id) {
        let future = String::from_utf8(ids::encode(generation, committed + 2).to_vec()).unwrap();
        assert_eq!(
            log.find_id(&future).await.unwrap(),
            None,
            "not committed yet"
        );
        assert_eq!(
            refused(&*log, vec![with_id(&future, &json!(9))]).await,
            ErrorKind::Conflict,
            "{future}"
        );
    }
    assert_eq!(log.committed(), committed, "refused appends change nothing");
    assert_eq!(log.find_id("e_twice").await.unwrap(), None);
    assert_eq!(log.find_id("e_client-1").await.unwrap(), Some(2));

    // And the log goes on without a gap.
    let next = append(&*log, vec![with_id("e_twice", &json!(10))]).await;
    assert_eq!(next[0].position, committed);
    assert_eq!(log.find_id("e_twice").await.unwrap(), Some(committed));
}

/// `first_committed_at_or_after(time)` searches the log's own commit times, never a
/// `created_at` a client chose, and answers the watermark when nothing was committed at
/// or after `time`.
///
/// `between` is read from this process's clock between two commits; a backend whose
/// commit times come from another machine's clock needs them in step.
async fn time_search_uses_commit_times(backend: &dyn Backend) {
    let log = backend.open("orders").await;
    assert_eq!(
        log.first_committed_at_or_after(Timestamp::now())
            .await
            .unwrap(),
        0,
        "an empty log: its watermark"
    );

    let first = append(&*log, vec![plain("orders.a", &json!(0))]).await[0].created_at;
    // A time after the first commit and before the second.
    let deadline = std::time::Instant::now() + PATIENCE;
    let between = loop {
        let now = Timestamp::now();
        if now > first {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the clock stands still"
        );
        std::hint::spin_loop();
    };
    let long_ago = time("2001-01-01T00:00:00Z");
    let dated = append(
        &*log,
        vec![pending(EventDraft {
            subject: "orders.b",
            payload: Some(b"1"),
            created_at: Some(long_ago),
            ..EventDraft::default()
        })],
    )
    .await;
    assert_eq!(dated[0].created_at, long_ago, "the client's time is kept");
    let read = log.read(1, 1).await.unwrap();
    assert_eq!(read[0].created_at(), Some(long_ago));
    let last = append(&*log, vec![plain("orders.c", &json!(2))]).await[0].created_at;
    assert!(last >= first, "commit times never go back");

    let search = |time: Timestamp| {
        let log = Arc::clone(&log);
        async move { log.first_committed_at_or_after(time).await.expect("search") }
    };
    assert_eq!(search(time("1990-01-01T00:00:00Z")).await, 0);
    assert_eq!(
        search(long_ago).await,
        0,
        "the client's date misleads nothing"
    );
    assert_eq!(search(first).await, 0, "at a commit time: its event");
    assert_eq!(
        search(between).await,
        1,
        "the event dated {long_ago} was committed after {between}"
    );
    let at_last = search(last).await;
    assert!(
        (1..=2).contains(&at_last),
        "at the last commit time {last}: {at_last}"
    );
    let after = Timestamp::from_unix_nanos(last.unix_nanos() + 1);
    assert_eq!(
        search(after).await,
        3,
        "nothing committed since: the watermark"
    );
    assert_eq!(search(time("2200-01-01T00:00:00Z")).await, 3);
}

/// `visit_recent_keys(n, max_key_len, visit)`: the keyed events among the last `n`, oldest
/// first, with their subjects and commit times (never a client's `created_at`), leaving
/// out keys longer than `max_key_len` bytes (escapes and multi-byte characters counted
/// as the key's bytes, not its JSON's).
async fn recent_keys_are_visited_oldest_first(backend: &dyn Backend) {
    let log = backend.open("orders").await;
    assert!(recent_keys(&log, 10, 100).await.is_empty(), "an empty log");

    let long_key = "x".repeat(40);
    let long_ago = time("2001-01-01T00:00:00Z");
    let mut appended = append(&*log, vec![keyed("orders.a", "k1", None)]).await;
    appended.extend(append(&*log, vec![plain("orders.b", &json!("no key"))]).await);
    appended.extend(
        append(
            &*log,
            vec![
                keyed("orders.c", "é", None),
                keyed("orders.d", &long_key, None),
            ],
        )
        .await,
    );
    appended.extend(append(&*log, vec![keyed("orders.e", "a\"b\n", Some(long_ago))]).await);
    appended.extend(append(&*log, vec![keyed("orders.f", "k1", None)]).await);

    let all = recent_keys(&log, 6, 10).await;
    assert_eq!(
        subjects_and_keys(&all),
        [
            ("orders.a", "k1"),
            ("orders.c", "é"),
            ("orders.e", "a\"b\n"),
            ("orders.f", "k1"),
        ]
    );
    // Commit times: the server-dated events' creation times, never the client's date.
    for (keyed, position) in all.iter().zip([0, 2, 4, 5]) {
        if position != 4 {
            assert_eq!(
                keyed.committed_at, appended[position].created_at,
                "event {position}"
            );
        }
    }
    assert!(
        all[2].committed_at >= appended[3].created_at,
        "committed after the event before it, whatever its created_at says: {}",
        all[2].committed_at
    );
    assert!(all
        .windows(2)
        .all(|w| w[0].committed_at <= w[1].committed_at));

    let keys = |events, max| {
        let log = Arc::clone(&log);
        async move {
            recent_keys(&log, events, max)
                .await
                .into_iter()
                .map(|k| k.key)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(keys(1000, 10).await, ["k1", "é", "a\"b\n", "k1"]);
    assert_eq!(
        keys(6, 40).await,
        ["k1", "é", long_key.as_str(), "a\"b\n", "k1"]
    );
    assert_eq!(
        keys(6, 4).await,
        ["k1", "é", "a\"b\n", "k1"],
        "4 bytes is not too long"
    );
    assert_eq!(keys(6, 3).await, ["k1", "é", "k1"]);
    assert_eq!(keys(6, 1).await, Vec::<String>::new(), "\"é\" is 2 bytes");
    assert_eq!(keys(3, 10).await, ["a\"b\n", "k1"], "the last 3 events");
    assert_eq!(keys(2, 100).await, ["a\"b\n", "k1"]);
    assert_eq!(keys(1, 100).await, ["k1"]);
    assert_eq!(keys(0, 100).await, Vec::<String>::new());
}

/// A fresh log is empty everywhere; its statistics count the events appended and the
/// commits that stored them.
async fn a_fresh_log_is_empty_and_stats_count_events(backend: &dyn Backend) {
    let log = backend.open("orders").await;
    assert_eq!(log.namespace(), "orders");
    assert_eq!(log.first_position(), 0);
    assert_eq!(log.committed(), 0);
    assert_eq!(*log.watch_committed().borrow(), 0);
    assert_eq!(log.stats().events, 0);
    assert_eq!(log.stats().groups, 0);
    assert_eq!(log.halted(), None);
    assert!(log.read(0, 10).await.unwrap().is_empty());
    assert_eq!(
        log.first_committed_at_or_after(time("2001-01-01T00:00:00Z"))
            .await
            .unwrap(),
        0
    );
    let usage = |log: &Arc<dyn EventLog>| {
        let log = Arc::clone(log);
        blocking(move || log.usage().expect("usage"))
    };
    assert_eq!(usage(&log).await.events, 0);

    append(&*log, vec![plain("orders.a", &json!(1))]).await;
    append(
        &*log,
        (0..4).map(|i| plain("orders.b", &json!(i))).collect(),
    )
    .await;
    let stats = log.stats();
    assert_eq!(stats.events, 5);
    assert!(
        (1..=2).contains(&stats.groups),
        "two appends, one after the other: {} commits",
        stats.groups
    );
    let timings = log.commit_timings();
    assert_eq!(timings.group_events.sum(), 5, "events per commit add up");
    assert_eq!(timings.group_events.count(), stats.groups);
    assert_eq!(log.first_position(), 0);
    assert_eq!(log.halted(), None);
    let used = usage(&log).await;
    assert_eq!(used.events, 5);
    assert!(used.bytes > 0, "five events take room: {used:?}");
    if let Some(segments) = used.segments {
        assert!(segments >= 1, "{used:?}");
    }
}

/// After `close()` appends fail as unavailable; everything committed can still be read,
/// found by id and by time, and visited.
async fn closing_stops_appends_but_not_reads(backend: &dyn Backend) {
    let log = backend.open("orders").await;
    let appended = append(
        &*log,
        vec![
            keyed("orders.a", "k", None),
            with_id("e_mine", &json!(1)),
            plain("orders.c", &json!(2)),
        ],
    )
    .await;
    let before = read_all(&*log).await;
    log.close().await.expect("close");

    assert_eq!(
        refused(&*log, vec![plain("orders.d", &json!(3))]).await,
        ErrorKind::Unavailable
    );
    assert_eq!(
        refused(&*log, vec![with_id("e_other", &json!(4))]).await,
        ErrorKind::Unavailable
    );
    assert_eq!(log.committed(), 3);
    assert_eq!(read_all(&*log).await, before, "reads go on");
    for a in &appended {
        assert_eq!(log.find_id(&a.id).await.unwrap(), Some(a.position));
    }
    assert_eq!(
        log.first_committed_at_or_after(appended[0].created_at)
            .await
            .unwrap(),
        0
    );
    let keys = recent_keys(&log, 10, 10).await;
    assert_eq!(subjects_and_keys(&keys), [("orders.a", "k")]);
}

/// Retention removes whole units of storage from the front and says which (first
/// position, events); `first_position()` follows, the newest event stays, positions and
/// the watermark do not move, and appends go on. (Whether anything is removed depends on
/// the backend's units: one segment of the file store's defaults holds everything.)
async fn retention_removes_the_oldest_events_only(backend: &dyn Backend) {
    let log = backend.open("orders").await;
    let enforce = |max_age: Option<Duration>, max_bytes: Option<u64>| {
        let log = Arc::clone(&log);
        blocking(move || log.enforce_retention(max_age, max_bytes))
    };
    let nothing: Vec<(u64, u64)> = Vec::new();
    assert_eq!(enforce(None, Some(0)).await.expect("retention"), nothing);

    let mut expected_ids = Vec::new();
    for round in 0..2u64 {
        for i in 0..20u64 {
            let payload = json!({"round": round, "i": i, "pad": "p".repeat(200)});
            let appended = append(&*log, vec![plain("orders.created", &payload)]).await;
            expected_ids.extend(appended.into_iter().map(|a| (a.position, a.id)));
        }
        let committed = log.committed();
        let first = log.first_position();
        assert_eq!(
            enforce(None, None).await.expect("retention"),
            nothing,
            "no limits"
        );
        assert_eq!(
            enforce(Some(Duration::from_secs(3600)), None)
                .await
                .expect("retention"),
            nothing,
            "nothing is an hour old"
        );
        let removed = if round == 0 {
            enforce(None, Some(0)).await
        } else {
            enforce(Some(Duration::ZERO), None).await
        }
        .expect("retention");
        let mut next = first;
        for &(start, events) in &removed {
            assert_eq!(
                start, next,
                "units removed from the front, in order: {removed:?}"
            );
            assert!(events > 0, "{removed:?}");
            next += events;
        }
        assert_eq!(
            log.first_position(),
            next,
            "first_position follows: {removed:?}"
        );
        assert!(next < committed, "the newest event stays: {removed:?}");
        assert_eq!(log.committed(), committed, "the watermark does not move");
        let kept = read_all(&*log).await;
        assert_eq!(kept.len() as u64, committed - next);
        let usage = {
            let log = Arc::clone(&log);
            blocking(move || log.usage()).await.expect("usage")
        };
        assert_eq!(usage.events, kept.len() as u64, "usage counts what is kept");
        for event in &kept {
            let (position, id) = &expected_ids[event.position() as usize];
            assert_eq!((event.position(), event.id()), (*position, id.as_str()));
            assert_eq!(log.find_id(id).await.unwrap(), Some(*position));
        }
    }
    let next = append(&*log, vec![plain("orders.created", &json!("after"))]).await;
    assert_eq!(next[0].position, 40, "positions go on");
}

/// Namespaces are separate logs: positions, ids and client ids of one mean nothing in
/// another.
async fn namespaces_are_independent(backend: &dyn Backend) {
    let orders = backend.open("orders").await;
    let billing = backend.open("billing").await;
    let in_orders = append(
        &*orders,
        vec![plain("orders.a", &json!(1)), with_id("e_shared", &json!(2))],
    )
    .await;
    assert_eq!(billing.committed(), 0);
    assert!(billing.read(0, 10).await.unwrap().is_empty());
    assert_eq!(billing.find_id(&in_orders[0].id).await.unwrap(), None);
    assert_eq!(billing.find_id("e_shared").await.unwrap(), None);

    let in_billing = append(
        &*billing,
        vec![
            plain("billing.a", &json!(1)),
            pending(EventDraft {
                subject: "billing.created",
                payload: Some(b"3"),
                id: Some("e_shared"),
                ..EventDraft::default()
            }),
        ],
    )
    .await;
    assert_eq!(in_billing[0].position, 0, "each namespace counts from 0");
    assert_ne!(
        in_billing[0].id, in_orders[0].id,
        "server ids differ between namespaces"
    );
    assert_eq!(billing.find_id("e_shared").await.unwrap(), Some(1));
    assert_eq!(orders.find_id(&in_billing[0].id).await.unwrap(), None);
    assert_eq!(orders.committed(), 2);
    assert_eq!(read_all(&*orders).await[1].subject(), "orders.created");
    assert_eq!(read_all(&*billing).await[0].subject(), "billing.a");
}

/// The consumer store: nothing for an unknown consumer; save then load returns it, every
/// field; save replaces; list shows a namespace's consumers by name; remove forgets
/// (removing an unknown one is fine); namespaces are separate.
async fn consumer_progress_is_saved_replaced_listed_and_removed(backend: &dyn Backend) {
    let Some(store) = backend.consumers() else {
        eprintln!("skipped: the backend runs its consumers itself");
        return;
    };
    blocking(move || {
        let billing = name("billing");
        let audit = name("audit-2_x");
        assert_eq!(store.load("orders", &billing).unwrap(), None);
        assert!(store.list("orders").unwrap().is_empty());

        let full = ConsumerProgress {
            pattern: "orders.>".into(),
            next: 12,
            unacked: vec![3, 7, 11],
            owner: Some(Owner("alice".into())),
            delivered: vec![[3, 2], [7, 1]],
            delayed: vec![[11, 1_700_000_000_123]],
            replied: vec![7],
        };
        store.save("orders", &billing, &full).unwrap();
        assert_eq!(store.load("orders", &billing).unwrap(), Some(full.clone()));
        assert_eq!(store.load("orders", &audit).unwrap(), None);
        assert_eq!(
            store.load("payments", &billing).unwrap(),
            None,
            "per namespace"
        );

        let moved_on = progress("orders.*", 20, vec![]);
        store.save("orders", &billing, &moved_on).unwrap();
        assert_eq!(
            store.load("orders", &billing).unwrap(),
            Some(moved_on.clone()),
            "save replaces"
        );

        let audit_progress = progress(">", 0, vec![]);
        store.save("orders", &audit, &audit_progress).unwrap();
        let elsewhere = progress("payments.>", 5, vec![4]);
        store.save("payments", &billing, &elsewhere).unwrap();
        assert_eq!(
            store.list("orders").unwrap(),
            [
                (audit.clone(), audit_progress.clone()),
                (billing.clone(), moved_on.clone()),
            ],
            "by name"
        );
        assert_eq!(
            store.list("payments").unwrap(),
            [(billing.clone(), elsewhere.clone())]
        );

        store.remove("orders", &billing).unwrap();
        assert_eq!(store.load("orders", &billing).unwrap(), None);
        assert_eq!(
            store.list("orders").unwrap(),
            [(audit.clone(), audit_progress)]
        );
        assert_eq!(
            store.load("payments", &billing).unwrap(),
            Some(elsewhere),
            "removed in its namespace only"
        );
        store.remove("orders", &billing).unwrap();
        store.remove("orders", &name("never-saved")).unwrap();
        store.remove("nowhere", &name("never-saved")).unwrap();

        // Saved again after removal: a new consumer of the same name.
        store.save("orders", &billing, &full).unwrap();
        assert_eq!(store.load("orders", &billing).unwrap(), Some(full));
    })
    .await;
}

/// A restart: a durable backend keeps every event with its position, id, bytes and commit
/// time (the id and time searches answer as before, client ids stay taken) and every
/// consumer's progress; on every backend the reopened log takes appends at its
/// watermark, and commit times never go back.
async fn what_was_stored_survives_a_reopen(backend: &dyn Backend) {
    let log = backend.open("orders").await;
    let mut appended = append(&*log, vec![keyed("orders.a", "k1", None)]).await;
    appended.extend(
        append(
            &*log,
            vec![
                plain("orders.b", &json!(1)),
                with_id("e_kept", &json!(2)),
                keyed("orders.c", "k2", Some(time("2001-01-01T00:00:00Z"))),
            ],
        )
        .await,
    );
    appended.extend(append(&*log, vec![plain("orders.d", &json!(3))]).await);
    let before = read_all(&*log).await;
    let committed = log.committed();
    let keys_before = recent_keys(&log, 100, 100).await;
    let mut searches = Vec::new();
    for a in &appended {
        let at = log.first_committed_at_or_after(a.created_at).await.unwrap();
        searches.push((a.created_at, at));
    }
    let last_commit = appended.last().unwrap().created_at;

    let consumers = backend.consumers();
    let saved = progress("orders.>", 3, vec![1]);
    if let Some(consumers) = consumers {
        let saved = saved.clone();
        blocking(move || {
            consumers.save("orders", &name("billing"), &saved).unwrap();
            consumers
                .save("orders", &name("audit"), &progress(">", 5, vec![]))
                .unwrap();
            consumers.remove("orders", &name("audit")).unwrap();
        })
        .await;
    }

    let log = backend.reopen(log).await;
    let consumers = backend.consumers();
    if backend.durable() {
        assert_eq!(log.committed(), committed);
        assert_eq!(*log.watch_committed().borrow(), committed);
        assert_eq!(log.first_position(), 0);
        assert_eq!(log.stats().events, committed, "events in the log");
        assert_eq!(
            read_all(&*log).await,
            before,
            "the same events, byte for byte"
        );
        for a in &appended {
            assert_eq!(
                log.find_id(&a.id).await.unwrap(),
                Some(a.position),
                "{}",
                a.id
            );
        }
        for (time, at) in &searches {
            assert_eq!(
                log.first_committed_at_or_after(*time).await.unwrap(),
                *at,
                "search for {time}"
            );
        }
        assert_eq!(recent_keys(&log, 100, 100).await, keys_before);
        assert_eq!(
            refused(&*log, vec![with_id("e_kept", &json!("again"))]).await,
            ErrorKind::Conflict,
            "client ids stay taken"
        );
        if let Some(consumers) = consumers {
            let stored = blocking(move || {
                (
                    consumers.load("orders", &name("billing")).unwrap(),
                    consumers.load("orders", &name("audit")).unwrap(),
                    consumers.list("orders").unwrap(),
                )
            })
            .await;
            assert_eq!(stored.0, Some(saved.clone()));
            assert_eq!(stored.1, None, "a removed consumer stays removed");
            assert_eq!(stored.2, [(name("billing"), saved)]);
        }
    } else {
        eprintln!("skipped the durability checks: the backend is not durable");
    }

    let start = log.committed();
    let next = append(
        &*log,
        vec![plain("orders.e", &json!(4)), plain("orders.f", &json!(5))],
    )
    .await;
    assert_eq!(next[0].position, start, "appends go on at the watermark");
    assert_eq!(next[1].position, start + 1);
    assert_eq!(log.committed(), start + 2);
    assert_eq!(log.find_id(&next[1].id).await.unwrap(), Some(start + 1));
    if backend.durable() {
        for a in &appended {
            assert_ne!(next[0].id, a.id, "a new id, never one from before");
            assert_ne!(next[1].id, a.id, "a new id, never one from before");
        }
        assert!(
            next[0].created_at >= last_commit,
            "commit times never go back across a restart"
        );
        assert_eq!(read_all(&*log).await[..before.len()], before[..]);
    }
}

// ---------------------------------------------------------------------------------------
// The tests: one per (backend, contract).

/// What a line of `backends!` makes: a backend, or an `Option` of one that is `None` when
/// the backend cannot run here (a server that is not installed: the maker says so on
/// stderr), and then its tests pass without running.
trait Made {
    type Backend: Backend;
    fn backend(self) -> Option<Self::Backend>;
}

impl<B: Backend> Made for B {
    type Backend = B;
    fn backend(self) -> Option<B> {
        Some(self)
    }
}

impl<B: Backend> Made for Option<B> {
    type Backend = B;
    fn backend(self) -> Option<B> {
        self
    }
}

/// `backends! { contracts: [a, b, …]; name => make, bugs; … }` writes `mod name` with a
/// `#[tokio::test]` per contract, each running the contract on a backend made by `make`
/// (an expression evaluated in the test's async context, so it may `.await`, in a module
/// that sees this one's items; see [`Made`] for what it may give). `bugs` names the macro that knows the backend's known bugs: it writes
/// each test through [`contract_test`], `#[ignore]`d with the reason for a contract the
/// backend is known to break.
macro_rules! backends {
    (contracts: $contracts:tt; $($backend:ident => $make:expr, $bugs:ident;)*) => {
        $( contract_tests!($backend, $make, $bugs, $contracts); )*
    };
}

macro_rules! contract_tests {
    ($backend:ident, $make:expr, $bugs:ident, [$($contract:ident),* $(,)?]) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            $( $bugs!($make, $contract); )*
        }
    };
}

macro_rules! contract_test {
    ($make:expr, $contract:ident $(, $reason:literal)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[ignore = $reason])?
        async fn $contract() {
            let Some(backend) = super::Made::backend($make) else {
                return; // The maker said why it cannot run here.
            };
            super::$contract(&backend).await;
        }
    };
}

macro_rules! no_known_bugs {
    ($make:expr, $contract:ident) => {
        contract_test!($make, $contract);
    };
}

/// Where the JetStream store differs, on purpose.
macro_rules! jetstream_differences {
    // JetStream enforces age and byte limits itself, message by message and in its own
    // time (the newest message too, once past them); `enforce_retention` sets them on the
    // stream and reports what went. `http_jetstream::retention_…` tests it end to end.
    ($make:expr, retention_removes_the_oldest_events_only) => {
        contract_test!(
            $make,
            retention_removes_the_oldest_events_only,
            "JetStream enforces retention itself, per message (see http_jetstream)"
        );
    };
    ($make:expr, $contract:ident) => {
        contract_test!($make, $contract);
    };
}

backends! {
    contracts: [
        positions_are_gapless_in_commit_order,
        concurrent_appends_are_gapless_and_the_watermark_keeps_up,
        the_watermark_wakes_waiters,
        a_batch_is_stored_whole_and_intact,
        reads_stop_at_the_watermark_and_respect_max,
        ids_resolve_and_are_never_reused,
        time_search_uses_commit_times,
        recent_keys_are_visited_oldest_first,
        a_fresh_log_is_empty_and_stats_count_events,
        closing_stops_appends_but_not_reads,
        retention_removes_the_oldest_events_only,
        namespaces_are_independent,
        consumer_progress_is_saved_replaced_listed_and_removed,
        what_was_stored_survives_a_reopen,
    ];
    file => FileBackend::defaults(), no_known_bugs;
    file_small_segments => FileBackend::small_segments(), no_known_bugs;
    file_encrypted => FileBackend::encrypted(), no_known_bugs;
    memory => MemoryBackend::new(), no_known_bugs;
    jetstream => JetStreamBackend::defaults().await, jetstream_differences;
    jetstream_small_tail => JetStreamBackend::small_tail().await, jetstream_differences;
    jetstream_encrypted => JetStreamBackend::encrypted().await, jetstream_differences;
}
