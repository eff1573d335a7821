//! Server-side confirmations and request/reply over real HTTP, with plain requests only
//! (no inbox handling on the client): `confirm=N`, `confirm_zones=K`, `reply=1`, and a
//! worker replying in the same call as its ack.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::http::*;

const WAIT: Duration = Duration::from_secs(10);

/// POSTs `event` with `query` in the background; resolves to (status, headers, body).
fn publish_waiting(
    server: &TestServer,
    query: &str,
    event: Value,
) -> tokio::task::JoinHandle<(u16, reqwest::header::HeaderMap, String)> {
    let request = server
        .client
        .post(format!("{}?{query}", server.url))
        .body(event.to_string());
    tokio::spawn(async move {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.text().await.unwrap())
    })
}

/// Receives the next event and acks it (optionally with a reply body).
async fn take_and_ack(server: &TestServer, sse: &mut Sse, reply: Option<Value>) -> Frame {
    let frame = sse.next(WAIT).await.expect("an event");
    let mut request = server.client.put(format!(
        "{}?consumer_id={}&event_id={}",
        server.url,
        sse.consumer_id,
        frame.id.as_deref().unwrap()
    ));
    if let Some(reply) = reply {
        request = request.body(reply.to_string());
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    frame
}

fn header_number(headers: &reqwest::header::HeaderMap, name: &str) -> u64 {
    headers[name].to_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_waits_for_distinct_consumers() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let mut a = server.subscribe("subject=app.c&ack=manual").await;
    let mut b = server.subscribe("subject=app.c&ack=manual").await;

    let publish = publish_waiting(
        &server,
        "confirm=2&timeout=5s",
        json!({"subject": "app.c", "payload": 1}),
    );
    take_and_ack(&server, &mut a, None).await;
    take_and_ack(&server, &mut b, None).await;
    let (status, headers, _) = publish.await.unwrap();
    assert_eq!(status, 202);
    assert_eq!(header_number(&headers, "x-bus-confirmed"), 2);
    assert!(headers["x-bus-event-id"]
        .to_str()
        .unwrap()
        .starts_with("e_"));

    // Three asked, two confirm: 504 after the timeout, saying how many did.
    let started = Instant::now();
    let publish = publish_waiting(
        &server,
        "confirm=3&timeout=1500ms",
        json!({"subject": "app.c", "payload": 2}),
    );
    take_and_ack(&server, &mut a, None).await;
    take_and_ack(&server, &mut b, None).await;
    let (status, headers, text) = publish.await.unwrap();
    assert_eq!(status, 504, "{text}");
    assert_eq!(header_number(&headers, "x-bus-confirmed"), 2);
    assert!(text.contains("2 of 3"), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(1450));

    // A batch cannot wait; a bad count is named.
    let response = server
        .client
        .post(format!("{}?confirm=1", server.url))
        .body(json!([{"subject": "app.c"}]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = server
        .client
        .post(format!("{}?confirm=two", server.url))
        .body(json!({"subject": "app.c"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_confirms_once_and_zones_count_separately() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let group = "subject=app.z&ack=manual&consumer=group&max_inflight=5";
    let mut g1 = server.subscribe(&format!("{group}&zone=eu")).await;
    let mut g2 = server.subscribe(&format!("{group}&zone=eu")).await;
    let mut us = server.subscribe("subject=app.z&ack=manual&zone=us").await;
    let mut asia = server.subscribe("subject=app.z&ack=manual&zone=asia").await;

    // Two events; the group acks both (whichever member gets them), as one consumer.
    let first = publish_waiting(
        &server,
        "confirm=3&timeout=5s",
        json!({"subject": "app.z", "payload": 1}),
    );
    let second = publish_waiting(
        &server,
        "confirm_zones=2&timeout=5s",
        json!({"subject": "app.z", "payload": 2}),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    for member in [&mut g1, &mut g2] {
        while let Some(frame) = member.next(Duration::from_millis(300)).await {
            let query = format!(
                "consumer_id={}&event_id={}",
                member.consumer_id,
                frame.id.unwrap()
            );
            server
                .client
                .put(format!("{}?{query}", server.url))
                .send()
                .await
                .unwrap();
        }
    }
    for _ in 0..2 {
        take_and_ack(&server, &mut us, None).await;
    }
    // Group (eu) + us: 2 consumers of 3 for the first, 2 zones of 2 for the second.
    let (status, headers, _) = second.await.unwrap();
    assert_eq!(status, 202);
    assert_eq!(header_number(&headers, "x-bus-confirmed-zones"), 2);
    assert_eq!(header_number(&headers, "x-bus-confirmed"), 2);
    for _ in 0..2 {
        take_and_ack(&server, &mut asia, None).await;
    }
    let (status, headers, _) = first.await.unwrap();
    assert_eq!(status, 202);
    assert_eq!(header_number(&headers, "x-bus-confirmed"), 3);

    // Four zones are not there to be had.
    let publish = publish_waiting(
        &server,
        "confirm_zones=4&timeout=1500ms",
        json!({"subject": "app.z"}),
    );
    for sse in [&mut us, &mut asia] {
        take_and_ack(&server, sse, None).await;
    }
    let (status, headers, _) = publish.await.unwrap();
    assert_eq!(status, 504);
    assert_eq!(header_number(&headers, "x-bus-confirmed-zones"), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_reply_in_one_call_each() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let mut worker = server.subscribe("subject=app.math&ack=manual").await;

    let request = publish_waiting(
        &server,
        "reply=1&timeout=5s",
        json!({"subject": "app.math", "payload": {"a": 1, "b": 2}}),
    );
    let frame = take_and_ack(&server, &mut worker, Some(json!({"sum": 3}))).await;
    let question = frame.json();
    assert_eq!(question["payload"], json!({"a": 1, "b": 2}));
    assert!(question["response_subject"]
        .as_str()
        .unwrap()
        .starts_with("_bus_."));
    let (status, headers, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"sum": 3})
    );
    assert_eq!(headers["x-bus-event-id"].to_str().unwrap(), question["id"]);

    // Nobody answers: 504.
    let request = publish_waiting(
        &server,
        "reply=1&timeout=300ms",
        json!({"subject": "app.math", "payload": {}}),
    );
    let _ = take_and_ack(&server, &mut worker, None).await;
    let (status, _, body) = request.await.unwrap();
    assert_eq!(status, 504, "{body}");

    // A reply to an event that asked for none is refused (409: the event's state, not the
    // request, is wrong); so is a body that is not JSON (400).
    server
        .publish(&json!({"subject": "app.math", "payload": 0}))
        .await;
    let frame = worker.next(WAIT).await.unwrap();
    let url = format!(
        "{}?consumer_id={}&event_id={}",
        server.url,
        worker.consumer_id,
        frame.id.unwrap()
    );
    let response = server
        .client
        .put(&url)
        .body("{\"x\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("no response_subject"));
    let response = server
        .client
        .put(&url)
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_asks_and_answers_in_one_call_each() {
    use bus::client::{AckMode, Client, NewEvent, Received, SubscribeOptions};
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let client = Client::new(&server.url).unwrap();
    let mut options = SubscribeOptions::new("app.ask");
    options.ack = AckMode::Manual {
        redelivery: None,
        max_deliveries: None,
    };
    let mut worker = client.subscribe(options).await.unwrap();
    let answering = tokio::spawn(async move {
        let Some(Ok(Received::Event(event))) = worker.next().await else {
            panic!("no request");
        };
        let answer = serde_json::value::to_raw_value(&json!({"echo": event.payload})).unwrap();
        worker.reply(&event, &answer).await.unwrap();
    });
    let question = NewEvent {
        subject: "app.ask".into(),
        payload: Some(serde_json::value::to_raw_value(&json!(7)).unwrap()),
        ..NewEvent::default()
    };
    let answer = client.request(&question, WAIT).await.unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&answer).unwrap(),
        json!({"echo": 7})
    );
    answering.await.unwrap();
    let unanswered = client.request(&question, Duration::from_millis(300)).await;
    assert!(
        matches!(unanswered, Err(bus::client::ClientError::Timeout(_))),
        "{unanswered:?}"
    );
    server.stop().await;
}
