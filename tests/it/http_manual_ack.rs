//! `ack=manual` and `PUT /` over real HTTP: stop-and-wait delivery, redelivery after the
//! interval, giving up after `redelivery_count` deliveries, acks of redelivered copies,
//! unlimited redelivery, and the validation of acks.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::http::*;

const MANUAL: &str = "subject=app.jobs&start=oldest&ack=manual&redelivery=300ms";

async fn server() -> (tempfile::TempDir, TestServer) {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(data.path(), &[]).await;
    (data, server)
}

fn payload(frame: &Frame) -> serde_json::Value {
    frame.json()["payload"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_events_are_redelivered_then_given_up() {
    let (_data, mut server) = server().await;
    server.publish_numbered("app.jobs", 2).await;
    let mut sse = server
        .subscribe(&format!("{MANUAL}&redelivery_count=3"))
        .await;
    let started = Instant::now();
    let deliveries = sse.take(3).await;
    for frame in &deliveries {
        assert_eq!(payload(frame), 0, "the first event, again and again");
        assert_eq!(frame.id, deliveries[0].id);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "two redelivery intervals passed before the third delivery"
    );
    // After its third delivery the first event is dropped; the second comes next.
    let next = sse.take(1).await;
    assert_eq!(payload(&next[0]), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_stops_redelivery_and_releases_the_next_event() {
    let (_data, mut server) = server().await;
    server.publish_numbered("app.jobs", 3).await;
    let mut sse = server.subscribe(MANUAL).await;

    // Stop-and-wait: nothing else comes while event 0 is unacknowledged…
    let first = sse.take(1).await.remove(0);
    assert_eq!(payload(&first), 0);
    let id0 = first.id.clone().unwrap();
    assert_eq!(server.ack(&sse.consumer_id, &id0).await, 202);
    // …and once it is acked, event 1 follows and 0 never returns.
    let second = sse.take(1).await.remove(0);
    assert_eq!(payload(&second), 1);

    // Ack only the redelivered copy of event 1.
    let again = sse.take(1).await.remove(0);
    assert_eq!(again.id, second.id, "redelivered");
    assert_eq!(
        server
            .ack(&sse.consumer_id, again.id.as_deref().unwrap())
            .await,
        202
    );
    let third = sse.take(1).await.remove(0);
    assert_eq!(payload(&third), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_of_zero_or_less_redelivers_without_limit() {
    let (_data, mut server) = server().await;
    server.publish_numbered("app.jobs", 2).await;
    for count in ["0", "-1"] {
        let mut sse = server
            .subscribe(&format!(
                "subject=app.jobs&start=oldest&ack=manual&redelivery=100ms&redelivery_count={count}"
            ))
            .await;
        let frames = sse.take(6).await;
        assert!(
            frames.iter().all(|f| payload(f) == 0),
            "count {count}: still the first event after 6 deliveries"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_for_someone_or_something_else_do_not_count() {
    let (_data, mut server) = server().await;
    let ids = server.publish_numbered("app.jobs", 2).await;
    let mut sse = server.subscribe(MANUAL).await;
    let mut other = server.subscribe(MANUAL).await;
    assert_eq!(payload(&sse.take(1).await[0]), 0);
    assert_eq!(payload(&other.take(1).await[0]), 0);

    // The other consumer's ack, and an ack of another event, leave `sse` waiting.
    assert_eq!(server.ack(&other.consumer_id, &ids[0]).await, 202);
    assert_eq!(server.ack(&sse.consumer_id, &ids[1]).await, 202);
    let redelivered = sse.take(1).await;
    assert_eq!(payload(&redelivered[0]), 0);
    assert_eq!(
        payload(&other.take(1).await[0]),
        1,
        "the other consumer moved on"
    );

    // Late acks are normal: unknown consumer, consumer gone.
    assert_eq!(server.ack("c_unknown", &ids[0]).await, 202);
    let gone = sse.consumer_id.clone();
    drop(sse);
    assert_eq!(server.ack(&gone, &ids[0]).await, 202);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_matching_events_reach_a_manual_consumer() {
    let (_data, mut server) = server().await;
    server
        .publish(&json!({"subject": "app.other", "payload": "x"}))
        .await;
    server
        .publish(&json!({"subject": "app.jobs", "payload": "job"}))
        .await;
    server
        .publish(&json!({"subject": "app.jobs.sub", "payload": "y"}))
        .await;
    let mut sse = server.subscribe(MANUAL).await;
    let frame = sse.take(1).await.remove(0);
    assert_eq!(payload(&frame), "job");
    assert_eq!(
        server
            .ack(&sse.consumer_id, frame.id.as_deref().unwrap())
            .await,
        202
    );
    sse.expect_silence(Duration::from_millis(500)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_sdk_empty_parameters_mean_5s_and_3() {
    let (_data, mut server) = server().await;
    server.publish_numbered("app.jobs", 1).await;
    for query in [
        "subject=app.jobs&start=oldest&ack=manual&redelivery=&redelivery_count=",
        "subject=app.jobs&start=oldest&ack=manual&redelivery=0s&redelivery_count=",
        "subject=app.jobs&start=oldest&ack=manual&redelivery=0&redelivery_count=",
    ] {
        let mut sse = server.subscribe(query).await;
        assert_eq!(sse.take(1).await.len(), 1);
        // The default redelivery interval is 5 s: nothing within one second.
        sse.expect_silence(Duration::from_secs(1)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_are_validated() {
    let (_data, mut server) = server().await;
    let cases = [
        "",
        "consumer_id=c_1",
        "event_id=e_1",
        "consumer_id=&event_id=e_1",
        "consumer_id=x_1&event_id=e_1",
        "consumer_id=c_1&event_id=x_1",
    ];
    for query in cases {
        let response = server.request(reqwest::Method::PUT, query).await;
        assert_eq!(response.status(), 400, "{query}");
        assert!(header(&response, "content-type").starts_with("text/plain"));
        let text = response.text().await.unwrap();
        assert!(text.contains("_id"), "{query}: {text}");
    }
    server.stop().await;
}
