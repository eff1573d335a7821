//! `GET /` over real HTTP: patterns, start positions, `Last-Event-ID`, the SSE wire
//! format, keep-alive pings, catching up to live under concurrent publishing without a
//! gap or a duplicate, slow readers, and streams ending cleanly at shutdown.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::http::*;

async fn server_with(args: &[&str]) -> (tempfile::TempDir, TestServer) {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(data.path(), args).await;
    (data, server)
}

fn subjects(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f.json()["subject"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_match_exactly_what_they_should() {
    let (_data, mut server) = server_with(&[]).await;
    let published = [
        "app.a",
        "app.b",
        "app.a.b",
        "app.a.b.c",
        "app.x.b",
        "app.ab",
        "orders.a",
    ];
    for subject in published {
        server.publish(&json!({"subject": subject})).await;
    }
    let cases: &[(&str, &[&str])] = &[
        ("app.a", &["app.a"]),
        ("app.*", &["app.a", "app.b", "app.ab"]),
        (
            "app.>",
            &[
                "app.a",
                "app.b",
                "app.a.b",
                "app.a.b.c",
                "app.x.b",
                "app.ab",
            ],
        ),
        ("app.*.b", &["app.a.b", "app.x.b"]),
        ("app.a.>", &["app.a.b", "app.a.b.c"]),
        ("app.*.>", &["app.a.b", "app.a.b.c", "app.x.b"]),
        ("app.*.*", &["app.a.b", "app.x.b"]),
        ("orders.*", &["orders.a"]),
        ("app.nothing", &[]),
    ];
    for (pattern, expected) in cases {
        let mut sse = server
            .subscribe(&format!("subject={pattern}&start=oldest"))
            .await;
        let frames = sse.take(expected.len()).await;
        assert_eq!(subjects(&frames), *expected, "pattern {pattern}");
        sse.expect_silence(Duration::from_millis(200)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_subscriptions_are_400() {
    let (_data, mut server) = server_with(&[]).await;
    let cases = [
        ("", "subject"),
        ("subject=", "subject"),
        ("start=oldest", "subject"),
        ("subject=app", "subject"),
        ("subject=*.a", "namespace"),
        ("subject=app.>.a", ">"),
        ("subject=app.b*", "alone"),
        ("subject=app.**", "alone"),
        ("subject=billing.a", "billing"),
        ("subject=app.a&start=yesterday", "start"),
        ("subject=app.a&ack=sometimes", "ack"),
        ("subject=app.a&redelivery=soon", "redelivery"),
        ("subject=app.a&redelivery=-1s", "redelivery"),
        ("subject=app.a&redelivery_count=many", "redelivery_count"),
    ];
    for (query, expected) in cases {
        let response = server.request(reqwest::Method::GET, query).await;
        assert_eq!(response.status(), 400, "{query}");
        let text = response.text().await.unwrap();
        assert!(
            text.contains(expected),
            "{query}: {text:?} should mention {expected:?}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_oldest_newest_and_after_an_id() {
    let (_data, mut server) = server_with(&[]).await;
    let ids = server.publish_numbered("app.s", 5).await;

    let mut oldest = server.subscribe("subject=app.s&start=oldest").await;
    let mut newest = server.subscribe("subject=app.s&start=newest").await;
    let mut default = server.subscribe("subject=app.s").await;
    let mut after = server
        .subscribe(&format!("subject=app.s&start={}", ids[2]))
        .await;
    assert_eq!(oldest.content_type, "text/event-stream");
    assert!(
        oldest.consumer_id.starts_with("c_"),
        "{}",
        oldest.consumer_id
    );
    assert_ne!(oldest.consumer_id, newest.consumer_id);

    let payloads = |frames: Vec<Frame>| -> Vec<Value> {
        frames.iter().map(|f| f.json()["payload"].clone()).collect()
    };
    assert_eq!(payloads(oldest.take(5).await), [0, 1, 2, 3, 4]);
    assert_eq!(
        payloads(after.take(2).await),
        [3, 4],
        "strictly after the id"
    );
    newest.expect_silence(Duration::from_millis(200)).await;
    default.expect_silence(Duration::from_millis(10)).await;

    server
        .publish(&json!({"subject": "app.s", "payload": 5}))
        .await;
    for sse in [&mut oldest, &mut newest, &mut default, &mut after] {
        assert_eq!(payloads(sse.take(1).await), [5]);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_start_id_is_an_error_event_then_the_end() {
    let (_data, mut server) = server_with(&[]).await;
    server.publish(&json!({"subject": "app.s"})).await;
    for id in ["e_cn0vq1g2ps3c73b6vvqg", "e_0000000000000000000z"] {
        let mut sse = server.subscribe(&format!("subject=app.s&start={id}")).await;
        let frame = sse
            .next(Duration::from_secs(5))
            .await
            .expect("an error frame");
        assert_eq!(frame.event.as_deref(), Some("error"), "{frame:?}");
        assert_eq!(frame.data.len(), 1);
        assert!(frame.data[0].contains(id), "{frame:?}");
        sse.expect_end(Duration::from_secs(5)).await;
        assert!(String::from_utf8_lossy(&sse.raw).starts_with("event: error\ndata: "));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_strictly_after_and_overrides_start() {
    let (_data, mut server) = server_with(&[]).await;
    let ids = server.publish_numbered("app.r", 6).await;
    // A browser reconnecting after event 3 sends Last-Event-ID; `start` is whatever the
    // page's URL said.
    let mut sse = server
        .subscribe_with("subject=app.r&start=oldest", &[("Last-Event-ID", &ids[3])])
        .await;
    let frames = sse.take(2).await;
    assert_eq!(frames[0].id.as_deref(), Some(ids[4].as_str()));
    assert_eq!(frames[1].id.as_deref(), Some(ids[5].as_str()));
    sse.expect_silence(Duration::from_millis(200)).await;

    let mut sse = server
        .subscribe_with("subject=app.r&start=newest", &[("Last-Event-ID", &ids[0])])
        .await;
    assert_eq!(sse.take(5).await.len(), 5);

    let mut sse = server
        .subscribe_with(
            "subject=app.r",
            &[("Last-Event-ID", "e_cn0vq1g2ps3c73b6vvqg")],
        )
        .await;
    let frame = sse.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(frame.event.as_deref(), Some("error"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_sdk_style_empty_parameters_mean_the_defaults() {
    let (_data, mut server) = server_with(&[]).await;
    server
        .publish(&json!({"subject": "app.g", "payload": 1}))
        .await;
    // Start defaults to newest: the existing event is not delivered, the next one is.
    let mut sse = server
        .subscribe("subject=app.g&start=&ack=&redelivery=0s&redelivery_count=")
        .await;
    sse.expect_silence(Duration::from_millis(200)).await;
    server
        .publish(&json!({"subject": "app.g", "payload": 2}))
        .await;
    assert_eq!(sse.take(1).await[0].json()["payload"], 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_format_is_exact_and_pings_keep_the_stream_alive() {
    let (_data, mut server) = server_with(&["--ping-interval", "150ms"]).await;
    let mut sse = server.subscribe("subject=app.w").await;
    let ping = sse
        .next_frame(Duration::from_secs(5))
        .await
        .expect("a ping");
    assert_eq!(ping.comments, vec!["ping"]);
    assert_eq!(&sse.raw[..8], b": ping\n\n");

    let published = server
        .publish(&json!({"subject": "app.w", "payload": [1]}))
        .await;
    let frame = sse.next(Duration::from_secs(5)).await.unwrap();
    let text = String::from_utf8(sse.raw.clone()).unwrap();
    let data = &frame.data[0];
    let expected = format!("id: {}\nevent: msg\ndata: {data}\n\n", published.id);
    assert!(text.contains(&expected), "{text:?}");
    assert_eq!(
        data,
        &format!(
            "{{\"id\":\"{}\",\"subject\":\"app.w\",\"created_at\":\"{}\",\"payload\":[1],\"index\":0}}",
            published.id, published.created_at
        )
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_the_same_order() {
    let (_data, mut server) = server_with(&[]).await;
    let mut a = server.subscribe("subject=app.>").await;
    let mut b = server.subscribe("subject=app.>").await;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let client = server.client.clone();
        let url = server.url.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let body = json!({"subject": format!("app.t{t}"), "payload": i}).to_string();
                assert_eq!(
                    client.post(&url).body(body).send().await.unwrap().status(),
                    202
                );
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let order =
        |frames: Vec<Frame>| -> Vec<String> { frames.into_iter().map(|f| f.id.unwrap()).collect() };
    assert_eq!(order(a.take(200).await), order(b.take(200).await));
    server.stop().await;
}

/// 8 publishers × 500 events while 3 subscribers connect mid-stream: each sees every event
/// from its start on exactly once, in log order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_to_live_has_no_gap_and_no_duplicate() {
    const PUBLISHERS: usize = 8;
    const EACH: usize = 500;
    const TOTAL: usize = PUBLISHERS * EACH;
    let (_data, mut server) = server_with(&[]).await;

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let client = server.client.clone();
        let url = server.url.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let body = json!({"subject": format!("app.p{p}"), "payload": {"p": p, "i": i}});
                let response = client
                    .post(&url)
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
            }
        }));
    }

    // Connect while publishing is under way: from the oldest event, then (once 100
    // events are in) from "now" and from an id the first subscriber saw.
    let mut from_oldest = server.subscribe("subject=app.>&start=oldest").await;
    let first = from_oldest.take(100).await;
    let mut from_now = server.subscribe("subject=app.>").await;
    let start_id = first[99].id.clone().unwrap();
    let mut from_id = server
        .subscribe(&format!("subject=app.>&start={start_id}"))
        .await;

    for publisher in publishers {
        publisher.await.unwrap();
    }

    let check = |label: &str, frames: &[Frame], first_index: i64| {
        let mut expected = first_index;
        for frame in frames {
            let index = frame.json()["index"].as_i64().unwrap();
            assert_eq!(index, expected, "{label}: gap or duplicate");
            expected += 1;
        }
        assert_eq!(expected, TOTAL as i64, "{label}: reached the last event");
    };
    let mut all = first;
    all.extend(from_oldest.take(TOTAL - 100).await);
    check("oldest", &all, 0);
    from_oldest.expect_silence(Duration::from_millis(100)).await;

    let after_id = from_id.take(TOTAL - 100).await;
    check("after id", &after_id, 100);

    // The "now" subscriber starts wherever the log was when it connected.
    let first_now = from_now.next(Duration::from_secs(10)).await.unwrap();
    let start = first_now.json()["index"].as_i64().unwrap();
    let mut now = vec![first_now];
    now.extend(from_now.take(TOTAL - 1 - start as usize).await);
    check("newest", &now, start);

    // Every publisher's events are in its order.
    let mut last = [-1i64; PUBLISHERS];
    for frame in &all {
        let p = &frame.json()["payload"];
        let (p, i) = (p["p"].as_u64().unwrap() as usize, p["i"].as_i64().unwrap());
        assert_eq!(i, last[p] + 1);
        last[p] = i;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_catches_up_from_disk() {
    // A tiny in-memory tail: most of what the slow reader missed is only on disk.
    let (_data, mut server) =
        server_with(&["--tail-size", "8KiB", "--segment-size", "64KiB"]).await;
    let mut slow = server.subscribe("subject=app.>").await;
    let mut fast = server.subscribe("subject=app.>").await;
    for b in 0..20 {
        let batch: Vec<Value> = (0..100)
            .map(|i| json!({"subject": "app.bulk", "payload": {"n": b * 100 + i, "pad": "x".repeat(100)}}))
            .collect();
        assert_eq!(
            server.post(Value::Array(batch).to_string()).await.status(),
            202
        );
        if b % 5 == 0 {
            // The fast reader keeps up meanwhile.
            let _ = fast.take(100).await;
        }
    }
    let all = slow.take(2000).await;
    for (n, frame) in all.iter().enumerate() {
        assert_eq!(frame.json()["payload"]["n"], n);
    }
    let store = server.server.as_ref().unwrap().store();
    let stats = store.log("app").unwrap().stats();
    assert!(
        stats.disk_reads > 0,
        "events older than the tail came from disk: {stats:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_streams_cleanly() {
    let (_data, mut server) = server_with(&[]).await;
    let mut streams = Vec::new();
    for query in [
        "subject=app.>",
        "subject=app.x&ack=manual",
        "subject=_bus_.inbox1",
    ] {
        streams.push(server.subscribe(query).await);
    }
    server.stop().await;
    for mut sse in streams {
        sse.expect_end(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_may_use_letters_of_any_script() {
    let (_data, mut server) = server_with(&[]).await;
    server
        .publish(&json!({"subject": "app.café", "payload": 1}))
        .await;
    server
        .publish(&json!({"subject": "app.注文.新規", "payload": 2}))
        .await;
    let mut exact = server.subscribe("subject=app.caf%C3%A9&start=oldest").await;
    assert_eq!(exact.take(1).await[0].json()["subject"], "app.café");
    let mut wildcard = server
        .subscribe("subject=app.%E6%B3%A8%E6%96%87.*&start=oldest")
        .await;
    assert_eq!(wildcard.take(1).await[0].json()["payload"], 2);
    server.stop().await;
}

/// curl sends `>` unencoded (`curl 'http://host/?subject=orders.>'`), and the reference
/// accepts it: so does `bus`, also on a kept-alive connection after a request with a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_wildcard_in_the_query_is_accepted_like_curl_sends_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_data, mut server) = server_with(&[]).await;
    let addr = server
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = r#"{"subject":"app.raw.x","payload":">"}"#;
    let requests = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}\
         GET /?subject=app.>&start=oldest HTTP/1.1\r\nHost: {addr}\r\n\r\n",
        body.len()
    );
    tcp.write_all(requests.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("event: msg") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 202"), "{text}");
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    assert!(text.contains(r#""subject":"app.raw.x","#), "{text}");
    assert!(
        text.contains(r#""payload":">""#),
        "the body is untouched: {text}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_now_ends_after_the_events_stored_when_it_opened() {
    let (_data, mut server) = server_with(&[]).await;
    let mut ids = server.publish_numbered("app.u", 5).await;
    server.publish(&json!({"subject": "app.other"})).await;

    for query in [
        "subject=app.u&start=oldest&until=now",
        "subject=app.u&start=oldest&until=now&ack=manual",
    ] {
        let mut sse = server.subscribe(query).await;
        let manual = query.contains("manual");
        let expected = ids.clone();
        let mut seen = Vec::new();
        loop {
            let frame = sse.next(Duration::from_secs(5)).await.expect("a frame");
            if frame.event.as_deref() == Some("done") {
                assert_eq!(frame.data, ["end"]);
                break;
            }
            let id = frame.id.clone().unwrap();
            if manual {
                assert!(server.ack(&sse.consumer_id, &id).await.is_success());
            }
            seen.push(id);
            if seen.len() == 3 {
                // Published after the subscription opened: past its end.
                ids.push(server.publish(&json!({"subject": "app.u"})).await.id);
            }
        }
        assert_eq!(seen, expected, "{query}");
        sse.expect_end(Duration::from_secs(5)).await;
    }

    // Resuming after an id: the two events published during the loops above, then the end.
    let mut sse = server
        .subscribe_with("subject=app.u&until=now", &[("Last-Event-ID", &ids[4])])
        .await;
    let frames = sse.take(2).await;
    assert_eq!(frames[0].id.as_ref(), Some(&ids[5]));
    assert_eq!(frames[1].id.as_ref(), Some(&ids[6]));
    let frame = sse.next(Duration::from_secs(5)).await.expect("the end");
    assert_eq!(frame.event.as_deref(), Some("done"));
    sse.expect_end(Duration::from_secs(5)).await;

    let response = server
        .request(reqwest::Method::GET, "subject=app.u&until=later")
        .await;
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("until=now"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_with_spaces_is_refused_like_a_subject_with_them() {
    let (_data, mut server) = server_with(&[]).await;
    for (encoded, text) in [
        ("%20app.b", " app.b"),
        ("app.b%20", "app.b "),
        ("app.%20b", "app. b"),
    ] {
        let subscribed = server
            .request(reqwest::Method::GET, &format!("subject={encoded}"))
            .await;
        assert_eq!(subscribed.status(), 400, "{encoded}");
        let subscribe_error = subscribed.text().await.unwrap();
        let published = server
            .post(serde_json::json!({"subject": text}).to_string())
            .await;
        assert_eq!(published.status(), 400, "{text:?}");
        assert_eq!(subscribe_error, published.text().await.unwrap(), "{text:?}");
    }
    server.stop().await;
}

/// The `id:` of a frame of a stream of several subjects, as a map of namespace to the
/// next position it names.
fn cursor(frame: &Frame) -> std::collections::BTreeMap<String, u64> {
    let id = frame.id.as_deref().expect("an id");
    let pairs = id.strip_prefix("cursor:").unwrap_or_else(|| panic!("{id}"));
    pairs
        .split(',')
        .map(|pair| {
            let (ns, position) = pair.split_once('=').unwrap();
            (ns.to_owned(), position.parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_subjects_in_one_stream_resume_exactly_from_its_cursor() {
    let (_data, mut server) = server_with(&[]).await;
    // Two namespaces, and two patterns of one of them, which an event may both match.
    let query = "subject=orders.>&subject=app.chat.room1&subject=app.chat.*&start=oldest";
    let mut sse = server.subscribe(query).await;
    for event in [
        json!({"subject": "orders.new", "payload": 1}),
        json!({"subject": "app.chat.room1", "payload": 2}),
        json!({"subject": "app.other.x", "payload": 3}),
        json!({"subject": "app.chat.room2", "payload": 4}),
        json!({"subject": "orders.paid", "payload": 5}),
    ] {
        server.publish(&event).await;
    }
    let frames = sse.take(4).await;
    let mut got: Vec<(String, i64)> = frames
        .iter()
        .map(|f| {
            let event = f.json();
            (
                event["subject"].as_str().unwrap().to_owned(),
                event["payload"].as_i64().unwrap(),
            )
        })
        .collect();
    // Each namespace's events in their order; app.chat.room1 once though two patterns
    // match it; app.other.x not at all.
    let orders: Vec<_> = got
        .iter()
        .filter(|(s, _)| s.starts_with("orders."))
        .cloned()
        .collect();
    assert_eq!(
        orders,
        [("orders.new".into(), 1), ("orders.paid".into(), 5)]
    );
    got.retain(|(s, _)| s.starts_with("app."));
    assert_eq!(
        got,
        [("app.chat.room1".into(), 2), ("app.chat.room2".into(), 4)]
    );
    // Every id names both namespaces; the last one is past everything delivered.
    let last = cursor(frames.last().unwrap());
    assert_eq!(last.keys().collect::<Vec<_>>(), ["app", "orders"]);
    assert_eq!(last["orders"], 2);
    assert_eq!(last["app"], 3);
    let after_second = frames[1].id.clone().unwrap();
    drop(sse);

    // Resuming from the second frame's cursor: exactly what came after it, in both
    // namespaces, including what was published while disconnected.
    server
        .publish(&json!({"subject": "app.chat.room1", "payload": 6}))
        .await;
    server
        .publish(&json!({"subject": "orders.new", "payload": 7}))
        .await;
    let mut resumed = server
        .subscribe_with(query, &[("last-event-id", &after_second)])
        .await;
    let expected_after: Vec<i64> = {
        let seen: Vec<i64> = frames[..2]
            .iter()
            .map(|f| f.json()["payload"].as_i64().unwrap())
            .collect();
        [1, 2, 4, 5, 6, 7]
            .into_iter()
            .filter(|p| !seen.contains(p))
            .collect()
    };
    let again = resumed.take(expected_after.len()).await;
    let mut payloads: Vec<i64> = again
        .iter()
        .map(|f| f.json()["payload"].as_i64().unwrap())
        .collect();
    payloads.sort_unstable();
    assert_eq!(payloads, expected_after);
    assert!(
        resumed.next(Duration::from_millis(300)).await.is_none(),
        "nothing twice"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_subjects_end_together_with_until_now_and_refuse_what_needs_one_log() {
    let (_data, mut server) = server_with(&[]).await;
    server
        .publish(&json!({"subject": "orders.a", "payload": 1}))
        .await;
    server
        .publish(&json!({"subject": "app.b", "payload": 2}))
        .await;
    let mut sse = server
        .subscribe("subject=orders.>&subject=app.>&start=oldest&until=now")
        .await;
    let frames = sse.take(2).await;
    assert_eq!(frames.len(), 2);
    let done = sse.next(Duration::from_secs(5)).await.expect("the end");
    assert_eq!(done.event.as_deref(), Some("done"), "{done:?}");

    for (query, expected) in [
        ("subject=orders.>&subject=app.>&ack=manual", "ack=manual"),
        ("subject=orders.>&subject=app.>&consumer=c", "consumer"),
        (
            "subject=orders.>&subject=app.>&start=e_1",
            "start=<event id>",
        ),
        (
            "subject=orders.>&subject=app.>&start_index=3",
            "start_index",
        ),
        ("subject=orders.>&subject=_bus_.x", "inbox"),
        ("subject=orders.>&subject=", "missing subject"),
        ("subject=orders.>&subject=nope.x", "nope"),
    ] {
        let response = server.request(reqwest::Method::GET, query).await;
        assert_eq!(response.status(), 400, "{query}");
        let text = response.text().await.unwrap();
        assert!(text.contains(expected), "{query}: {text}");
    }
    let response = server
        .client
        .get(format!("{}?subject=orders.>&subject=app.>", server.url))
        .header("last-event-id", "e_123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("cursor:"));
    server.stop().await;
}
