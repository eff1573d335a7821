//! Inbox subjects (`_bus_.…`) and the request/reply and confirmation flows over plain
//! HTTP; and the CORS headers every response carries.

use std::time::Duration;

use serde_json::json;

use crate::common::http::*;

async fn server() -> (tempfile::TempDir, TestServer) {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(data.path(), &[]).await;
    (data, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_events_live_in_memory_for_exact_subscribers_only() {
    let (_data, mut server) = server().await;
    let mut exact = server.subscribe("subject=_bus_.x").await;
    let mut other = server.subscribe("subject=_bus_.y").await;
    let mut namespace = server.subscribe("subject=app.>").await;

    let published = server
        .publish(&json!({"subject": "_bus_.x", "payload": {"n": 1}}))
        .await;
    assert_eq!(published.index, -1);
    assert!(published.id.starts_with("e_"), "{}", published.id);
    let frame = exact.take(1).await.remove(0);
    assert_eq!(frame.id.as_deref(), Some(published.id.as_str()));
    let event = frame.json();
    assert_eq!(event["index"], -1);
    assert_eq!(event["payload"], json!({"n": 1}));
    assert_eq!(event["subject"], "_bus_.x");

    other.expect_silence(Duration::from_millis(300)).await;
    namespace.expect_silence(Duration::from_millis(10)).await;
    // No history: a later subscriber gets nothing, whatever its start.
    let mut late = server.subscribe("subject=_bus_.x&start=oldest").await;
    late.expect_silence(Duration::from_millis(300)).await;
    // Nobody listening is not an error.
    let unheard = server.publish(&json!({"subject": "_bus_.nobody"})).await;
    assert_eq!(unheard.index, -1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_wildcards_and_batches_are_refused() {
    let (_data, mut server) = server().await;
    for query in ["subject=_bus_.*", "subject=_bus_.>"] {
        let response = server.request(reqwest::Method::GET, query).await;
        assert_eq!(response.status(), 400, "{query}");
    }
    let response = server
        .post(json!([{"subject": "_bus_.x"}]).to_string())
        .await;
    assert_eq!(response.status(), 400);
    server.stop().await;
}

/// The requester listens on an inbox, publishes a request naming it as response subject;
/// the worker acks and replies to that subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_over_plain_http() {
    let (_data, mut server) = server().await;
    let mut inbox = server.subscribe("subject=_bus_.r1").await;
    server
        .publish(&json!({"subject": "app.math", "response_subject": "_bus_.r1", "payload": {"a": 2, "b": 3}}))
        .await;

    let mut worker = server
        .subscribe("subject=app.math&start=oldest&ack=manual")
        .await;
    let request = worker.take(1).await.remove(0);
    let event = request.json();
    assert_eq!(event["response_subject"], "_bus_.r1");
    let sum = event["payload"]["a"].as_i64().unwrap() + event["payload"]["b"].as_i64().unwrap();
    assert_eq!(
        server
            .ack(&worker.consumer_id, event["id"].as_str().unwrap())
            .await,
        202
    );
    server
        .publish(&json!({"subject": event["response_subject"], "payload": {"sum": sum}}))
        .await;

    let reply = inbox.take(1).await.remove(0);
    assert_eq!(reply.json()["payload"], json!({"sum": 5}));
    // Acknowledged: the request is not delivered again.
    worker.expect_silence(Duration::from_millis(500)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmations_from_two_workers() {
    let (_data, mut server) = server().await;
    let mut workers = [
        server.subscribe("subject=app.jobs&ack=manual").await,
        server.subscribe("subject=app.jobs&ack=manual").await,
    ];
    let mut inbox = server.subscribe("subject=_bus_.confirm1").await;
    server
        .publish(&json!({"subject": "app.jobs", "response_subject": "_bus_.confirm1", "payload": "work"}))
        .await;
    for (n, worker) in workers.iter_mut().enumerate() {
        let job = worker.take(1).await.remove(0).json();
        assert_eq!(
            server
                .ack(&worker.consumer_id, job["id"].as_str().unwrap())
                .await,
            202
        );
        server
            .publish(&json!({"subject": job["response_subject"], "payload": {"worker": n}}))
            .await;
    }
    let confirmations = inbox.take(2).await;
    let mut who: Vec<i64> = confirmations
        .iter()
        .map(|c| c.json()["payload"]["worker"].as_i64().unwrap())
        .collect();
    who.sort_unstable();
    assert_eq!(who, [0, 1]);
    inbox.expect_silence(Duration::from_millis(300)).await;
    server.stop().await;
}

const CORS: [(&str, &str); 4] = [
    ("access-control-allow-origin", "*"),
    ("access-control-allow-methods", "GET, POST, PUT, DELETE, OPTIONS"),
    (
        "access-control-allow-headers",
        "Content-Type, Authorization, Last-Event-ID, X-BUS-EVENT-ID, X-BUS-EVENT-CREATED-AT, X-BUS-EVENT-INDEX, X-BUS-CONSUMER-ID",
    ),
    (
        "access-control-expose-headers",
        "X-BUS-EVENT-ID, X-BUS-EVENT-CREATED-AT, X-BUS-EVENT-INDEX, X-BUS-CONSUMER-ID, X-BUS-CONFIRMED, X-BUS-CONFIRMED-ZONES",
    ),
];

fn assert_cors(what: &str, response: &reqwest::Response) {
    for (name, value) in CORS {
        assert_eq!(header(response, name), value, "{what}: {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_the_cors_headers() {
    let (_data, mut server) = server().await;
    let client = &server.client;
    let url = &server.url;

    let preflight = client
        .request(reqwest::Method::OPTIONS, url)
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    assert_cors("preflight", &preflight);

    let published = server
        .post(json!({"subject": "app.a", "key": "k"}).to_string())
        .await;
    assert_eq!(published.status(), 202);
    assert_cors("202", &published);
    let duplicate = server
        .post(json!({"subject": "app.a", "key": "k"}).to_string())
        .await;
    assert_eq!(duplicate.status(), 409);
    assert_cors("409", &duplicate);
    let bad = server.post("nope").await;
    assert_eq!(bad.status(), 400);
    assert_cors("400", &bad);
    let no_subject = client.get(url).send().await.unwrap();
    assert_eq!(no_subject.status(), 400);
    assert_cors("GET without subject", &no_subject);
    let elsewhere = client.get(format!("{url}elsewhere")).send().await.unwrap();
    assert_eq!(elsewhere.status(), 404);
    assert_cors("404", &elsewhere);
    let ack = client
        .put(format!("{url}?consumer_id=c_1&event_id=e_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(ack.status(), 202);
    assert_cors("ack", &ack);
    let stream = client
        .get(format!("{url}?subject=app.a"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_cors("event stream", &stream);
    drop(stream);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflights_are_answered_on_every_route() {
    let (_data, mut server) = server().await;
    for path in [
        "",
        "metrics",
        "readyz",
        "healthz",
        "consumers/app",
        "consumers/app/billing",
        "elsewhere",
    ] {
        let preflight = server
            .client
            .request(reqwest::Method::OPTIONS, format!("{}{path}", server.url))
            .header("Origin", "https://app.example")
            .header("Access-Control-Request-Method", "GET")
            .send()
            .await
            .unwrap();
        assert_eq!(preflight.status(), 204, "/{path}");
        assert_cors(&format!("preflight of /{path}"), &preflight);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflights_from_origins_not_allowed_are_refused_on_every_route() {
    let data = tempfile::tempdir().unwrap();
    let mut server =
        TestServer::start(data.path(), &["--cors-origins", "https://app.example"]).await;
    for (origin, status) in [("https://app.example", 204), ("https://evil.example", 403)] {
        for path in ["", "metrics", "consumers/app"] {
            let preflight = server
                .client
                .request(reqwest::Method::OPTIONS, format!("{}{path}", server.url))
                .header("Origin", origin)
                .header("Access-Control-Request-Method", "GET")
                .send()
                .await
                .unwrap();
            assert_eq!(preflight.status(), status, "{origin} /{path}");
        }
    }
    server.stop().await;
}
