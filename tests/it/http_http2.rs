//! HTTP/2: in clear text with prior knowledge (h2c) and over TLS by ALPN, many event
//! streams on one connection, the server's limits under HTTP/2, and curl's
//! `--http2-prior-knowledge`. The client is the `h2` crate (what hyper's HTTP/2 is built
//! on), driven by hand so that what goes on the connection is what the test says.

use std::process::Command;
use std::time::Duration;

use axum::http::{self, Method, Request, StatusCode};
use bytes::Bytes;
use h2::client::SendRequest;
use h2::RecvStream;
use tokio::net::TcpStream;

use crate::common;
use crate::common::http::*;

const WAIT: Duration = Duration::from_secs(10);

/// An HTTP/2 connection in clear text to `url` (`http://host:port/`), and the task that
/// drives it: the task ends when the connection does.
async fn connect(url: &str) -> (SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let authority = url.trim_start_matches("http://").trim_end_matches('/');
    let tcp = TcpStream::connect(authority).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (send, driver)
}

/// Sends a request; its answer's status, headers and body stream.
async fn request(
    send: &mut SendRequest<Bytes>,
    method: Method,
    target: &str,
    body: Option<&str>,
) -> http::Response<RecvStream> {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://localhost{target}"))
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.expect("a stream to send on");
    let (response, mut stream) = ready
        .send_request(request, body.is_none())
        .expect("request sent");
    if let Some(body) = body {
        stream
            .send_data(Bytes::copy_from_slice(body.as_bytes()), true)
            .unwrap();
    }
    tokio::time::timeout(WAIT, response)
        .await
        .expect("an answer in time")
        .expect("an answer")
}

/// Reads a body until `text` appears in it; everything read.
async fn read_until(body: &mut RecvStream, text: &str) -> String {
    let mut read = String::new();
    while !read.contains(text) {
        let data = tokio::time::timeout(WAIT, body.data())
            .await
            .unwrap_or_else(|_| panic!("{text:?} did not come; read: {read}"))
            .unwrap_or_else(|| panic!("the body ended before {text:?}; read: {read}"))
            .expect("body data");
        let _ = body.flow_control().release_capacity(data.len());
        read.push_str(&String::from_utf8_lossy(&data));
    }
    read
}

/// The whole body of an answer.
async fn read_all(body: &mut RecvStream) -> String {
    let mut read = String::new();
    while let Some(data) = tokio::time::timeout(WAIT, body.data()).await.unwrap() {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
        read.push_str(&String::from_utf8_lossy(&data));
    }
    read
}

/// A gauge's value in the server's metrics, whatever its labels.
async fn gauge(send: &mut SendRequest<Bytes>, name: &str) -> f64 {
    let mut answer = request(send, Method::GET, "/metrics", None).await;
    let text = read_all(answer.body_mut()).await;
    text.lines()
        .find(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_event_streams_and_their_publisher_share_one_connection() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let (mut send, _driver) = connect(&server.url).await;

    let mut streams = Vec::new();
    for _ in 0..20 {
        let answer = request(&mut send, Method::GET, "/?subject=app.chat", None).await;
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.headers()["content-type"], "text/event-stream");
        // HTTP/1.1's connection management has no place in HTTP/2 (RFC 9113, 8.2.2).
        assert!(answer.headers().get("connection").is_none());
        streams.push(answer.into_body());
    }
    assert_eq!(gauge(&mut send, "bus_subscriptions_active").await, 20.0);
    assert_eq!(gauge(&mut send, "bus_connections_active").await, 1.0);

    let published = request(
        &mut send,
        Method::POST,
        "/",
        Some(r#"{"subject":"app.chat","payload":{"text":"hello"}}"#),
    )
    .await;
    assert_eq!(published.status(), StatusCode::ACCEPTED);
    let id = published.headers()["x-bus-event-id"]
        .to_str()
        .unwrap()
        .to_owned();
    for stream in &mut streams {
        let frames = read_until(stream, "\n\n").await;
        assert!(frames.contains(&format!("id: {id}\n")), "{frames}");
        assert!(frames.contains(r#""payload":{"text":"hello"}"#), "{frames}");
    }

    // Streams closed by the client (a reset) free their subscriptions.
    drop(streams);
    let deadline = tokio::time::Instant::now() + WAIT;
    while gauge(&mut send, "bus_subscriptions_active").await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "streams were not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_limits_hold_under_http2() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(
        data.path(),
        &[
            "--max-subscriptions",
            "3",
            "--max-body",
            "1KiB",
            "--idle-timeout",
            "1s",
            "--ping-interval",
            "300ms",
        ],
    )
    .await;
    let (mut send, driver) = connect(&server.url).await;

    // --max-subscriptions counts streams, not connections.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let answer = request(&mut send, Method::GET, "/?subject=app.x", None).await;
        assert_eq!(answer.status(), StatusCode::OK);
        streams.push(answer.into_body());
    }
    // The server said (in its settings, in by now) how many requests a connection may have
    // open at once.
    assert_eq!(send.current_max_send_streams(), 256);
    let mut refused = request(&mut send, Method::GET, "/?subject=app.x", None).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    let text = read_all(refused.body_mut()).await;
    assert!(text.contains("--max-subscriptions"), "{text}");

    // --max-body, whatever the protocol.
    let large = format!(r#"{{"subject":"app.x","payload":"{}"}}"#, "x".repeat(2000));
    let mut too_large = request(&mut send, Method::POST, "/", Some(&large)).await;
    assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let text = read_all(too_large.body_mut()).await;
    assert!(text.contains("--max-body"), "{text}");

    // A header block over 64 KiB is answered 431, as a request head that large is over
    // HTTP/1.1, and the connection goes on.
    let mut huge = Request::builder()
        .uri("http://localhost/healthz")
        .body(())
        .unwrap();
    huge.headers_mut()
        .insert("x-filler", "y".repeat(70 << 10).parse().unwrap());
    let (answer, _) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(huge, true)
        .unwrap();
    let answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
    assert_eq!(answer.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    // Open event streams keep the connection past --idle-timeout (their pings flow) ...
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !driver.is_finished(),
        "a connection with open streams was closed"
    );
    for stream in &mut streams {
        read_until(stream, ": ping").await;
    }
    assert_eq!(
        gauge(&mut send, "bus_subscriptions_active").await,
        streams.len() as f64
    );
    // ... and once none is open, an idle connection is closed.
    drop(streams);
    drop(send);
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("an idle HTTP/2 connection is closed after --idle-timeout")
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_ends_http2_streams_and_connections() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let (mut send, driver) = connect(&server.url).await;
    let answer = request(&mut send, Method::GET, "/?subject=app.x", None).await;
    let mut stream = answer.into_body();
    tokio::time::timeout(WAIT, server.stop())
        .await
        .expect("the server stops with an HTTP/2 stream open");
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(Ok(_)) = stream.data().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream did not end");
    tokio::time::timeout(WAIT, driver)
        .await
        .expect("the connection closed")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_clients_choose_http2_by_alpn() {
    let data = tempfile::tempdir().unwrap();
    let (cert, key) = (
        common::tls::fixture("cert.pem"),
        common::tls::fixture("key.pem"),
    );
    let mut server = TestServer::start(
        data.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let addr = server.server.as_ref().unwrap().local_addr();

    let tls = common::tls::connect(addr, "ca.pem", "localhost", &[b"h2", b"http/1.1"])
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, connection) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });

    let stream = request(&mut send, Method::GET, "/?subject=app.%3E", None).await;
    assert_eq!(stream.status(), StatusCode::OK);
    let mut stream = stream.into_body();
    let published = request(
        &mut send,
        Method::POST,
        "/",
        Some(r#"{"subject":"app.tls","payload":1}"#),
    )
    .await;
    assert_eq!(published.status(), StatusCode::ACCEPTED);
    let frames = read_until(&mut stream, "\n\n").await;
    assert!(frames.contains(r#""subject":"app.tls""#), "{frames}");
    server.stop().await;
}

/// Runs curl with `args`; its standard output. curl is a test requirement (`.ci/run`
/// installs it).
fn curl(args: &[&str]) -> String {
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed (apt-get install curl)");
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_publishes_and_subscribes_with_http2_prior_knowledge() {
    let data = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(data.path(), &[]).await;
    let url = server.url.clone();
    let (published, streamed) = tokio::task::spawn_blocking(move || {
        let published = curl(&[
            "--http2-prior-knowledge",
            "--write-out",
            "\n%{http_version} %{http_code}",
            "--data",
            r#"{"subject":"app.curl","payload":{"n":1}}"#,
            &url,
        ]);
        // The pattern percent-encoded: HTTP/2 takes request targets as the URL standard
        // writes them (HTTP/1.1 here also takes a raw `>`).
        let streamed = curl(&[
            "--http2-prior-knowledge",
            "--write-out",
            "\n%{http_version} %{http_code}",
            "--get",
            "--data-urlencode",
            "subject=app.>",
            "--data",
            "start=oldest&until=now",
            &url,
        ]);
        (published, streamed)
    })
    .await
    .unwrap();
    assert!(published.ends_with("\n2 202"), "{published}");
    assert!(streamed.contains(r#""subject":"app.curl""#), "{streamed}");
    assert!(streamed.contains("event: done"), "{streamed}");
    assert!(streamed.ends_with("\n2 200"), "{streamed}");
    server.stop().await;
}
