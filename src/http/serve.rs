//! Accepting and serving connections, within the server's limits.
//!
//! - At most `--max-connections` connections are served at once. One more is answered
//!   `503 Service Unavailable` with `Retry-After` and closed, so that a surge is told to
//!   come back instead of slowing everyone down; beyond [`MAX_REFUSING`] connections being
//!   refused at the same moment, new ones are closed without an answer.
//! - Each connection speaks HTTP/1.1, served by [`super::connection`] (the request-head
//!   timeout and size limit, body framing, event streams that hold no buffers of their
//!   own), or HTTP/2, served by [`super::http2`]. Which one is read from its first bytes:
//!   an HTTP/2 client opens with the HTTP/2 preface, whether it chose `h2` by ALPN over TLS
//!   or knows in advance that the server speaks it in clear text (h2c). A client that
//!   sends nothing within `--idle-timeout` is closed.
//! - With TLS, each connection first completes its handshake (within 10 s); one over the
//!   connection limit is closed without an answer.
//! - Shutting down stops accepting, asks every connection to finish its request in flight
//!   and close, and returns once they all have.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::connection::shut_down;
use super::error::RETRY_AFTER_SECONDS;
use super::traffic::{Route, Traffic};
use super::Limits;

/// Connections answered 503 at the same moment; more are closed at once.
const MAX_REFUSING: usize = 256;
/// How long a client has to complete its TLS handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// How long a refused connection is given to send its request head before the answer.
const REFUSAL_READ: Duration = Duration::from_millis(500);

/// Serves `router` on `listener` until `shutdown` turns true and every connection is done.
///
/// `serving` holds one permit per connection that may be served at once; `traffic` counts
/// (and logs) the answers given before the router (the router counts its own).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Arc<Limits>,
    serving: Arc<Semaphore>,
    tls: Option<TlsAcceptor>,
    traffic: Arc<Traffic>,
    mut shutdown: watch::Receiver<bool>,
) {
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: wait a little rather than spin, and keep serving.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = shut_down(&mut shutdown) => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if let Ok(permit) = Arc::clone(&serving).try_acquire_owned() {
            let connection = Connection {
                router: router.clone(),
                limits: Arc::clone(&limits),
                traffic: Arc::clone(&traffic),
                shutdown: shutdown.clone(),
                _permit: permit,
            };
            match &tls {
                None => connections.spawn(connection.serve(stream)),
                Some(tls) => connections.spawn(connection.serve_tls(tls.clone(), stream)),
            };
        } else if tls.is_some() {
            // An answer in plain text means nothing to a TLS client, and a handshake
            // costs what a server at its limit does not have: just close.
            drop(stream);
        } else if let Ok(permit) = Arc::clone(&refusing).try_acquire_owned() {
            connections.spawn(refuse(
                stream,
                limits.max_connections,
                Arc::clone(&traffic),
                permit,
            ));
        } else {
            drop(stream);
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// One accepted connection and what it holds.
struct Connection {
    router: Router,
    limits: Arc<Limits>,
    traffic: Arc<Traffic>,
    shutdown: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve_tls(self, tls: TlsAcceptor, stream: TcpStream) {
        match tokio::time::timeout(TLS_HANDSHAKE, tls.accept(stream)).await {
            Ok(Ok(stream)) => self.serve(stream).await,
            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!("TLS handshake timed out"),
        }
    }

    async fn serve<S>(self, mut stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let sniffed =
            tokio::time::timeout(self.limits.idle_timeout, first_bytes(&mut stream)).await;
        let (read, protocol) = match sniffed {
            Ok(Ok(Some(sniffed))) => sniffed,
            // Closed, failed or silent before its first request: nothing to answer.
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return,
        };
        let Connection {
            router,
            limits,
            traffic,
            shutdown,
            ..
        } = self;
        match protocol {
            Protocol::Http1 => {
                super::connection::serve(stream, read, router, limits, traffic, shutdown).await;
            }
            // Boxed: the HTTP/2 connection's state is large, and every HTTP/1.1
            // connection's task would otherwise be as large as it.
            Protocol::Http2 => {
                Box::pin(super::http2::serve(stream, read, router, limits, shutdown)).await;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// Reads a connection's first bytes until they tell its protocol: the whole HTTP/2
/// preface, or a byte that differs from it (no HTTP/1 request starts with `PRI * `).
/// `None` if the client closed first.
async fn first_bytes<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Option<(BytesMut, Protocol)>> {
    let preface = super::http2::PREFACE;
    let mut read = BytesMut::with_capacity(super::connection::HEAD_READ);
    loop {
        if stream.read_buf(&mut read).await? == 0 {
            return Ok(None);
        }
        let compared = read.len().min(preface.len());
        if read[..compared] != preface[..compared] {
            return Ok(Some((read, Protocol::Http1)));
        }
        if compared == preface.len() {
            return Ok(Some((read, Protocol::Http2)));
        }
    }
}

/// Answers a connection over the limit with 503 and closes it.
async fn refuse(
    mut stream: TcpStream,
    max_connections: usize,
    traffic: Arc<Traffic>,
    _permit: OwnedSemaphorePermit,
) {
    let started = std::time::Instant::now();
    // Read the request head first: closing a socket with unread input resets it, and the
    // client might then never see the answer.
    let mut head = [0u8; 4096];
    let mut read = 0;
    let _ = tokio::time::timeout(REFUSAL_READ, async {
        while read < head.len() {
            match stream.read(&mut head[read..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
            if head[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    let message = format!(
        "the server is at its limit of {max_connections} connections (--max-connections); retry shortly\n"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {RETRY_AFTER_SECONDS}\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Access-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n{message}",
        message.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    let route = Route::of_head(&head[..read]);
    let status = axum::http::StatusCode::SERVICE_UNAVAILABLE;
    traffic.answered(route, status);
    if traffic.access_log() {
        super::access_log::refused(route, status, message.len(), started);
    }
}
