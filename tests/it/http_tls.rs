//! HTTPS with `--tls-cert`/`--tls-key`: publishing and streaming over TLS (raw, through
//! the Rust SDK and through the CLI), plain HTTP refused on the TLS port, an unknown
//! certificate authority refused by the clients, and clear start-up errors for bad
//! certificate files.
//! The fixtures in tests/fixtures/tls are a test CA and a localhost certificate it signed
//! (valid until 2126); their keys protect nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bus::client::{Client, ClientError, NewEvent, Received, Start, SubscribeOptions};
use bus::config::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{crypto::ring, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::common;
use crate::common::http::*;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
        .display()
        .to_string()
}

fn connector() -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(fixture("ca.pem")).unwrap())
        .unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// One request over a new TLS connection; everything the server sends until it closes.
async fn https(addr: std::net::SocketAddr, request: String) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector().connect(name, tcp).await.expect("TLS handshake");
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
