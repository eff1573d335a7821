//! Consumers beyond the reference, over real HTTP: ack windows with per-event
//! redelivery, negative acks, durable consumers across reconnects and restarts, queue
//! groups, dead letters, and the admin endpoints.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::http::*;

const QUIET: Duration = Duration::from_millis(400);
const WAIT: Duration = Duration::from_secs(10);

fn payload_n(frame: &Frame) -> i64 {
    frame.json()["payload"]["n"].as_i64().unwrap()
}

async fn publish_n(server: &TestServer, subject: &str, range: std::ops::Range<i64>) {
    let events: Vec<Value> = range
        .map(|n| json!({"subject": subject, "payload": {"n": n}}))
        .collect();
    for chunk in events.chunks(500) {
        let response = server.post(Value::from(chunk.to_vec()).to_string()).await;
        assert_eq!(response.status(), 202);
    }
}

async fn put(server: &TestServer, query: &str) -> u16 {
    server
        .client
        .put(format!("{}?{query}", server.url))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn ack(server: &TestServer, sse: &Sse, frames: &[&Frame]) {
    let ids: Vec<&str> = frames.iter().map(|f| f.id.as_deref().unwrap()).collect();
    let query = format!("consumer_id={}&event_id={}", sse.consumer_id, ids.join(","));
    assert_eq!(put(server, &query).await, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_holds_that_many_unacked_events_each_with_its_own_redelivery() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    publish_n(&server, "app.w", 0..10).await;
    let mut sse = server
        .subscribe("subject=app.w&start=oldest&ack=manual&max_inflight=3&redelivery=1500ms")
        .await;
    let first = sse.take(3).await;
    assert_eq!(first.iter().map(payload_n).collect::<Vec<_>>(), [0, 1, 2]);
    sse.expect_silence(QUIET).await;

    // Acking two (in one request) makes room for two more.
    ack(&server, &sse, &[&first[0], &first[2]]).await;
    let next = sse.take(2).await;
    assert_eq!(next.iter().map(payload_n).collect::<Vec<_>>(), [3, 4]);
    ack(&server, &sse, &[&next[0], &next[1]]).await;
    let fifth = sse.take(2).await;
    assert_eq!(fifth.iter().map(payload_n).collect::<Vec<_>>(), [5, 6]);

    // Event 1 was never acked: it comes back on its own timer, alone.
    let again = sse.next(WAIT).await.unwrap();
    assert_eq!(payload_n(&again), 1);
    assert_eq!(again.id, first[1].id);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nak_redelivers_now_or_after_its_delay() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    publish_n(&server, "app.n", 0..3).await;
    let mut sse = server
        .subscribe("subject=app.n&start=oldest&ack=manual&redelivery=30s")
        .await;
    let first = sse.next(WAIT).await.unwrap();
    let query = format!(
        "consumer_id={}&event_id={}&nak=1",
        sse.consumer_id,
        first.id.as_deref().unwrap()
    );
    assert_eq!(put(&server, &query).await, 202);
    let again = sse.next(WAIT).await.unwrap();
    assert_eq!(again.id, first.id, "a nak without delay redelivers at once");

    // With a delay, the slot goes to the next events meanwhile.
    let started = Instant::now();
    let query = format!("{query}&delay=800ms");
    assert_eq!(put(&server, &query).await, 202);
    let mut order = Vec::new();
    loop {
        let frame = sse.next(WAIT).await.unwrap();
        order.push(payload_n(&frame));
        if frame.id == first.id {
            break;
        }
        ack(&server, &sse, &[&frame]).await;
    }
    assert_eq!(order, [1, 2, 0]);
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );

    let bad = format!(
        "consumer_id={}&event_id={}&nak=1&delay=soon",
        sse.consumer_id,
        first.id.as_deref().unwrap()
    );
    assert_eq!(put(&server, &bad).await, 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_resumes_after_reconnects_and_restarts() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    publish_n(&server, "app.d", 0..10).await;
    let query =
        "subject=app.d&start=oldest&ack=manual&consumer=billing&max_inflight=4&redelivery=30s";

    let mut sse = server.subscribe(query).await;
    let got = sse.take(4).await;
    assert_eq!(got.iter().map(payload_n).collect::<Vec<_>>(), [0, 1, 2, 3]);
    ack(&server, &sse, &[&got[0], &got[1], &got[3]]).await; // 2 stays unacked
                                                            // Leave, and give the server a moment to see the connection close (until it does,
                                                            // the connection still holds what it was sent).
    drop(sse);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Reconnect: the unacked event first, then what follows; nothing acked again.
    let mut sse = server.subscribe(query).await;
    let got = sse.take(4).await;
    assert_eq!(got.iter().map(payload_n).collect::<Vec<_>>(), [2, 4, 5, 6]);
    ack(&server, &sse, &[&got[0], &got[1]]).await; // 5 and 6 stay unacked
    drop(sse);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A restart keeps the progress; `start` no longer applies.
    server.stop().await;
    let mut server = TestServer::start(data.path(), &[]).await;
    let restarted = query.replace("start=oldest", "start=newest");
    let mut sse = server.subscribe(&restarted).await;
    let got = sse.take(4).await;
    assert_eq!(got.iter().map(payload_n).collect::<Vec<_>>(), [5, 6, 7, 8]);
    let rest = sse.take(0).await;
    assert!(rest.is_empty());

    // Another pattern under the same name is a conflict.
    let response = server
        .request(
            reqwest::Method::GET,
            "subject=app.other&ack=manual&consumer=billing",
        )
        .await;
    assert_eq!(response.status(), 409);
    assert!(response.text().await.unwrap().contains("app.d"));
    let response = server
        .request(reqwest::Method::GET, "subject=app.d&consumer=billing")
        .await;
    assert_eq!(
        response.status(),
        400,
        "a durable consumer needs ack=manual"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_shares_events_exactly_once_even_when_a_member_leaves() {
    const EVENTS: i64 = 3000;
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    publish_n(&server, "app.q", 0..EVENTS).await;
    let query =
        "subject=app.q&start=oldest&ack=manual&consumer=workers&max_inflight=10&redelivery=60s";
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(server.subscribe(query).await);
    }

    let mut acked: HashSet<i64> = HashSet::new();
    let mut per_member = [0usize; 3];
    let mut leaver = Some(2usize);
    let deadline = Instant::now() + Duration::from_secs(60);
    while (acked.len() as i64) < EVENTS {
        assert!(
            Instant::now() < deadline,
            "only {} of {EVENTS} acked",
            acked.len()
        );
        for (i, member) in members.iter_mut().enumerate() {
            if leaver.is_none() && i == 2 {
                continue; // it left
            }
            let Some(frame) = member.next(Duration::from_millis(50)).await else {
                continue;
            };
            let n = payload_n(&frame);
            // Member 2 leaves after 300 events, holding its unacked window.
            if i == 2 && per_member[2] >= 300 && leaver.is_some() {
                leaver = None;
                continue;
            }
            let query = format!(
                "consumer_id={}&event_id={}",
                member.consumer_id,
                frame.id.as_deref().unwrap()
            );
            assert_eq!(put(&server, &query).await, 202);
            assert!(acked.insert(n), "event {n} processed twice");
            per_member[i] += 1;
        }
        if leaver.is_none() && members.len() == 3 {
            members.pop(); // closes member 2's stream
        }
    }
    assert_eq!(acked.len() as i64, EVENTS);
    assert!(
        per_member.iter().all(|&n| n > 0),
        "every member got work: {per_member:?}"
    );
    for member in &mut members {
        member.expect_silence(QUIET).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_event_goes_to_the_dead_letter_subject() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let mut dead = server.subscribe("subject=app._dead.>").await;
    server
        .publish(&json!({"subject": "app.jobs", "payload": {"job": 7}}))
        .await;
    let mut sse = server
        .subscribe("subject=app.jobs&start=oldest&ack=manual&consumer=fragile&redelivery=200ms&redelivery_count=2")
        .await;
    let first = sse.next(WAIT).await.unwrap();
    let second = sse.next(WAIT).await.unwrap();
    assert_eq!(first.id, second.id);

    let letter = dead.next(WAIT).await.expect("a dead letter");
    let letter = letter.json();
    assert_eq!(letter["subject"], "app._dead.fragile");
    assert_eq!(letter["payload"]["consumer"], "fragile");
    assert_eq!(letter["payload"]["deliveries"], 2);
    assert_eq!(letter["payload"]["event"]["id"], first.json()["id"]);
    assert_eq!(letter["payload"]["event"]["payload"], json!({"job": 7}));
    sse.expect_silence(QUIET).await;

    // A nak of the last allowed delivery gives the event up at once.
    let mut naker = server
        .subscribe("subject=app.jobs&start=oldest&ack=manual&consumer=naker&redelivery=30s&redelivery_count=1")
        .await;
    let only = naker.next(WAIT).await.unwrap();
    let query = format!(
        "consumer_id={}&event_id={}&nak=1",
        naker.consumer_id,
        only.id.as_deref().unwrap()
    );
    assert_eq!(put(&server, &query).await, 202);
    let letter = dead
        .next(Duration::from_secs(5))
        .await
        .expect("a dead letter after the nak");
    assert_eq!(letter.json()["subject"], "app._dead.naker");
    naker.expect_silence(QUIET).await;

    // Ephemeral consumers keep the reference behaviour: no dead letter.
    let mut ephemeral = server
        .subscribe("subject=app.jobs&start=oldest&ack=manual&redelivery=200ms&redelivery_count=1")
        .await;
    assert!(ephemeral.next(WAIT).await.is_some());
    dead.expect_silence(Duration::from_millis(600)).await;
    // Counted apart: the durable consumers' dead letters, the ephemeral one's drop (on
    // JetStream, when the storage serves the event again: waited for).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = server.metrics().await;
        let counted = (
            metric(&metrics, "bus_dead_letters_total", &[]),
            metric(&metrics, "bus_deliveries_given_up_total", &[]),
        );
        if counted == (Some(2.0), Some(1.0)) {
            break;
        }
        assert!(Instant::now() < deadline, "{counted:?}\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_are_listed_and_deleted() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &["--node-name", "n1"]).await;
    publish_n(&server, "app.l", 0..5).await;
    let mut sse = server
        .subscribe(
            "subject=app.l&start=oldest&ack=manual&consumer=lister&max_inflight=2&redelivery=30s",
        )
        .await;
    let got = sse.take(2).await;
    ack(&server, &sse, &[&got[0]]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let list = server.list_consumers("app").await;
    let consumer = &list[0];
    assert_eq!(consumer["name"], "lister");
    assert_eq!(consumer["pattern"], "app.l");
    assert_eq!(consumer["acked_floor"], 1);
    assert_eq!(consumer["lag"], 4);
    assert_eq!(consumer["members"], 1);
    assert_eq!(consumer["dead_letter_subject"], "app._dead.lister");
    assert!(consumer["pending"].as_u64().unwrap() >= 1);

    let metrics = server
        .client
        .get(format!("{}metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("bus_consumer_lag{node=\"n1\",namespace=\"app\",consumer=\"lister\"} 4"),
        "{metrics}"
    );

    let delete = |name: &'static str| {
        server
            .client
            .delete(format!("{}consumers/app/{name}", server.url))
            .send()
    };
    assert_eq!(delete("lister").await.unwrap().status(), 204);
    assert_eq!(delete("lister").await.unwrap().status(), 404);
    // Its member's stream ends with an error frame that says why.
    let mut last = None;
    while let Some(frame) = sse.next(WAIT).await {
        last = Some(frame);
    }
    let last = last.expect("frames before the end");
    assert_eq!(last.event.as_deref(), Some("error"));
    assert!(last.data[0].contains("deleted"), "{last:?}");
    let list = server.list_consumers("app").await;
    assert_eq!(list, json!([]));

    // Created again, `start` applies anew.
    let mut fresh = server
        .subscribe("subject=app.l&start=oldest&ack=manual&consumer=lister")
        .await;
    assert_eq!(payload_n(&fresh.next(WAIT).await.unwrap()), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_progress_cannot_be_read_is_storage_trouble_not_a_bad_request() {
    if crate::common::http::skip_unless_file_store() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    // Where the progress file of consumer "stuck" would be, a directory: reading and
    // removing it fail with an I/O error, which is the server's trouble, not the caller's.
    std::fs::create_dir_all(data.path().join("app/consumers/stuck.json")).unwrap();
    let response = server
        .client
        .delete(format!("{}consumers/app/stuck", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "retry-after"), "1");
    let text = response.text().await.unwrap();
    assert!(text.contains("server's log"), "{text}");
    assert!(!text.contains(data.path().to_str().unwrap()), "{text}");
    // Attaching to it needs its progress read: the same trouble, the same answer.
    let response = server
        .request(
            reqwest::Method::GET,
            "subject=app.>&ack=manual&consumer=stuck",
        )
        .await;
    assert_eq!(response.status(), 503);
    let text = response.text().await.unwrap();
    assert!(text.contains("server's log"), "{text}");
    assert!(!text.contains(data.path().to_str().unwrap()), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_consumer_can_always_be_deleted() {
    if crate::common::http::skip_unless_file_store() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let file = data.path().join("app/consumers/broken.json");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"{ not json").unwrap();
    let response = server
        .client
        .delete(format!("{}consumers/app/broken", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "{}", response.text().await.unwrap());
    assert!(!file.exists());
    server.stop().await;
}
