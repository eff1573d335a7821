//! One HTTP/2 connection (RFC 9113), served by hyper: over TLS when the client chose `h2`
//! by ALPN, in clear text when it opens with the HTTP/2 preface (prior knowledge, h2c).
//!
//! Many requests share the connection, each a stream; event streams are answers that do
//! not end. What it promises, so that the server's limits mean under HTTP/2 what they mean
//! under HTTP/1.1:
//! - `--max-connections` counts connections, as before; one connection carries at most
//!   [`MAX_STREAMS`] requests at once (more wait, as the protocol says, and the browser
//!   queues them), and `--max-subscriptions` still counts every event stream, whatever
//!   connection it is on.
//! - A request's header block is at most [`super::connection::MAX_HEAD`], as a request head
//!   over HTTP/1.1; bodies are bounded by `--max-body` and `--body-timeout` in the handlers,
//!   whatever the protocol.
//! - A connection with no request open for `--idle-timeout` is closed (GOAWAY), as an idle
//!   HTTP/1.1 connection is.
//! - An answer holds at most [`SEND_BUFFER`] not yet taken by the client: a subscriber
//!   that stops reading holds that much, not more, and its stream waits.
//! - What a client may have in flight towards the server is bounded by the flow-control
//!   windows ([`STREAM_WINDOW`] per request, [`CONNECTION_WINDOW`] per connection).
//! - When the server shuts down, the connection says GOAWAY, lets the requests in flight
//!   finish (event streams end with the server) and closes.
//!
//! HTTP/1.1's connection-specific headers (`Connection`, `Keep-Alive`, `Transfer-Encoding`)
//! mean nothing here and are removed from answers.

use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, HttpBody};
use axum::http::header::{self, HeaderMap};
use axum::http::{Request, Response};
use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tower_service::Service;

use super::connection::shut_down;
use super::Limits;

/// What opens every HTTP/2 connection (RFC 9113, 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Requests open at once on one connection (browsers open up to this many event streams
/// to one origin over one connection).
pub const MAX_STREAMS: u32 = 256;
/// Bytes of an answer written and not yet taken by the client, per stream.
pub const SEND_BUFFER: usize = 64 << 10;
/// Bytes a client may send on one request before the server has read them.
pub const STREAM_WINDOW: u32 = 256 << 10;
/// Bytes a client may send on all of a connection's requests before the server read them.
pub const CONNECTION_WINDOW: u32 = 1 << 20;

/// Serves HTTP/2 on `io`, whose first bytes (`read`, the preface at least when in clear
/// text) were already read from it, until the client leaves, the connection idles out or
/// the server shuts down.
pub async fn serve<S>(
    io: S,
    read: BytesMut,
    router: Router,
    limits: Arc<Limits>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Requests open on the connection: those whose answer is still being written.
    let (open_tx, mut open) = watch::channel(0usize);
    let open_tx = Arc::new(open_tx);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let mut router = router.clone();
        let open = OpenRequest::new(Arc::clone(&open_tx));
        async move {
            let response = router.call(request.map(Body::new)).await?;
            let (mut parts, body) = response.into_parts();
            remove_connection_headers(&mut parts.headers);
            Ok::<_, std::convert::Infallible>(Response::from_parts(
                parts,
                Counted { body, _open: open },
            ))
        }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(super::connection::MAX_HEAD).unwrap_or(u32::MAX))
        .max_send_buf_size(SEND_BUFFER)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let io = TokioIo::new(Prefixed { read, io });
    let mut connection = pin!(builder.serve_connection(io, service));
    let mut closing = false;
    loop {
        let idle = *open.borrow_and_update() == 0;
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
                }
                return;
            }
            Ok(()) = open.changed() => {}
            () = tokio::time::sleep(limits.idle_timeout), if idle && !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = shut_down(&mut shutdown), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Headers of HTTP/1.1's connection management, which HTTP/2 forbids (RFC 9113, 8.2.2).
fn remove_connection_headers(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

/// One request counted as open on its connection until its answer is done.
struct OpenRequest(Arc<watch::Sender<usize>>);

impl OpenRequest {
    fn new(open: Arc<watch::Sender<usize>>) -> OpenRequest {
        open.send_modify(|n| *n += 1);
        OpenRequest(open)
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// An answer's body that keeps its request counted as open while it is written.
struct Counted {
    body: Body,
    _open: OpenRequest,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection whose first bytes were already read: they are read again first.
struct Prefixed<S> {
    read: BytesMut,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            if self.read.is_empty() {
                // Its memory is given back, not kept for the connection's life.
                self.read = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
