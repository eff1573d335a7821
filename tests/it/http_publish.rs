//! `POST /` over real HTTP: response headers, validation and its plain-text errors,
//! deduplication, batches, and payloads of every JSON type coming back byte for byte.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::http::*;

async fn server() -> (tempfile::TempDir, TestServer) {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(data.path(), &[]).await;
    (data, server)
}

/// Status and body of a POST.
async fn post(server: &TestServer, body: impl Into<reqwest::Body>) -> (u16, String, String) {
    let response = server.post(body).await;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_answers_202_with_id_time_and_index() {
    let (_data, mut server) = server().await;
    let response = server
        .post(json!({"subject": "app.created", "payload": {"n": 1}}).to_string())
        .await;
    assert_eq!(response.status(), 202);
    let headers = response.headers().clone();
    assert!(response.text().await.unwrap().is_empty(), "empty body");
    let id = headers["x-bus-event-id"].to_str().unwrap();
    assert!(id.starts_with("e_"), "{id}");
    let created = headers["x-bus-event-created-at"].to_str().unwrap();
    assert!(
        bus::timestamp::Timestamp::parse(created).is_ok() && created.len() == 30,
        "RFC 3339 with nanoseconds: {created}"
    );
    assert_eq!(headers["x-bus-event-index"], "0");

    let second = server.publish(&json!({"subject": "orders.x"})).await;
    assert_eq!(second.index, 0, "positions are per namespace");
    let third = server.publish(&json!({"subject": "app.created"})).await;
    assert_eq!(third.index, 1);
    assert_ne!(third.id, id);

    // What the headers said is what subscribers get.
    let mut sse = server.subscribe("subject=app.>&start=oldest").await;
    let frames = sse.take(2).await;
    assert_eq!(frames[0].id.as_deref(), Some(id));
    assert_eq!(frames[0].json()["id"], id);
    assert_eq!(frames[0].json()["created_at"], created);
    assert_eq!(frames[0].json()["index"], 0);
    assert_eq!(frames[1].json()["index"], 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_400_with_a_plain_text_reason() {
    let (_data, mut server) = server().await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", b"hello".to_vec(), "JSON"),
        ("broken JSON", br#"{"subject":"app.a""#.to_vec(), "JSON"),
        ("empty body", b"".to_vec(), "empty"),
        (
            "trailing bytes",
            br#"{"subject":"app.a"} {"#.to_vec(),
            "JSON",
        ),
        (
            "invalid UTF-8",
            b"{\"subject\":\"app.a\",\"payload\":\"\xff\"}".to_vec(),
            "UTF-8",
        ),
        ("missing subject", br#"{"payload":1}"#.to_vec(), "subject"),
        ("empty subject", br#"{"subject":""}"#.to_vec(), "subject"),
        (
            "single segment",
            br#"{"subject":"app"}"#.to_vec(),
            "subject",
        ),
        (
            "empty segment",
            br#"{"subject":"app..a"}"#.to_vec(),
            "subject",
        ),
        (
            "trailing dot",
            br#"{"subject":"app.a."}"#.to_vec(),
            "subject",
        ),
        ("space", br#"{"subject":"app.a b"}"#.to_vec(), "subject"),
        (
            "wildcard *",
            br#"{"subject":"app.*"}"#.to_vec(),
            "subscribing",
        ),
        (
            "wildcard >",
            br#"{"subject":"app.>"}"#.to_vec(),
            "subscribing",
        ),
        (
            "bad payload",
            br#"{"subject":"app.a","payload":{"x":}}"#.to_vec(),
            "JSON",
        ),
        (
            "bad created_at",
            br#"{"subject":"app.a","created_at":"yesterday"}"#.to_vec(),
            "created_at",
        ),
        (
            "bad id",
            br#"{"subject":"app.a","id":"x y"}"#.to_vec(),
            "id",
        ),
        ("empty batch", b"[]".to_vec(), "empty"),
        ("scalar body", b"42".to_vec(), "object"),
        (
            "mixed namespaces",
            br#"[{"subject":"app.a"},{"subject":"orders.a"}]"#.to_vec(),
            "namespace",
        ),
        (
            "inbox in a batch",
            br#"[{"subject":"_bus_.a"},{"subject":"_bus_.a"}]"#.to_vec(),
            "batch",
        ),
        (
            "reply in a batch",
            br#"[{"subject":"app.a","response_subject":"_bus_.r"},{"subject":"app.b"}]"#.to_vec(),
            "response_subject",
        ),
        (
            "bad response subject",
            br#"{"subject":"app.a","response_subject":"no"}"#.to_vec(),
            "response_subject",
        ),
    ];
    for (what, body, expected) in cases {
        let (status, content_type, text) = post(&server, body).await;
        assert_eq!(status, 400, "{what}: {text}");
        assert!(
            content_type.starts_with("text/plain"),
            "{what}: {content_type}"
        );
        assert!(
            text.contains(expected),
            "{what}: {text:?} should mention {expected:?}"
        );
    }

    let (status, _, text) = post(&server, json!({"subject": "billing.x"}).to_string()).await;
    assert_eq!(status, 400);
    assert!(text.contains("\"billing\""), "names the namespace: {text}");
    assert!(
        text.contains("app, orders"),
        "lists the configured ones: {text}"
    );

    let huge = format!(
        r#"{{"subject":"app.a","payload":"{}"}}"#,
        "x".repeat(9 << 20)
    );
    let (status, content_type, text) = post(&server, huge).await;
    assert_eq!(status, 413, "{text}");
    assert!(content_type.starts_with("text/plain"));
    assert!(text.contains("8 MiB"), "{text}");

    // Nothing of the above was stored.
    let mut sse = server.subscribe("subject=app.>&start=oldest").await;
    sse.expect_silence(Duration::from_millis(300)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_of_every_json_type_round_trip_byte_for_byte() {
    let (_data, mut server) = server().await;
    // Raw payload texts as a client writes them, and the compact form that must come back.
    let cases: Vec<(&str, &str)> = vec![
        ("{\"a\":1}", "{\"a\":1}"),
        ("[1,2,3]", "[1,2,3]"),
        ("\"text\"", "\"text\""),
        ("12.50", "12.50"),
        ("-0.0e-7", "-0.0e-7"),
        (
            "123456789012345678901234567890",
            "123456789012345678901234567890",
        ),
        ("true", "true"),
        ("false", "false"),
        ("null", "null"),
        ("{}", "{}"),
        ("[]", "[]"),
        ("\"\"", "\"\""),
        ("\"héllo wörld ✓ 😀\"", "\"héllo wörld ✓ 😀\""),
        (
            "\"\\u00e9 \\n \\\" \\\\ \\/ \\t \\ud83d\\ude00\"",
            "\"\\u00e9 \\n \\\" \\\\ \\/ \\t \\ud83d\\ude00\"",
        ),
        (
            "{\n  \"pretty\" : [ 1 ,\n  2 ],\r\n\t\"s\": \"keep  these  spaces\"\n}",
            "{\"pretty\":[1,2],\"s\":\"keep  these  spaces\"}",
        ),
        (
            "{\"z\":1,\"a\":2,\"z2\":{\"nested\":[{\"deep\":true}]}}",
            "{\"z\":1,\"a\":2,\"z2\":{\"nested\":[{\"deep\":true}]}}",
        ),
    ];
    for (raw, _) in &cases {
        let body = format!("{{\"subject\":\"app.payload\",\"payload\":{raw}}}");
        let (status, _, text) = post(&server, body).await;
        assert_eq!(status, 202, "{raw}: {text}");
    }
    let mut sse = server.subscribe("subject=app.payload&start=oldest").await;
    let frames = sse.take(cases.len()).await;
    for (frame, (raw, compact)) in frames.iter().zip(&cases) {
        assert_eq!(frame.data.len(), 1, "{raw}: one data line");
        let data = &frame.data[0];
        let expected_tail = format!(",\"payload\":{compact},\"index\":");
        assert!(data.contains(&expected_tail), "{raw}: got {data}");
        // And it is valid JSON whose payload equals the original value.
        let original: Value = serde_json::from_str(raw).unwrap();
        assert_eq!(frame.json()["payload"], original, "{raw}");
    }
    // The raw stream never carries a newline inside a data line.
    let raw_stream = String::from_utf8(sse.raw.clone()).unwrap();
    for line in raw_stream.split('\n').filter(|l| !l.is_empty()) {
        assert!(
            line.starts_with("id: ")
                || line.starts_with("event: ")
                || line.starts_with("data: ")
                || line.starts_with(':'),
            "stray line {line:?}"
        );
    }

    // An event without payload has no payload member.
    server.publish(&json!({"subject": "app.empty"})).await;
    let mut sse = server.subscribe("subject=app.empty&start=oldest").await;
    let frame = &sse.take(1).await[0];
    assert!(frame.json().get("payload").is_none(), "{frame:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_fields_are_stored_and_omitted_when_empty() {
    let (_data, mut server) = server().await;
    server
        .publish(&json!({
            "subject": "app.full",
            "trace_id": "trace-1",
            "key": "k-1",
            "response_subject": "_bus_.reply1",
            "payload": {"x": "y"},
            "index": 999,
            "unknown_field": "ignored"
        }))
        .await;
    // What the Go SDK sends for an unset id and time.
    server
        .publish(&json!({
            "id": "",
            "subject": "app.bare",
            "created_at": "0001-01-01T00:00:00Z",
            "payload": null
        }))
        .await;
    let mut sse = server.subscribe("subject=app.*&start=oldest").await;
    let frames = sse.take(2).await;
    let full = frames[0].json();
    assert_eq!(full["trace_id"], "trace-1");
    assert_eq!(full["key"], "k-1");
    assert_eq!(full["response_subject"], "_bus_.reply1");
    assert_eq!(full["index"], 0, "index is the server's");
    assert!(full.get("unknown_field").is_none());
    let bare = frames[1].json();
    for absent in ["trace_id", "key", "response_subject"] {
        assert!(bare.get(absent).is_none(), "{absent} omitted: {bare}");
    }
    assert_eq!(
        bare.get("payload"),
        Some(&Value::Null),
        "null is kept: {bare}"
    );
    assert_ne!(
        bare["created_at"], "0001-01-01T00:00:00Z",
        "assigned by the server"
    );
    assert!(bare["id"].as_str().unwrap().starts_with("e_"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_supplied_ids_and_times_are_kept_and_ids_stay_unique() {
    let (_data, mut server) = server().await;
    let published = server
        .publish(&json!({
            "id": "e_cn0vq1g2ps3c73b6vvqg",
            "created_at": "2024-01-02T03:04:05.5+01:00",
            "subject": "app.restored"
        }))
        .await;
    assert_eq!(published.id, "e_cn0vq1g2ps3c73b6vvqg");
    assert_eq!(published.created_at, "2024-01-02T02:04:05.500000000Z");
    let (status, content_type, text) = post(
        &server,
        json!({"id": "e_cn0vq1g2ps3c73b6vvqg", "subject": "app.restored"}).to_string(),
    )
    .await;
    assert_eq!(status, 409, "{text}");
    assert!(content_type.starts_with("text/plain"));
    assert!(text.contains("e_cn0vq1g2ps3c73b6vvqg"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_are_409_per_subject() {
    let (_data, mut server) = server().await;
    server
        .publish(&json!({"subject": "app.a", "key": "k1"}))
        .await;
    let (status, _, text) = post(
        &server,
        json!({"subject": "app.a", "key": "k1"}).to_string(),
    )
    .await;
    assert_eq!(status, 409);
    assert!(text.contains("k1"), "{text}");
    server
        .publish(&json!({"subject": "app.b", "key": "k1"}))
        .await;
    server
        .publish(&json!({"subject": "app.a", "key": "k2"}))
        .await;
    server.publish(&json!({"subject": "app.a"})).await;
    server.publish(&json!({"subject": "app.a"})).await;

    // A batch with one duplicate is refused whole, and registers none of its keys.
    let (status, _, _) = post(
        &server,
        json!([
            {"subject": "app.a", "key": "new-1"},
            {"subject": "app.a", "key": "k1"},
        ])
        .to_string(),
    )
    .await;
    assert_eq!(status, 409);
    server
        .publish(&json!({"subject": "app.a", "key": "new-1"}))
        .await;
    // Twice in one batch is a duplicate too.
    let (status, _, _) = post(
        &server,
        json!([{"subject": "app.a", "key": "twice"}, {"subject": "app.a", "key": "twice"}])
            .to_string(),
    )
    .await;
    assert_eq!(status, 409);

    let mut sse = server.subscribe("subject=app.*&start=oldest").await;
    let frames = sse.take(6).await;
    let keys: Vec<Value> = frames.iter().map(|f| f.json()["key"].clone()).collect();
    assert_eq!(
        keys,
        vec![
            json!("k1"),
            json!("k1"),
            json!("k2"),
            Value::Null,
            Value::Null,
            json!("new-1")
        ]
    );
    sse.expect_silence(Duration::from_millis(300)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_window_size_ttl_and_restart() {
    let data = tempfile::tempdir().unwrap();
    let mut server =
        TestServer::start(data.path(), &["--dup-size", "2", "--dup-ttl", "400ms"]).await;
    for key in ["a", "b", "c"] {
        server
            .publish(&json!({"subject": "app.k", "key": key}))
            .await;
    }
    // "a" was pushed out of the window of 2.
    server
        .publish(&json!({"subject": "app.k", "key": "a"}))
        .await;
    let (status, _, _) = post(&server, json!({"subject": "app.k", "key": "c"}).to_string()).await;
    assert_eq!(status, 409);
    tokio::time::sleep(Duration::from_millis(500)).await;
    server
        .publish(&json!({"subject": "app.k", "key": "c"}))
        .await;
    server.stop().await;

    // The window is rebuilt from the log after a restart.
    let mut server = TestServer::start(data.path(), &[]).await;
    for key in ["a", "b", "c"] {
        let (status, _, text) =
            post(&server, json!({"subject": "app.k", "key": key}).to_string()).await;
        assert_eq!(status, 409, "{key} remembered across the restart: {text}");
    }
    server.stop().await;

    // --dup-size 0 turns deduplication off.
    let mut server = TestServer::start(data.path(), &["--dup-size", "0"]).await;
    server
        .publish(&json!({"subject": "app.k", "key": "a"}))
        .await;
    server
        .publish(&json!({"subject": "app.k", "key": "a"}))
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_atomic_ordered_and_contiguous() {
    let (_data, mut server) = server().await;
    let batch: Vec<Value> = (0..50)
        .map(|i| json!({"subject": format!("app.b{}", i % 3), "payload": i}))
        .collect();
    let response = server.post(Value::Array(batch).to_string()).await;
    assert_eq!(response.status(), 202);
    let last_index = response.headers()["x-bus-event-index"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(last_index, "49", "headers describe the batch's last event");

    // Concurrent batches interleave as wholes, never event by event.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let client = server.client.clone();
        let url = server.url.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..10 {
                let batch: Vec<Value> = (0..5)
                    .map(|i| json!({"subject": "app.c", "payload": {"t": t, "b": b, "i": i}}))
                    .collect();
                let response = client
                    .post(&url)
                    .body(Value::Array(batch).to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut sse = server.subscribe("subject=app.>&start=oldest").await;
    let frames = sse.take(50 + 200).await;
    for (i, frame) in frames[..50].iter().enumerate() {
        assert_eq!(frame.json()["payload"], i);
        assert_eq!(frame.json()["index"], i);
    }
    for chunk in frames[50..].chunks(5) {
        let first = chunk[0].json()["payload"].clone();
        for (i, frame) in chunk.iter().enumerate() {
            let p = &frame.json()["payload"];
            assert_eq!(
                (&p["t"], &p["b"], &p["i"]),
                (&first["t"], &first["b"], &json!(i))
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_key_refusals_start_with_the_reference_wording() {
    // The Go SDK makes the 409 body its error text; applications match its first words.
    let (_data, mut server) = server().await;
    server
        .publish(&json!({"subject": "app.a", "key": "k1"}))
        .await;
    let (status, _, text) = post(
        &server,
        json!({"subject": "app.a", "key": "k1"}).to_string(),
    )
    .await;
    assert_eq!(status, 409);
    assert!(text.starts_with("key was processed before"), "{text}");
    assert!(text.contains("k1"), "{text}");
    let (status, _, text) = post(
        &server,
        json!([{"subject": "app.a", "key": "k2"}, {"subject": "app.a", "key": "k1"}]).to_string(),
    )
    .await;
    assert_eq!(status, 409);
    assert!(text.starts_with("key was processed before"), "{text}");
    assert!(text.contains("event 1 of the batch"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_data, mut server) = server().await;
    let address = server
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    for n in 0..10 {
        let body = json!({"subject": "app.half", "payload": n}).to_string();
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream
            .write_all(
                format!(
                    "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        stream.shutdown().await.unwrap(); // as `nc -N` does
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
            .await
            .expect("the answer comes")
            .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 202"),
            "publish {n}: {answer:?}"
        );
        assert!(
            answer
                .to_ascii_lowercase()
                .contains(&format!("x-bus-event-index: {n}")),
            "{answer}"
        );
    }
    server.stop().await;
}

/// A body over the limit is not read to its end, so its connection is closed after the
/// 413: the answer says so (`Connection: close`), and a client that pools connections
/// sends its next request on a new one instead of into the closing one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_closes_its_connection_and_says_so() {
    let (_data, mut server) = server().await;
    let huge = format!(
        r#"{{"subject":"app.a","payload":"{}"}}"#,
        "x".repeat(9 << 20)
    );
    for round in 0..10 {
        let refused = server.post(huge.clone()).await;
        assert_eq!(refused.status(), 413);
        assert_eq!(refused.headers()["connection"], "close", "round {round}");
        let next = server
            .client
            .get(format!("{}healthz", server.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}: the next request failed: {e:?}"));
        assert_eq!(next.status(), 200);
    }
    server.stop().await;
}
