use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Uri};
use axum::routing::{get, post};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

fn limits(idle_timeout: Duration) -> Arc<Limits> {
    Arc::new(Limits {
        max_body: 1 << 20,
        max_subject_len: 1024,
        max_connections: 16,
        max_subscriptions: 16,
        max_key_len: 1024,
        max_batch: 100,
        idle_timeout,
        body_timeout: Duration::from_secs(5),
    })
}

/// A router that echoes what it was asked, and streams on `/stream`.
fn router() -> Router {
    Router::new()
        .route(
            "/",
            get(|uri: Uri| async move { format!("uri={uri}") }).post(
                |headers: HeaderMap, request: Request| async move {
                    let body = axum::body::to_bytes(request.into_body(), 1 << 20).await;
                    match body {
                        Ok(body) => format!(
                            "body={} te={:?}",
                            String::from_utf8_lossy(&body),
                            headers.get("transfer-encoding")
                        ),
                        Err(e) => format!("error={e}"),
                    }
                },
            ),
        )
        .route(
            "/refuse",
            post(|| async { (StatusCode::UNAUTHORIZED, "no body read") }),
        )
        .route(
            "/stream",
            get(|| async {
                let pieces = futures_util::stream::iter(["one", "two"])
                    .map(|s| Ok::<_, io::Error>(Bytes::from_static(s.as_bytes())))
                    .chain(futures_util::stream::pending());
                Response::new(Body::from_stream(pieces))
            }),
        )
        .route(
            "/finite",
            get(|| async {
                let pieces = futures_util::stream::iter(["ab", "cde"])
                    .map(|s| Ok::<_, io::Error>(Bytes::from_static(s.as_bytes())));
                Response::new(Body::from_stream(pieces))
            }),
        )
}

/// Starts a connection served by `serve`; returns the client's end and the shutdown switch.
fn connect(
    idle_timeout: Duration,
) -> (
    DuplexStream,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    connect_counted(idle_timeout, Arc::new(Traffic::new(false)))
}

fn connect_counted(
    idle_timeout: Duration,
    traffic: Arc<Traffic>,
) -> (
    DuplexStream,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(serve(
        server,
        BytesMut::new(),
        router(),
        limits(idle_timeout),
        traffic,
        shutdown,
    ));
    (client, stop, task)
}

/// Writes `input` in pieces of `chunk` bytes, then reads until the server closes.
async fn exchange(input: &[u8], chunk: usize, half_close: bool) -> String {
    exchange_counted(input, chunk, half_close, &Arc::new(Traffic::new(false))).await
}

/// [`exchange`], its refusals counted in `traffic`.
async fn exchange_counted(
    input: &[u8],
    chunk: usize,
    half_close: bool,
    traffic: &Arc<Traffic>,
) -> String {
    let (mut client, _stop, task) =
        connect_counted(Duration::from_millis(300), Arc::clone(traffic));
    for piece in input.chunks(chunk) {
        client.write_all(piece).await.unwrap();
        tokio::task::yield_now().await;
    }
    if half_close {
        client.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .unwrap();
    drop(client);
    task.await.unwrap();
    String::from_utf8(out).unwrap()
}

/// The bodies of the answers in `text`, in order (answers of known length only).
fn bodies(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(head_end) = rest.find("\r\n\r\n") {
        let head = &rest[..head_end];
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse().unwrap());
        let body_start = head_end + 4;
        out.push(rest[body_start..body_start + len].to_owned());
        rest = &rest[body_start + len..];
    }
    out
}

#[tokio::test]
async fn raw_wildcards_are_encoded_and_pipelined_requests_answered_in_order() {
    let body = r#"{"subject":"a.>"}"#;
    let input = format!(
        "GET /?subject=orders.>&x=\"<a>\" HTTP/1.1\r\nHost: h\r\n\r\n\
         POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}\
         \r\nGET /?subject=a.> HTTP/1.1\r\nX: >\r\nConnection: close\r\n\r\n",
        body.len()
    );
    for chunk in [1, 3, 17, 4096] {
        let text = exchange(input.as_bytes(), chunk, false).await;
        assert_eq!(
            bodies(&text),
            [
                "uri=/?subject=orders.%3E&x=%22%3Ca%3E%22".to_owned(),
                format!("body={body} te=None"),
                "uri=/?subject=a.%3E".to_owned(),
            ],
            "chunks of {chunk}: {text}"
        );
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\r\ndate: "), "{text}");
        assert!(
            text.ends_with("connection: close\r\n\r\nuri=/?subject=a.%3E"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn chunked_bodies_are_decoded() {
    let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n\
        GET /?after HTTP/1.1\r\nConnection: close\r\n\r\n";
    for chunk in [1, 5, 4096] {
        let text = exchange(input, chunk, false).await;
        assert_eq!(
            bodies(&text),
            [r#"body=abcdefg te=Some("chunked")"#, "uri=/?after"],
            "chunks of {chunk}: {text}"
        );
    }
}

#[tokio::test]
async fn an_answer_is_sent_after_the_client_ends_its_side() {
    let text = exchange(b"GET /?x HTTP/1.1\r\nHost: h\r\n\r\n", 4096, true).await;
    assert_eq!(bodies(&text), ["uri=/?x"], "{text}");
}

#[tokio::test]
async fn malformed_framing_and_large_heads_are_refused_with_reasons() {
    let both = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc";
    let text = exchange(both, 4096, false).await;
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(
        text.contains("both Content-Length and Transfer-Encoding"),
        "{text}"
    );

    let conflicting = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd";
    let text = exchange(conflicting, 4096, false).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");

    let gzip = b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n";
    let text = exchange(gzip, 4096, false).await;
    assert!(text.starts_with("HTTP/1.1 501"), "{text}");

    let garbage = b"GET / HTTP/1.1\r\nBad Header\r\n\r\n";
    let text = exchange(garbage, 4096, false).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");

    let huge = format!("GET /?{} HTTP/1.1\r\n\r\n", "q".repeat(MAX_HEAD + 10));
    let traffic = Arc::new(Traffic::new(false));
    let text = exchange_counted(huge.as_bytes(), 8192, false, &traffic).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text:.200}");
    assert!(text.contains("larger than 64 KiB"), "{text:.200}");
    // Refused before any handler, and counted all the same, by what the head showed.
    let text = exchange_counted(both, 4096, false, &traffic).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(traffic.count(Route::Subscribe, 431), 1);
    assert_eq!(traffic.count(Route::Publish, 400), 1);
}

#[tokio::test]
async fn continue_is_sent_only_when_the_body_is_read() {
    let (mut client, _stop, _task) = connect(Duration::from_secs(5));
    client
        .write_all(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = client.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    client.write_all(b"xyz").await.unwrap();
    let n = client.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(bodies(&text), ["body=xyz te=None"], "{text}");

    // Refused before its body: no 100, and the connection closes after the answer, as
    // the body it announced was never read.
    let (mut client, _stop, task) = connect(Duration::from_secs(5));
    client
        .write_all(b"POST /refuse HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    task.await.unwrap();
}

#[tokio::test]
async fn streams_are_chunked_and_end_when_the_client_leaves() {
    let (mut client, _stop, task) = connect(Duration::from_secs(5));
    client
        .write_all(b"GET /stream HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !seen.ends_with(b"3\r\ntwo\r\n") {
        let mut buf = [0u8; 256];
        let n = client.read(&mut buf).await.unwrap();
        assert_ne!(n, 0);
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(seen).unwrap();
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n3\r\none\r\n3\r\ntwo\r\n"), "{text}");
    // The body never ends by itself; the client's leaving ends the connection.
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the stream ended with its client")
        .unwrap();
}

#[tokio::test]
async fn a_finished_stream_leaves_the_connection_usable() {
    let text = exchange(
        b"GET /finite HTTP/1.1\r\n\r\nGET /?next HTTP/1.1\r\nConnection: close\r\n\r\n",
        4096,
        false,
    )
    .await;
    let (first, second) = text
        .split_once("0\r\n\r\n")
        .expect("the chunked body ended");
    assert!(
        first.ends_with("\r\n\r\n2\r\nab\r\n3\r\ncde\r\n"),
        "{first}"
    );
    assert_eq!(bodies(second), ["uri=/?next"], "{second}");
}

#[tokio::test]
async fn http_1_0_clients_get_keep_alive_only_when_asked() {
    let text = exchange(b"GET /?a HTTP/1.0\r\n\r\n", 4096, false).await;
    assert_eq!(bodies(&text), ["uri=/?a"]);
    assert!(text.contains("connection: close\r\n"), "{text}");

    let text = exchange(
        b"GET /?a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /?b HTTP/1.0\r\n\r\n",
        4096,
        false,
    )
    .await;
    assert_eq!(bodies(&text), ["uri=/?a", "uri=/?b"], "{text}");
    assert!(text.contains("connection: keep-alive\r\n"), "{text}");

    // An HTTP/1.0 client cannot read chunks: a stream runs until the connection closes.
    let text = exchange(
        b"GET /finite HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        4096,
        false,
    )
    .await;
    assert!(text.ends_with("\r\n\r\nabcde"), "{text}");
    assert!(!text.contains("chunked"), "{text}");
}

#[tokio::test]
async fn idle_connections_close_and_shutdown_closes_them_between_requests() {
    let (mut client, _stop, task) = connect(Duration::from_millis(100));
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out))
        .await
        .expect("closed after the idle timeout")
        .unwrap();
    assert!(out.is_empty());
    task.await.unwrap();

    let (mut client, stop, task) = connect(Duration::from_secs(60));
    client.write_all(b"GET /?a HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    let n = client.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).ends_with("uri=/?a"));
    stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("shut down")
        .unwrap();
}

#[tokio::test]
async fn a_malformed_body_closes_the_connection_after_its_answer() {
    // An empty chunk-size line: what follows cannot be framed, so it is never taken for
    // a request (or for trailers).
    let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        3\r\nabc\r\n\r\nGET /?smuggled HTTP/1.1\r\n\r\n";
    let text = exchange(input, 4096, false).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("error="), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(!text.contains("smuggled"), "{text}");
}

#[test]
fn digits_are_written_in_either_base() {
    assert_eq!(digits(0, 10, &mut [0; 20]), b"0");
    assert_eq!(digits(8_192, 10, &mut [0; 20]), b"8192");
    assert_eq!(digits(u64::MAX, 10, &mut [0; 20]), b"18446744073709551615");
    assert_eq!(digits(255, 16, &mut [0; 20]), b"ff");
    assert_eq!(digits(0x1_0000, 16, &mut [0; 20]), b"10000");
}

#[test]
fn chunk_sizes_are_read_from_whole_lines() {
    assert_eq!(chunk_size(b"1a\r"), Some(26));
    assert_eq!(chunk_size(b"0"), Some(0));
    assert_eq!(chunk_size(b"5 ;name=value\r"), Some(5));
    assert_eq!(chunk_size(b"AA;AAA1A9\0\x001POST"), Some(170));
    for bad in [&b""[..], b"\r", b"x1", b"1x", b"1\r2", b"11111111111111111"] {
        assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
    }
}

#[tokio::test]
async fn a_chunked_body_means_the_same_however_it_arrives() {
    // Found by fuzzing: an extension with odd bytes and no line end, then the end of the
    // connection. Whatever the pieces, the body is cut off, and that is what is said.
    let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\t\n\r\nAA;AAA1A9\0\x001POST >>>";
    let mut answers = Vec::new();
    for chunk in [1, 2, 3, 5, 11, 4096] {
        let text = exchange(input, chunk, true).await;
        answers.push(bodies(&text));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert!(
        answers[0][0].contains("closed before the body was complete"),
        "{answers:?}"
    );
}
