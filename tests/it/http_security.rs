//! What a hostile client tries, over real HTTP: consumer names that leave their namespace,
//! replies written where the replier may not publish (or twice), durable consumers taken
//! over by other tokens, durations that overflow the clock, and small leaks of authority
//! (acks without the grant, HEAD with side effects, repeated parameters, consumer ids in
//! the log).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::cli::{free_port, Background};
use crate::common::http::*;

const WAIT: Duration = Duration::from_secs(5);

const AUTH_FILE: &str = "\
# token          namespaces              operations
a-admin          a                       publish,subscribe,ack,admin
billing-svc      billing                 publish,subscribe,ack
pub-orders       orders                  publish
pub-wide         orders,billing,_bus_    publish
worker           orders                  subscribe,ack
worker-pub       orders,_bus_            subscribe,ack,publish
inbox-reader     _bus_                   subscribe
payroll-svc      orders                  subscribe,ack
intruder         orders                  subscribe,ack
ops              orders                  subscribe,ack,admin
root             *                       publish,subscribe,ack,admin,metrics
";

/// A server with the auth file above over `data/data`; namespaces `a,billing,orders`.
async fn start(data: &std::path::Path) -> TestServer {
    let auth = data.join("auth");
    std::fs::write(&auth, AUTH_FILE).unwrap();
    let auth = auth.display().to_string();
    TestServer::start(
        &data.join("data"),
        &["--auth-file", &auth, "--namespaces", "a,billing,orders"],
    )
    .await
}

/// `method path` with a token and an optional body: the status and the body's text.
async fn call(
    server: &TestServer,
    method: Method,
    path_and_query: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, String) {
    let mut request = server
        .client
        .request(method, format!("{}{path_and_query}", server.url))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    // An event stream stays open: only a refusal's body is read.
    if header(&response, "content-type") == "text/event-stream" {
        return (status, String::new());
    }
    (status, response.text().await.unwrap())
}

async fn subscribe(server: &TestServer, query: &str, token: &str) -> Sse {
    server
        .subscribe_with(query, &[("authorization", &format!("Bearer {token}"))])
        .await
}

/// The events of `pattern` stored so far, read by the all-powerful token.
async fn stored(server: &TestServer, pattern: &str) -> Vec<Value> {
    let mut sse = subscribe(
        server,
        &format!("subject={pattern}&start=oldest&until=now"),
        "root",
    )
    .await;
    let mut events = Vec::new();
    while let Some(frame) = sse.next(WAIT).await {
        if frame.event.as_deref() == Some("done") {
            return events;
        }
        events.push(frame.json());
    }
    panic!("the until=now stream did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_names_cannot_leave_the_authorized_namespace() {
    if crate::common::http::skip_unless_file_store() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let mut server = start(data.path()).await;
    let data_dir = data.path().join("data");

    // billing's durable consumer, stored on disk.
    let mut invoicer = subscribe(
        &server,
        "subject=billing.>&ack=manual&consumer=invoicer",
        "billing-svc",
    )
    .await;
    server
        .publish_with_token(
            &json!({"subject": "billing.x", "payload": 1}),
            "billing-svc",
        )
        .await;
    let delivered = invoicer.next(WAIT).await.unwrap();
    assert_eq!(delivered.json()["subject"], "billing.x");
    let invoicer_file = data_dir.join("billing/consumers/invoicer.json");
    for _ in 0..100 {
        if invoicer_file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(invoicer_file.exists());
    // A file outside the data directory, and one of a's own files that is not a consumer.
    let outside = data.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("precious.json"), "{}").unwrap();
    std::fs::write(data_dir.join("a/notes.json"), "{}").unwrap();

    for name in [
        "..%2F..%2Fbilling%2Fconsumers%2Finvoicer",
        "..%2F..%2F..%2Foutside%2Fprecious",
        "..%2Fnotes",
        "..%2F00000000000000000000",
        "invoicer%00",
        "a.b",
    ] {
        let (status, body) = call(
            &server,
            Method::DELETE,
            &format!("consumers/a/{name}"),
            "a-admin",
            None,
        )
        .await;
        assert_eq!(status, 400, "{name}: {body}");
        assert!(body.contains("not a valid name"), "{name}: {body}");
        assert!(
            !body.contains(data.path().to_str().unwrap()),
            "{name}: the answer shows a server path: {body}"
        );
    }
    assert!(invoicer_file.exists(), "billing's consumer was deleted");
    assert!(outside.join("precious.json").exists());
    assert!(data_dir.join("a/notes.json").exists());

    // The namespace in the path is the one authorized: a's admin cannot reach billing.
    let (status, _) = call(
        &server,
        Method::DELETE,
        "consumers/billing/invoicer",
        "a-admin",
        None,
    )
    .await;
    assert_eq!(status, 403);
    // A valid name of a consumer that does not exist.
    let (status, _) = call(
        &server,
        Method::DELETE,
        "consumers/a/invoicer",
        "a-admin",
        None,
    )
    .await;
    assert_eq!(status, 404);

    // billing's consumer is untouched: after a restart it resumes where it was (the
    // unacknowledged event comes again), not at `newest`.
    drop(invoicer);
    server.stop().await;
    let mut server = start(data.path()).await;
    let mut invoicer = subscribe(
        &server,
        "subject=billing.>&ack=manual&consumer=invoicer",
        "billing-svc",
    )
    .await;
    let again = invoicer.next(WAIT).await.expect("the unacked event again");
    assert_eq!(again.id, delivered.id);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_subject_needs_the_publish_grant_of_its_namespace() {
    let data = tempfile::tempdir().unwrap();
    let mut server = start(data.path()).await;
    for (response_subject, token, expected) in [
        ("billing.replies", "pub-orders", 403),
        ("_bus_.inbox1", "pub-orders", 403),
        ("billing.replies", "pub-wide", 202),
        ("_bus_.inbox1", "pub-wide", 202),
    ] {
        let event = json!({"subject": "orders.request", "response_subject": response_subject, "payload": 1});
        let (status, body) = call(&server, Method::POST, "", token, Some(event)).await;
        assert_eq!(status, expected, "{response_subject} by {token}: {body}");
        if status == 403 {
            assert!(body.contains("publish in namespace"), "{body}");
        }
    }
    // Refused publishes stored nothing.
    assert_eq!(stored(&server, "orders.>").await.len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_needs_the_grant_a_delivery_and_is_taken_once() {
    let data = tempfile::tempdir().unwrap();
    let mut server = start(data.path()).await;
    let mut inbox = subscribe(&server, "subject=_bus_.inbox1", "inbox-reader").await;
    let request = |subject: &str, response_subject: &str| json!({"subject": subject, "response_subject": response_subject, "payload": "q"});

    // A worker without the publish grant on _bus_ cannot reply to an inbox.
    let mut worker = subscribe(
        &server,
        "subject=orders.requests&ack=manual&redelivery=30s",
        "worker",
    )
    .await;
    server
        .publish_with_token(&request("orders.requests", "_bus_.inbox1"), "pub-wide")
        .await;
    let question = worker.next(WAIT).await.unwrap();
    let reply_url = |sse: &Sse, id: &str| format!("?consumer_id={}&event_id={id}", sse.consumer_id);
    let (status, body) = call(
        &server,
        Method::PUT,
        &reply_url(&worker, question.id.as_deref().unwrap()),
        "worker",
        Some(json!({"answer": 1})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("publish in namespace \"_bus_\""), "{body}");
    inbox.expect_silence(Duration::from_millis(300)).await;
    drop(worker);

    // A worker with the grant: only for an event delivered to it, unacknowledged, once.
    let mut worker = subscribe(
        &server,
        "subject=orders.requests&ack=manual&redelivery=30s&start=oldest",
        "worker-pub",
    )
    .await;
    let question = worker.next(WAIT).await.unwrap(); // the same request, redelivered
    let question_id = question.id.clone().unwrap();
    // An event of the namespace never delivered to this consumer (another subject).
    let elsewhere = server
        .publish_with_token(&request("orders.other", "_bus_.inbox1"), "pub-wide")
        .await;
    let (status, body) = call(
        &server,
        Method::PUT,
        &reply_url(&worker, &elsewhere.id),
        "worker-pub",
        Some(json!({"answer": "forged"})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("not waiting for an ack"), "{body}");
    inbox.expect_silence(Duration::from_millis(300)).await;

    let (status, body) = call(
        &server,
        Method::PUT,
        &reply_url(&worker, &question_id),
        "worker-pub",
        Some(json!({"answer": 2})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let answer = inbox.next(WAIT).await.unwrap();
    assert_eq!(answer.json()["payload"], json!({"answer": 2}));
    for _ in 0..3 {
        let (status, body) = call(
            &server,
            Method::PUT,
            &reply_url(&worker, &question_id),
            "worker-pub",
            Some(json!({"answer": 3})),
        )
        .await;
        assert_eq!(status, 409, "{body}");
    }
    inbox.expect_silence(Duration::from_millis(300)).await;

    // A reply into another namespace needs that namespace's grant too.
    server
        .publish_with_token(&request("orders.requests", "billing.replies"), "pub-wide")
        .await;
    let question = worker.next(WAIT).await.unwrap();
    let (status, body) = call(
        &server,
        Method::PUT,
        &reply_url(&worker, question.id.as_deref().unwrap()),
        "worker-pub",
        Some(json!({"answer": 4})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(stored(&server, "billing.>").await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_belongs_to_the_token_that_created_it() {
    let data = tempfile::tempdir().unwrap();
    let mut server = start(data.path()).await;
    let query = "subject=orders.pay.>&ack=manual&consumer=payroll";
    let owner = subscribe(&server, query, "payroll-svc").await;
    let (status, body) = call(&server, Method::GET, &format!("?{query}"), "intruder", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("belongs to another token"), "{body}");
    // Ownership is decided before the pattern is compared: nothing about it is told.
    let (status, _) = call(
        &server,
        Method::GET,
        "?subject=orders.other&ack=manual&consumer=payroll",
        "intruder",
        None,
    )
    .await;
    assert_eq!(status, 403);
    let admin = subscribe(&server, query, "ops").await;
    drop((owner, admin));

    // Ownership is stored with the consumer: it holds after a restart.
    server.stop().await;
    let mut server = start(data.path()).await;
    let (status, _) = call(&server, Method::GET, &format!("?{query}"), "intruder", None).await;
    assert_eq!(status, 403);
    let owner = subscribe(&server, query, "payroll-svc").await;
    // The intruder's own consumer is its own.
    let theirs = subscribe(
        &server,
        "subject=orders.pay.>&ack=manual&consumer=mine",
        "intruder",
    )
    .await;
    let (status, _) = call(
        &server,
        Method::GET,
        "?subject=orders.pay.>&ack=manual&consumer=mine",
        "payroll-svc",
        None,
    )
    .await;
    assert_eq!(status, 403);
    drop((owner, theirs));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_beyond_the_maximum_are_refused_and_never_end_a_stream() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    for query in [
        "subject=app.x&ack=manual&redelivery=18446744073709551615s",
        "subject=app.x&ack=manual&redelivery=25h",
    ] {
        let response = server.request(Method::GET, query).await;
        assert_eq!(response.status(), 400, "{query}");
        assert!(response.text().await.unwrap().contains("longest allowed"));
    }

    // Two members of a durable consumer; one naks with the longest delay allowed, and a
    // delay beyond it is refused.
    let query = "subject=app.x&ack=manual&consumer=group&redelivery=24h";
    let mut first = server.subscribe(query).await;
    let mut second = server.subscribe(query).await;
    let (first_id, second_id) = (first.consumer_id.clone(), second.consumer_id.clone());
    server
        .publish(&json!({"subject": "app.x", "payload": 0}))
        .await;
    let (held, holder_consumer) = tokio::select! {
        Some(frame) = first.next(WAIT) => (frame, first_id),
        Some(frame) = second.next(WAIT) => (frame, second_id),
    };
    let nak = |consumer_id: &str, delay: &str| {
        format!(
            "consumer_id={consumer_id}&event_id={}&nak=1&delay={delay}",
            held.id.as_deref().unwrap()
        )
    };
    for delay in ["18446744073709551615s", "9223372036854775807ns0.5h", "25h"] {
        let response = server
            .request(Method::PUT, &nak(&holder_consumer, delay))
            .await;
        assert_eq!(response.status(), 400, "{delay}");
    }
    let response = server
        .request(Method::PUT, &nak(&holder_consumer, "24h"))
        .await;
    assert_eq!(response.status(), 202);
    // The dispatcher lives on: new events still reach the members.
    server
        .publish(&json!({"subject": "app.x", "payload": 1}))
        .await;
    let next = tokio::select! {
        Some(frame) = first.next(WAIT) => frame,
        Some(frame) = second.next(WAIT) => frame,
    };
    assert_eq!(next.json()["payload"], 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_need_the_grant_even_when_nobody_waits_for_them() {
    let data = tempfile::tempdir().unwrap();
    let mut server = start(data.path()).await;
    let query = "?consumer_id=c_nobody00000000000000&event_id=e_nothing000000000000";
    let (status, body) = call(&server, Method::PUT, query, "pub-orders", None).await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = call(&server, Method::PUT, query, "worker", None).await;
    assert_eq!(status, 202, "late acks stay normal for tokens that may ack");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let response = server
        .request(Method::HEAD, "subject=app.x&ack=manual&consumer=probe")
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), "text/event-stream");
    let bad = server
        .request(Method::HEAD, "subject=app.x&ack=manual&consumer=a%2Fb")
        .await;
    assert_eq!(bad.status(), 400, "HEAD checks like GET");
    let listed = server.list_consumers("app").await;
    assert_eq!(listed, json!([]), "HEAD created a consumer");
    assert!(!data.path().join("app/consumers/probe.json").exists());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_parameter_is_refused_on_every_route() {
    let data = tempfile::tempdir().unwrap();
    let mut server = start(data.path()).await;
    let event = || Some(json!({"subject": "orders.x", "payload": 1}));
    for (method, query, body) in [
        (Method::POST, "?timeout=1s&timeout=2s&confirm=1", event()),
        (Method::POST, "?confirm=1&confirm=2", event()),
        (Method::POST, "?reply=1&reply=0", event()),
        (Method::GET, "?subject=orders.a&ack=none&ack=manual", None),
        (
            Method::GET,
            "?subject=orders.a&start=oldest&start=newest",
            None,
        ),
        (
            Method::PUT,
            "?consumer_id=c_a&consumer_id=c_b&event_id=e_1",
            None,
        ),
        (
            Method::PUT,
            "?consumer_id=c_a&event_id=e_1&nak=1&nak=0",
            None,
        ),
    ] {
        let (status, text) = call(&server, method.clone(), query, "root", body).await;
        assert_eq!(status, 400, "{method} {query}: {text}");
        assert!(text.contains("more than once"), "{method} {query}: {text}");
    }
    // The token itself, twice in the query, is refused too (never first- or last-wins).
    let response = server
        .client
        .post(format!(
            "{}?access_token=root&access_token=intruder",
            server.url
        ))
        .body(json!({"subject": "orders.x"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // A malformed escape is refused, not read as absent.
    let (status, _) = call(&server, Method::GET, "?subject=orders.%zz", "root", None).await;
    assert_eq!(status, 400);
    // Parameters the endpoint does not read may repeat, as the reference ignores them.
    let (status, _) = call(&server, Method::POST, "?_=1&_=2", "root", event()).await;
    assert_eq!(status, 202);
    server.stop().await;
}

#[test]
fn consumer_ids_never_reach_the_log() {
    let data = tempfile::tempdir().unwrap();
    let host = format!("127.0.0.1:{}", free_port());
    let path = data.path().display().to_string();
    let mut server = Background::start_with_env(
        &[
            "server",
            "--addr",
            &host,
            "--path",
            &path,
            "--namespaces",
            "app",
        ],
        &[("BUS_LOG_LEVEL", "DEBUG")],
    );
    server.wait_for_stderr("listening");
    let consumer_id = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&host).unwrap();
        stream
            .write_all(b"GET /?subject=app.x&ack=manual HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        head.lines()
            .find_map(|line| {
                line.to_ascii_lowercase()
                    .strip_prefix("x-bus-consumer-id: ")
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("no consumer id in {head}"))
    };
    server.wait_for_stderr("stream closed");
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    assert_eq!(server.wait(), 0);
    let log = server.errors.join("\n");
    assert!(log.contains("stream opened"), "{log}");
    assert!(
        !log.to_ascii_lowercase().contains(&consumer_id),
        "{consumer_id} logged:\n{log}"
    );
}
