//! HTTPS with `--tls-cert`/`--tls-key`: publishing and streaming over TLS (raw, through
//! the Rust SDK and through the CLI), plain HTTP refused on the TLS port, an unknown
//! certificate authority refused by the clients, and clear start-up errors for bad
//! certificate files.
//! The fixtures in tests/fixtures/tls are a test CA and a localhost certificate it signed
//! (valid until 2126); their keys protect nothing.

use std::path::PathBuf;
use std::time::Duration;

use bus::client::{Client, ClientError, NewEvent, Received, Start, SubscribeOptions};
use bus::config::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common;
use crate::common::http::*;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
        .display()
        .to_string()
}

/// One request over a new TLS connection; everything the server sends until it closes.
async fn https(addr: std::net::SocketAddr, request: String) -> String {
    let mut tls = common::tls::connect(addr, "ca.pem", "localhost", &[])
        .await
        .expect("TLS handshake");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_stream_over_tls() {
    let data = tempfile::tempdir().unwrap();
    let (cert, key) = (fixture("cert.pem"), fixture("key.pem"));
    let mut server =
        TestServer::start(data.path(), &["--tls-cert", &cert, "--tls-key", &key]).await;
    let addr = server.server.as_ref().unwrap().local_addr();

    let body = r#"{"subject":"app.secure","payload":{"n":1}}"#;
    let answer = https(
        addr,
        format!(
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

    let stream = https(
        addr,
        "GET /?subject=app.>&start=oldest&until=now HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            .into(),
    )
    .await;
    assert!(stream.starts_with("HTTP/1.1 200"), "{stream}");
    assert!(stream.contains(r#""subject":"app.secure""#), "{stream}");
    assert!(stream.contains("event: done"), "{stream}");

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_and_the_cli_speak_https_with_a_private_ca() {
    let data = tempfile::tempdir().unwrap();
    let (cert, key, ca) = (fixture("cert.pem"), fixture("key.pem"), fixture("ca.pem"));
    let mut server =
        TestServer::start(data.path(), &["--tls-cert", &cert, "--tls-key", &key]).await;
    let port = server.server.as_ref().unwrap().local_addr().port();
    let host = format!("https://localhost:{port}");

    // Without the CA, the server's certificate is refused, and the error says why.
    let error = Client::new(&host).unwrap().health().await.unwrap_err();
    assert!(
        matches!(&error, ClientError::Unreachable { reason, .. } if reason.contains("certificate")),
        "{error}"
    );

    let client = Client::new(&host)
        .unwrap()
        .with_root_certificate(&std::fs::read(&ca).unwrap())
        .unwrap();
    let event = NewEvent::new("app.tls").with_payload(&1).unwrap();
    assert_eq!(client.publish(&event).await.unwrap().index, 0);

    // The CLI, a real process, with --ca-cert.
    let cli_host = host.clone();
    let put = tokio::task::spawn_blocking(move || {
        common::cli::run(
            &[
                "put",
                "--host",
                &cli_host,
                "--ca-cert",
                &ca,
                "--subject",
                "app.tls",
                "--data",
                "2",
            ],
            None,
        )
    })
    .await
    .unwrap();
    assert!(put.ok().contains(r#""index":1"#), "{put:?}");

    let options = SubscribeOptions::new("app.tls")
        .with_start(Start::Oldest)
        .with_until_now();
    let mut numbers = Vec::new();
    let mut subscription = client.subscribe(options).await.unwrap();
    while let Some(received) = subscription.next().await {
        if let Received::Event(event) = received.unwrap() {
            numbers.push(event.payload_as::<u32>().unwrap());
        }
    }
    assert_eq!(numbers, [1, 2]);

    // A file that holds no certificate is refused before anything is sent.
    assert!(matches!(
        Client::new(&host)
            .unwrap()
            .with_root_certificate(b"not a certificate"),
        Err(ClientError::Certificate(_))
    ));
    server.stop().await;
}

#[tokio::test]
async fn bad_certificate_settings_fail_at_start_with_the_file_named() {
    assert!(
        ServerConfig::from_args(["--namespaces", "app", "--tls-cert", "c.pem"]).is_err(),
        "--tls-cert needs --tls-key"
    );
    let data = tempfile::tempdir().unwrap();
    let garbage = data.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let garbage = garbage.display().to_string();
    let key = fixture("key.pem");
    let config = ServerConfig::from_args([
        "--addr",
        "127.0.0.1:0",
        "--path",
        &data.path().join("d").display().to_string(),
        "--namespaces",
        "app",
        "--tls-cert",
        &garbage,
        "--tls-key",
        &key,
    ])
    .unwrap();
    let error = match bus::server::start(&config).await {
        Ok(_) => panic!("started with a garbage certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("--tls-cert") && error.contains("garbage.pem"),
        "{error}"
    );
}

/// `POST /admin/reload` over HTTP/2 on `send`: the status and the JSON report.
async fn admin_reload(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
) -> (u16, serde_json::Value) {
    let request = axum::http::Request::post("https://localhost/admin/reload")
        .body(())
        .unwrap();
    let (answer, _) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, true)
        .unwrap();
    let answer = answer.await.unwrap();
    let status = answer.status().as_u16();
    let mut body = answer.into_body();
    let mut text = Vec::new();
    while let Some(data) = body.data().await {
        text.extend_from_slice(&data.unwrap());
    }
    (status, serde_json::from_slice(&text).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_replaces_the_certificate_and_open_connections_go_on() {
    let data = tempfile::tempdir().unwrap();
    let (cert, key) = (data.path().join("cert.pem"), data.path().join("key.pem"));
    std::fs::copy(fixture("cert.pem"), &cert).unwrap();
    std::fs::copy(fixture("key.pem"), &key).unwrap();
    let mut server = TestServer::start(
        &data.path().join("data"),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let addr = server.server.as_ref().unwrap().local_addr();

    // An HTTP/2 connection with an event stream open, from before the reload.
    let tls = common::tls::connect(addr, "ca.pem", "localhost", &[b"h2"])
        .await
        .unwrap();
    let (mut send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = axum::http::Request::get("https://localhost/?subject=app.%3E")
        .body(())
        .unwrap();
    let (answer, _) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, true)
        .unwrap();
    let mut stream = answer.await.unwrap().into_body();

    // Another certificate (another name, another CA) in the same files, then a reload.
    std::fs::copy(fixture("public-name-cert.pem"), &cert).unwrap();
    std::fs::copy(fixture("public-name-key.pem"), &key).unwrap();
    let (status, report) = admin_reload(&mut send).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["steps"][0]["name"], "TLS certificate", "{report}");
    assert_eq!(report["steps"][0]["ok"], true, "{report}");

    // New handshakes present the new certificate; the old one is no longer offered.
    common::tls::connect(
        addr,
        "public-name-ca.pem",
        "bus.example.com",
        &[b"http/1.1"],
    )
    .await
    .expect("the new certificate");
    let old = common::tls::connect(addr, "ca.pem", "localhost", &[b"http/1.1"]).await;
    assert!(old.is_err(), "the old certificate is still presented");

    // The connection from before goes on: its stream gets what is published now.
    let request = axum::http::Request::post("https://localhost/")
        .body(())
        .unwrap();
    let (answer, mut body) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    body.send_data(r#"{"subject":"app.after","payload":1}"#.into(), true)
        .unwrap();
    assert_eq!(answer.await.unwrap().status(), 202);
    let mut read = String::new();
    while !read.contains("app.after") {
        let data = tokio::time::timeout(Duration::from_secs(10), stream.data())
            .await
            .expect("the event on the stream opened before the reload")
            .unwrap()
            .unwrap();
        read.push_str(&String::from_utf8_lossy(&data));
    }

    // A key that does not match: the reload fails, saying why, and the certificate stays.
    std::fs::copy(fixture("key.pem"), &key).unwrap();
    let (status, report) = admin_reload(&mut send).await;
    assert_eq!(status, 500, "{report}");
    assert_eq!(report["steps"][0]["ok"], false, "{report}");
    assert!(
        report["steps"][0]["message"]
            .as_str()
            .unwrap()
            .contains("--tls-key"),
        "{report}"
    );
    common::tls::connect(
        addr,
        "public-name-ca.pem",
        "bus.example.com",
        &[b"http/1.1"],
    )
    .await
    .expect("the certificate from before the failed reload");
    server.stop().await;
}
