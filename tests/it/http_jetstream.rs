//! `bus server --store jetstream`: the HTTP contract on a real nats-server with JetStream
//! — publishing, batches, replay and live streams, durable consumers whose progress lives
//! in JetStream, resuming across restarts of bus, and nats-server going away and coming
//! back.

use std::time::Duration;

use serde_json::json;

use crate::common::http::TestServer;
use crate::common::jetstream::JetStreamServer;

async fn start(nats: &JetStreamServer, data: &std::path::Path) -> TestServer {
    let url = nats.url();
    TestServer::start(data, &["--store", "jetstream", "--nats-url", &url]).await
}

/// The payloads of the events of `query` up to the end of the log (`until=now`).
async fn payloads(server: &TestServer, query: &str) -> Vec<serde_json::Value> {
    let mut sse = server.subscribe(&format!("{query}&until=now")).await;
    let mut payloads = Vec::new();
    while let Some(frame) = sse.next(Duration::from_secs(5)).await {
        if frame.event.as_deref() == Some("done") {
            return payloads;
        }
        let event: serde_json::Value = serde_json::from_str(&frame.data.join("\n")).unwrap();
        payloads.push(event["payload"].clone());
    }
    panic!("the stream did not end: {payloads:?}");
}

/// The stream of namespace `app`, as NATS's operators see it.
async fn app_stream(nats: &JetStreamServer) -> async_nats::jetstream::stream::Stream {
    let client = async_nats::connect(nats.url().as_str()).await.unwrap();
    async_nats::jetstream::new(client)
        .get_stream("BUS_app")
        .await
        .unwrap()
}

/// The JetStream consumers on the stream of namespace `app`.
async fn consumers_of_app(nats: &JetStreamServer) -> usize {
    let mut stream = app_stream(nats).await;
    stream.info().await.unwrap().state.consumer_count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_replay_live_and_resume_across_restarts() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    // The data directory stays empty: everything is in JetStream.
    let data = tempfile::tempdir().unwrap();
    let mut server = start(&nats, data.path()).await;
    let first = server
        .publish(&json!({"subject": "app.a", "payload": 0}))
        .await;
    assert_eq!(first.index, 0);
    let batch = server
        .post(
            json!([{"subject": "app.b", "payload": 1}, {"subject": "app.b", "payload": 2}])
                .to_string(),
        )
        .await;
    assert_eq!(batch.status(), 202);
    assert_eq!(
        payloads(&server, "subject=app.>&start=oldest").await,
        vec![json!(0), json!(1), json!(2)]
    );
    assert_eq!(
        payloads(&server, "subject=app.b&start_index=2").await,
        vec![json!(2)]
    );

    // Live: a subscriber from now on gets what is published next.
    let mut live = server.subscribe("subject=app.>").await;
    let third = server
        .publish(&json!({"subject": "app.c", "payload": 3}))
        .await;
    let frame = live
        .next(Duration::from_secs(5))
        .await
        .expect("a live event");
    assert_eq!(frame.id.as_deref(), Some(third.id.as_str()));
    drop(live);

    // A new bus server on the same JetStream: same events, same ids; Last-Event-ID resumes.
    server.stop().await;
    let server = start(&nats, data.path()).await;
    let mut resumed = server
        .subscribe_with("subject=app.>", &[("Last-Event-ID", first.id.as_str())])
        .await;
    for expected in 1..=3 {
        let frame = resumed.next(Duration::from_secs(5)).await.unwrap();
        let event: serde_json::Value = serde_json::from_str(&frame.data.join("\n")).unwrap();
        assert_eq!(event["payload"], expected);
    }
    assert!(std::fs::read_dir(data.path()).unwrap().next().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumers_progress_survives_a_restart_of_bus() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let mut server = start(&nats, data.path()).await;
    server.publish_numbered("orders.paid", 3).await;
    let query = "subject=orders.>&ack=manual&consumer=billing&start=oldest";
    let mut sse = server.subscribe(query).await;
    let frame = sse.next(Duration::from_secs(5)).await.unwrap();
    let id = frame.id.unwrap();
    assert_eq!(server.ack(&sse.consumer_id, &id).await, 202);
    let second = sse.next(Duration::from_secs(5)).await.unwrap();
    let second_id = second.id.unwrap();
    drop(sse);
    server.stop().await;

    // The acknowledged event is not delivered again; the unacknowledged one is.
    let server = start(&nats, data.path()).await;
    let mut sse = server.subscribe(query).await;
    let frame = sse.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(frame.id.as_deref(), Some(second_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_publishes_are_503_and_resume_when_it_is_back() {
    let Some(mut nats) = JetStreamServer::start() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let server = start(&nats, data.path()).await;
    let first = server
        .publish(&json!({"subject": "app.a", "payload": 1}))
        .await;
    let mut live = server.subscribe("subject=app.>").await;

    nats.stop();
    // A live stream ends with an error frame, within a few seconds.
    let frame = live
        .next(Duration::from_secs(5))
        .await
        .expect("an error frame");
    assert_eq!(frame.event.as_deref(), Some("error"), "{frame:?}");
    assert!(frame.data.join("").contains("NATS is down"), "{frame:?}");
    live.expect_end(Duration::from_secs(5)).await;
    let refused = server
        .post(json!({"subject": "app.a", "payload": 2}).to_string())
        .await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let ready = server
        .client
        .get(format!("{}readyz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    nats.resume();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let response = server
            .post(json!({"subject": "app.a", "payload": 3}).to_string())
            .await;
        if response.status() == 202 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing did not resume"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        payloads(&server, "subject=app.>&start=oldest").await,
        vec![json!(1), json!(3)]
    );
    // The client that lost its stream resumes from the last event it had.
    let mut resumed = server
        .subscribe_with("subject=app.>", &[("Last-Event-ID", first.id.as_str())])
        .await;
    let frame = resumed.next(Duration::from_secs(5)).await.unwrap();
    let event: serde_json::Value = serde_json::from_str(&frame.data.join("\n")).unwrap();
    assert_eq!(event["payload"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_is_the_streams_limits_and_readers_behind_it_get_a_notice() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let url = nats.url();
    let server = TestServer::start(
        data.path(),
        &[
            "--store",
            "jetstream",
            "--nats-url",
            &url,
            "--retention-age",
            "1h,app:1s",
            "--retention-interval",
            "100ms",
        ],
    )
    .await;
    server.publish_numbered("app.old", 3).await;
    // Aged out by JetStream once the limit is on the stream; the newer event stays.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let newer = server
        .publish(&json!({"subject": "app.new", "payload": "kept"}))
        .await;
    assert_eq!(newer.index, 3);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut old = server
            .subscribe("subject=app.>&start_index=0&until=now")
            .await;
        let first = old.next_frame(Duration::from_secs(5)).await.unwrap();
        if first
            .comments
            .first()
            .is_some_and(|c| c.contains("continuing from position 3"))
        {
            let skipped = old.next(Duration::from_secs(5)).await.unwrap();
            assert_eq!(skipped.event.as_deref(), Some("skipped"), "{skipped:?}");
            assert_eq!(
                skipped.json(),
                serde_json::json!({"first_index": 0, "last_index": 2, "next_index": 3})
            );
            let event = old.next(Duration::from_secs(5)).await.unwrap();
            assert_eq!(event.json()["payload"], "kept");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old events were not removed: {first:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_secret_key_nats_holds_sealed_events_only() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let url = nats.url();
    let with_key = [
        "--store",
        "jetstream",
        "--nats-url",
        &url,
        "--secret-key",
        "k1",
    ];
    let mut server = TestServer::start(data.path(), &with_key).await;
    let published = server
        .publish(&json!({"subject": "app.card", "payload": {"number": "4111-1111"}}))
        .await;
    assert_eq!(
        payloads(&server, "subject=app.>&start=oldest").await,
        vec![json!({"number": "4111-1111"})]
    );
    server.stop().await;

    // What an operator of NATS can read of it: the subject, not the event.
    let raw = app_stream(&nats).await.get_raw_message(1).await.unwrap();
    assert_eq!(raw.subject.as_str(), "app.card");
    let body = String::from_utf8_lossy(&raw.payload);
    assert!(
        !body.contains("4111") && !body.contains(&published.id),
        "{body}"
    );

    // Without the key (or with another) the server does not start; with it, all is there.
    for args in [
        vec!["--store", "jetstream", "--nats-url", &url],
        vec![
            "--store",
            "jetstream",
            "--nats-url",
            &url,
            "--secret-key",
            "k2",
        ],
    ] {
        let mut all = vec!["--path", data.path().to_str().unwrap()];
        all.extend(["--addr", "127.0.0.1:0", "--namespaces", "app,orders"]);
        all.extend(args);
        let config = bus::config::ServerConfig::from_args(all).unwrap();
        let refused = bus::server::start(&config).await.err().unwrap();
        assert!(
            format!("{refused:#}").contains("is encrypted"),
            "{refused:#}"
        );
    }
    let server = TestServer::start(data.path(), &with_key).await;
    assert_eq!(
        payloads(&server, "subject=app.>&start=oldest").await,
        vec![json!({"number": "4111-1111"})]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_jetstream_stream_each_others_events_live() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Started at once on a fresh JetStream: both create the namespaces' streams, and one
    // stream (one generation of ids) is the namespace's for both.
    let (node_a, node_b) = tokio::join!(start(&nats, data_a.path()), start(&nats, data_b.path()));
    let mut on_a = node_a.subscribe("subject=app.>").await;
    let mut on_b = node_b.subscribe("subject=app.>").await;

    let through_a = node_a
        .publish(&json!({"subject": "app.a", "payload": 1}))
        .await;
    let through_b = node_b
        .publish(&json!({"subject": "app.b", "payload": 2}))
        .await;
    assert_eq!((through_a.index, through_b.index), (0, 1));
    for sse in [&mut on_a, &mut on_b] {
        let ids: Vec<String> = sse
            .take(2)
            .await
            .into_iter()
            .map(|frame| frame.id.unwrap())
            .collect();
        assert_eq!(ids, vec![through_a.id.clone(), through_b.id.clone()]);
    }
    // Resuming on one node from an id the other gave.
    let mut resumed = node_b
        .subscribe_with("subject=app.>", &[("Last-Event-ID", through_a.id.as_str())])
        .await;
    let frame = resumed.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(frame.id.as_deref(), Some(through_b.id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_cost_no_jetstream_consumers() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let server = start(&nats, data.path()).await;
    server.publish_numbered("app.history", 20).await;
    // 100 subscribers from the oldest event and 100 live ones, all on one node.
    let mut streams = Vec::new();
    for i in 0..200 {
        let query = if i % 2 == 0 {
            "subject=app.>&start=oldest"
        } else {
            "subject=app.>"
        };
        streams.push((i % 2 == 0, server.subscribe(query).await));
    }
    let live = server
        .publish(&json!({"subject": "app.live", "payload": 1}))
        .await;
    for (from_oldest, sse) in &mut streams {
        let expected = if *from_oldest { 21 } else { 1 };
        let frames = sse.take(expected).await;
        assert_eq!(frames.last().unwrap().id.as_deref(), Some(live.id.as_str()));
    }
    assert_eq!(
        consumers_of_app(&nats).await,
        0,
        "200 subscribers, no JetStream consumer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deduplication_window_is_rebuilt_when_a_node_starts() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let mut server = start(&nats, data.path()).await;
    for i in 0..3 {
        server
            .publish(&json!({"subject": "app.order", "key": format!("k{i}"), "payload": i}))
            .await;
        server
            .publish(&json!({"subject": "app.order", "payload": "no key"}))
            .await;
    }
    server.stop().await;

    let server = start(&nats, data.path()).await;
    let again = server
        .post(json!({"subject": "app.order", "key": "k1", "payload": 9}).to_string())
        .await;
    assert_eq!(again.status(), 409);
    assert!(again
        .text()
        .await
        .unwrap()
        .starts_with("key was processed before"));
    let fresh = server
        .post(json!({"subject": "app.order", "key": "k3", "payload": 3}).to_string())
        .await;
    assert_eq!(fresh.status(), 202);
    // The pass over the recent events left no consumer behind.
    assert_eq!(consumers_of_app(&nats).await, 0);
}

/// The payload of an event frame, as a number.
fn payload_n(frame: &crate::common::http::Frame) -> u64 {
    let event: serde_json::Value = serde_json::from_str(&frame.data.join("\n")).unwrap();
    event["payload"].as_u64().expect("a numbered payload")
}

/// Waits (up to 10 s) until `check` holds.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_ack_consumers_are_jetstream_consumers() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let server = start(&nats, data.path()).await;
    let ids = server.publish_numbered("app.jobs", 3).await;

    // A durable consumer is the JetStream consumer of its name, with the bus's settings.
    let mut sse = server
        .subscribe("subject=app.jobs&start=oldest&ack=manual&consumer=billing&redelivery=2s&max_inflight=3")
        .await;
    let stream = app_stream(&nats).await;
    let info = stream.consumer_info("billing").await.unwrap();
    assert_eq!(info.config.filter_subject, "app.jobs");
    assert_eq!(info.config.ack_wait, Duration::from_secs(2));
    assert_eq!(
        info.config.ack_policy,
        async_nats::jetstream::consumer::AckPolicy::Explicit
    );
    assert_eq!(info.config.metadata["bus_pattern"], "app.jobs");

    // What it acknowledges is JetStream's.
    let frames = sse.take(3).await;
    assert_eq!(frames.iter().map(payload_n).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(server.ack(&sse.consumer_id, &ids[0]).await, 202);
    assert_eq!(server.ack(&sse.consumer_id, &ids[1]).await, 202);
    eventually("JetStream counts the acks", || async {
        let info = stream.consumer_info("billing").await.unwrap();
        info.ack_floor.stream_sequence == 2 && info.num_ack_pending == 1
    })
    .await;
    let listed = server.list_consumers("app").await;
    let billing = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "billing")
        .expect("billing is listed")
        .clone();
    assert_eq!(
        (
            &billing["acked_floor"],
            &billing["pending"],
            &billing["members"]
        ),
        (&json!(2), &json!(1), &json!(1)),
        "{billing}"
    );
    drop(sse);

    // A manual-ack subscription without a name is an ephemeral consumer, removed when
    // the subscription ends.
    let before = consumers_of_app(&nats).await;
    let ephemeral = server
        .subscribe("subject=app.jobs&start=oldest&ack=manual")
        .await;
    assert_eq!(consumers_of_app(&nats).await, before + 1);
    drop(ephemeral);
    eventually("the ephemeral consumer is removed", || async {
        consumers_of_app(&nats).await == before
    })
    .await;

    // Deleting the durable consumer deletes the JetStream consumer.
    let deleted = server
        .client
        .delete(format!("{}consumers/app/billing", server.url))
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.status());
    assert!(stream.consumer_info("billing").await.is_err());
}

/// A queue group whose members are on two nodes shares the work as on one node: every
/// event goes to one member, once; and what a member held when its node stopped goes to
/// the member on the other node within seconds, not after the redelivery time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_spans_nodes_and_a_stopped_nodes_events_go_to_the_others() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut node_a = start(&nats, data_a.path()).await;
    let node_b = start(&nats, data_b.path()).await;
    let query =
        "subject=app.work&start=oldest&ack=manual&consumer=workers&max_inflight=4&redelivery=30s";
    let mut on_a = node_a.subscribe(query).await;
    let mut on_b = node_b.subscribe(query).await;
    // Either node lists the consumer with its two members, one on each node.
    for node in [&node_a, &node_b] {
        let listed = node.list_consumers("app").await;
        assert_eq!(listed[0]["name"], "workers");
        assert_eq!(listed[0]["members"], 2, "{listed}");
    }
    node_a.publish_numbered("app.work", 40).await;

    // Both members take and acknowledge until all 40 are done; none comes twice.
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 40 {
        for (node, server, sse) in [("a", &node_a, &mut on_a), ("b", &node_b, &mut on_b)] {
            if let Some(frame) = sse.next(Duration::from_millis(200)).await {
                let n = payload_n(&frame);
                assert!(seen.insert(n, node).is_none(), "event {n} delivered twice");
                let id = frame.id.as_deref().unwrap();
                assert_eq!(server.ack(&sse.consumer_id, id).await, 202);
            }
        }
    }
    assert!(
        seen.values().any(|node| *node == "a") && seen.values().any(|node| *node == "b"),
        "both members got work: {seen:?}"
    );

    // Node a's member holds work without acknowledging it while node b's member waits;
    // node a stops: node b's member gets that work within seconds, not after the 30 s redelivery
    // time.
    drop(on_b);
    // Until node b sees the connection close, its member may still take work.
    tokio::time::sleep(Duration::from_millis(300)).await;
    node_b.publish_numbered("app.work", 4).await;
    let held_by_a: Vec<u64> = on_a.take(4).await.iter().map(payload_n).collect();
    assert_eq!(held_by_a, [0, 1, 2, 3]);
    let mut on_b = node_b.subscribe(query).await;
    assert!(
        on_b.next(Duration::from_millis(500)).await.is_none(),
        "node a holds all there is"
    );
    node_a.stop().await;
    drop(on_a);
    let given_back: Vec<u64> = on_b.take(4).await.iter().map(payload_n).collect();
    assert_eq!(given_back, held_by_a, "given back in order");
}

/// A `PUT` for a connection another node holds counts, as a load balancer sends it
/// anywhere: acks free the window, naks redeliver, for ephemeral and durable consumers;
/// with tokens, only the connection's own token may ack, on whichever node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_naks_sent_to_another_node_count() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let auth = data.path().join("auth");
    std::fs::write(
        &auth,
        "writer  app  publish\nreader  app  subscribe,ack\nother  app  subscribe,ack\n",
    )
    .unwrap();
    let auth = auth.display().to_string();
    let url = nats.url();
    let node = |dir: &str| {
        let (dir, url, auth) = (data.path().join(dir), url.clone(), auth.clone());
        async move {
            TestServer::start(
                &dir,
                &[
                    "--store",
                    "jetstream",
                    "--nats-url",
                    &url,
                    "--auth-file",
                    &auth,
                ],
            )
            .await
        }
    };
    let (node_a, node_b) = (node("a").await, node("b").await);
    for n in 0..4 {
        let published = node_a
            .client
            .post(&node_a.url)
            .bearer_auth("writer")
            .body(json!({"subject": "app.jobs", "payload": n}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(published.status(), 202);
    }
    let put = |server: &TestServer, query: String, token: &'static str| {
        let request = server
            .client
            .put(format!("{}?{query}", server.url))
            .bearer_auth(token);
        async move { request.send().await.unwrap().status().as_u16() }
    };

    for consumer in ["", "&consumer=workers"] {
        let query = format!(
            "subject=app.jobs&start=oldest&ack=manual&max_inflight=2&redelivery=30s{consumer}"
        );
        let mut sse = node_a
            .subscribe_with(&query, &[("Authorization", "Bearer reader")])
            .await;
        let held = sse.take(2).await;
        assert_eq!(held.iter().map(payload_n).collect::<Vec<_>>(), [0, 1]);
        let consumer_id = sse.consumer_id.clone();
        let ack = |frame: &crate::common::http::Frame| {
            format!(
                "consumer_id={consumer_id}&event_id={}",
                frame.id.as_deref().unwrap()
            )
        };

        // Another token is refused on the other node too; nothing is acked.
        assert_eq!(put(&node_b, ack(&held[0]), "other").await, 403);
        assert!(sse.next(Duration::from_millis(300)).await.is_none());
        // The connection's token, through node b: the window has room for event 2.
        assert_eq!(put(&node_b, ack(&held[0]), "reader").await, 202);
        let next = sse.take(1).await;
        assert_eq!(payload_n(&next[0]), 2, "{consumer}");
        // A nak through node b: event 1 comes back at once (not after 30 s).
        assert_eq!(
            put(&node_b, format!("{}&nak=1", ack(&held[1])), "reader").await,
            202
        );
        let again = sse.take(1).await;
        assert_eq!(again[0].id, held[1].id, "{consumer}");
        drop(sse);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An ack for a connection no node holds is accepted and ignored, as on one node.
    assert_eq!(
        put(
            &node_b,
            "consumer_id=c_nobodyholdsthis0000&event_id=e_x".to_owned(),
            "reader"
        )
        .await,
        202
    );
}

/// Inbox subjects span the nodes: an inbox subscription on one node receives what is
/// published to its subject through another (once, and once on the publisher's node too);
/// a request published with `reply=1` through one node is answered by a worker on
/// another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inboxes_and_request_reply_span_the_nodes() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let node_a = start(&nats, data_a.path()).await;
    let node_b = start(&nats, data_b.path()).await;

    let mut on_a = node_a.subscribe("subject=_bus_.room1").await;
    let mut on_b = node_b.subscribe("subject=_bus_.room1").await;
    let published = node_b
        .publish(&json!({"subject": "_bus_.room1", "payload": "hello"}))
        .await;
    assert_eq!(published.index, -1, "not stored");
    for sse in [&mut on_a, &mut on_b] {
        let frame = sse.take(1).await.remove(0);
        assert_eq!(frame.id.as_deref(), Some(published.id.as_str()));
        assert!(
            sse.next(Duration::from_millis(300)).await.is_none(),
            "delivered once"
        );
    }

    // A request (`reply=1`) through `node`, answered in a task: its status and body.
    let ask = |node: &TestServer, a: u64, b: u64| {
        let request = node
            .client
            .post(format!("{}?reply=1&timeout=10s", node.url))
            .body(json!({"subject": "app.math", "payload": {"a": a, "b": b}}).to_string());
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        })
    };
    // A worker on node a answers a request made through node b.
    let mut worker = node_a.subscribe("subject=app.math&ack=manual").await;
    let request = ask(&node_b, 1, 2);
    let question = worker.take(1).await.remove(0);
    let answered = node_a
        .client
        .put(format!(
            "{}?consumer_id={}&event_id={}",
            node_a.url,
            worker.consumer_id,
            question.id.as_deref().unwrap()
        ))
        .body(json!({"sum": 3}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 202);
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        json!({"sum": 3})
    );

    // The worker's answer reaches node b (a load balancer sends a PUT anywhere): it is
    // claimed on node a, which holds the worker's stream, and published from node b; the
    // event is acknowledged, so a second answer is refused.
    let request = ask(&node_a, 2, 3);
    let question = worker.take(1).await.remove(0);
    let answer_through_b = |sum: u64| {
        node_b
            .client
            .put(format!(
                "{}?consumer_id={}&event_id={}",
                node_b.url,
                worker.consumer_id,
                question.id.as_deref().unwrap()
            ))
            .body(json!({ "sum": sum }).to_string())
            .send()
    };
    assert_eq!(answer_through_b(5).await.unwrap().status(), 202);
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        json!({"sum": 5})
    );
    let again = answer_through_b(6).await.unwrap();
    assert_eq!(again.status(), 409);
    let refusal = again.text().await.unwrap();
    assert!(refusal.contains("not waiting for an ack"), "{refusal}");
}

/// Confirmations count across nodes: a publisher waiting on one node for `confirm=N`
/// (or `confirm_zones=K`) counts the acks of consumers on other nodes; a queue group
/// whose members are on two nodes confirms once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmations_count_acks_given_on_other_nodes() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let node_a = start(&nats, data_a.path()).await;
    let node_b = start(&nats, data_b.path()).await;
    let group = "subject=app.z&ack=manual&consumer=group&zone=eu";
    let mut members = [
        (&node_a, node_a.subscribe(group).await),
        (&node_b, node_b.subscribe(group).await),
    ];
    let mut us = node_a.subscribe("subject=app.z&ack=manual&zone=us").await;

    let publish = |query: &'static str| {
        let request = node_b
            .client
            .post(format!("{}?{query}", node_b.url))
            .body(json!({"subject": "app.z", "payload": 1}).to_string());
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            let confirmed = response.headers()["x-bus-confirmed"]
                .to_str()
                .unwrap()
                .to_owned();
            (response.status().as_u16(), confirmed)
        })
    };
    let waiting = publish("confirm=2&confirm_zones=2&timeout=10s");
    // The group's member that gets the event acks it, on its own node; so does `us`, on
    // node a.
    let mut acked = false;
    while !acked {
        for (node, member) in members.iter_mut() {
            if let Some(frame) = member.next(Duration::from_millis(200)).await {
                let ack = node
                    .ack(&member.consumer_id, frame.id.as_deref().unwrap())
                    .await;
                assert_eq!(ack, 202);
                acked = true;
            }
        }
    }
    let frame = us.take(1).await.remove(0);
    assert_eq!(
        node_a
            .ack(&us.consumer_id, frame.id.as_deref().unwrap())
            .await,
        202
    );
    let (status, confirmed) = waiting.await.unwrap();
    assert_eq!((status, confirmed.as_str()), (202, "2"));
}

/// A deduplication key is taken once across nodes: the same key published through two
/// nodes at once gives exactly one 202 (the other is the reference's 409), and a key
/// published through one node is refused through the other afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_taken_once_across_nodes() {
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let node_a = start(&nats, data_a.path()).await;
    let node_b = start(&nats, data_b.path()).await;
    let post = |server: &TestServer, key: String| {
        let request = server
            .client
            .post(&server.url)
            .body(json!({"subject": "app.pay", "key": key, "payload": 1}).to_string());
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        })
    };
    const KEYS: usize = 20;
    for n in 0..KEYS {
        let key = format!("payment-{n}");
        let (a, b) = (post(&node_a, key.clone()), post(&node_b, key));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        let mut statuses = [a.0, b.0];
        statuses.sort_unstable();
        assert_eq!(statuses, [202, 409], "key {n}: {a:?} {b:?}");
        let refused = if a.0 == 409 { &a.1 } else { &b.1 };
        assert!(refused.starts_with("key was processed before"), "{refused}");
    }
    assert_eq!(
        payloads(&node_b, "subject=app.pay&start=oldest")
            .await
            .len(),
        KEYS
    );

    // Later, through the other node.
    let first = post(&node_a, "refund-1".into()).await.unwrap();
    assert_eq!(first.0, 202, "{first:?}");
    let again = post(&node_b, "refund-1".into()).await.unwrap();
    assert_eq!(again.0, 409, "{again:?}");
}

/// Moving from the file store to JetStream: the stopped server's data directory, dumped
/// and restored into a node on JetStream, is served the same (ids, times, order,
/// payloads, keys); the ids stay resumable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_store_moves_to_jetstream_with_dump_and_restore() {
    use crate::common::cli::run;
    let Some(nats) = JetStreamServer::start() else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let mut file_node = TestServer::start(
        files.path(),
        &["--store", "file", "--namespaces", "app,orders"],
    )
    .await;
    file_node.publish_numbered("app.a", 30).await;
    file_node
        .publish(&json!({"subject": "orders.paid", "key": "order-1", "payload": {"n": 1}}))
        .await;
    file_node.stop().await;
    let dumped = run(&["dump", "--path", files.path().to_str().unwrap()], None);
    let dumped = dumped.ok().to_owned();
    assert_eq!(dumped.lines().count(), 31);

    let data = tempfile::tempdir().unwrap();
    let node = start(&nats, data.path()).await;
    let host = node.url.trim_end_matches('/').to_owned();
    let restored = run(&["restore", "--host", &host], Some(&dumped));
    restored.ok();
    assert!(
        restored.stderr.contains("restored 31 events"),
        "{restored:?}"
    );
    let again = run(
        &["dump", "--host", &host, "--namespace", "app,orders"],
        None,
    );
    assert_eq!(again.ok(), dumped, "the same events, ids, times and order");

    // A keyed event keeps its key; an id resumes.
    let duplicate = node
        .post(json!({"subject": "orders.paid", "key": "order-1", "payload": {}}).to_string())
        .await;
    assert_eq!(duplicate.status(), 409);
    let tenth = serde_json::from_str::<serde_json::Value>(dumped.lines().nth(9).unwrap()).unwrap();
    let mut resumed = node
        .subscribe(&format!(
            "subject=app.a&start={}",
            tenth["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(payload_n(&resumed.take(1).await[0]), 10);
}
