//! One HTTP/1.1 connection: request heads in, the router's answers out.
//!
//! What it promises:
//! - Requests are read into one buffer per connection, parsed with `httparse` and handed to
//!   the router one at a time, in order (pipelined requests wait in the buffer). Header
//!   values and the request target are slices of that buffer, not copies.
//! - Request targets are as lenient as the reference's (Go's `net/http`): a raw `<`, `>`
//!   or `"` — `curl 'http://host/?subject=orders.>'` — is percent-encoded before the URL
//!   is parsed, which the URL standard would otherwise refuse.
//! - Bodies are framed by `Content-Length` or `Transfer-Encoding: chunked` (both at once,
//!   or another coding, is refused: that is how requests are smuggled past proxies). They
//!   are read as the handler reads them, so a handler that refuses a request before its
//!   body (memory, auth) never buffers it. `Expect: 100-continue` is answered when the
//!   handler first reads the body.
//! - A request head must arrive whole within `--idle-timeout` of when the server started
//!   waiting for it (an idle keep-alive connection, or a head trickling in byte by byte);
//!   otherwise the connection is closed. A head over [`MAX_HEAD`] is answered 431.
//! - Answers of known size go out with `Content-Length`, in one write with their head
//!   when small; others are chunked. A client that ended its sending side right after a
//!   request still gets its answer (`nc -N`); only then is the connection closed.
//! - **Streamed answers hold nothing of the connection's own.** Once the head of an answer
//!   of unknown size (an event stream) is written, the connection's buffers are released:
//!   each piece the body yields is written as it comes (one `writev` with its chunk
//!   framing), and the next is not asked for before it is out, so a subscriber that stops
//!   reading costs one piece beyond the kernel's socket buffer. The client's side is
//!   watched through a small stack buffer: its closing ends the stream at once.
//!   This is why the server does not use hyper's connection: hyper keeps two buffers of
//!   at least 8 KiB per connection for its life, most of what an idle subscription cost
//!   (BENCHMARKS.md, "Idle subscriptions").
//! - When the server shuts down, a connection between requests closes at once; one with
//!   a request in flight answers it with `Connection: close` and then closes.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::{Body, HttpBody};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, Request, Response, StatusCode, Uri, Version};
use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tower_service::Service;

use super::traffic::{Route, Traffic};
use super::Limits;

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 64 << 10;
/// Most header fields in one request head.
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line of a chunked body (its extensions included).
const MAX_CHUNK_LINE: usize = 1024;
/// What a read asks for at least while a head is arriving.
pub const HEAD_READ: usize = 4 << 10;
/// What a read of a body asks for at most.
const BODY_READ: usize = 64 << 10;
/// An answer of known size this small goes out in one write with its head.
const INLINE_BODY: usize = 16 << 10;
/// The connection's buffer is given back when it grew beyond this (one large body).
const KEEP_BUFFER: usize = 16 << 10;
/// How long a closing connection reads (and drops) what its client is still sending, so
/// that the client reads the answer rather than a reset.
const LINGER: Duration = Duration::from_secs(1);

/// Serves requests on `io`, whose first bytes (`read`) were already read from it, until
/// the client leaves, the connection idles out, or the server shuts down.
pub async fn serve<S>(
    io: S,
    read: BytesMut,
    router: Router,
    limits: Arc<Limits>,
    traffic: Arc<Traffic>,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let wire = Arc::new(Mutex::new(Wire {
        io,
        input: read,
        body: BodyState::Done,
        continue_due: false,
        read_end: false,
    }));
    let mut connection = Connection {
        wire,
        router,
        limits,
        traffic,
        shutdown,
        out: Vec::new(),
    };
    let linger = match connection.run().await {
        Ok(linger) => linger,
        Err(e) => {
            // A client going away mid-request, or sending garbage: its own business.
            tracing::debug!(error = %e, "connection ended with an error");
            false
        }
    };
    connection.close(linger).await;
}

/// The connection itself and what has been read from it, shared between the request
/// loop and the body of the request being handled.
struct Wire<S> {
    io: S,
    /// Bytes read and not used yet: the rest of a head, body bytes, pipelined requests.
    input: BytesMut,
    /// What is left of the current request's body.
    body: BodyState,
    /// The client asked for `100 Continue` before it sends the body, and has not had it.
    continue_due: bool,
    /// The client ended its sending side.
    read_end: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    /// This many bytes are still to come.
    Length(u64),
    /// Chunked: where in the chunk framing the reader is.
    Chunked(Chunk),
    Done,
    /// The body was cut off or malformed: the connection's framing is lost, it closes
    /// after the answer.
    Broken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last (zero-size) chunk: trailer lines until an empty one.
    Trailers,
}

type Shared<S> = Arc<Mutex<Wire<S>>>;

fn lock<S>(wire: &Shared<S>) -> MutexGuard<'_, Wire<S>> {
    // Every update leaves the state whole; a panicked holder cannot break it.
    wire.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A request head, parsed.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: BodyState,
    expect_continue: bool,
    /// The client asked to keep the connection open after the answer.
    keep_alive: bool,
}

/// Why a head could not be read.
enum HeadError {
    /// Answered with this status and reason, then the connection is closed.
    Refused(StatusCode, &'static str),
    /// The same, for a head whose request line was read (its route is known).
    RefusedOn(Route, StatusCode, &'static str),
    Io(io::Error),
}

impl HeadError {
    /// The refusal of a head whose request line asked for `route`.
    fn on(self, route: Route) -> HeadError {
        match self {
            HeadError::Refused(status, reason) => HeadError::RefusedOn(route, status, reason),
            other => other,
        }
    }
}

impl From<io::Error> for HeadError {
    fn from(e: io::Error) -> HeadError {
        HeadError::Io(e)
    }
}

struct Connection<S> {
    wire: Shared<S>,
    router: Router,
    limits: Arc<Limits>,
    /// Counts (and logs) the refusals of request heads; the router counts its answers.
    traffic: Arc<Traffic>,
    shutdown: watch::Receiver<bool>,
    /// Answer heads (and small bodies) are put together here, then written at once.
    out: Vec<u8>,
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Serves requests until the connection should close; says whether the client may
    /// still be sending (so that closing should linger).
    async fn run(&mut self) -> io::Result<bool> {
        loop {
            let head = match self.read_head().await {
                Ok(Some(head)) => head,
                Ok(None) => return Ok(false),
                Err(HeadError::Io(e)) => return Err(e),
                Err(refused) => {
                    let (route, status, reason) = match refused {
                        HeadError::RefusedOn(route, status, reason) => (route, status, reason),
                        HeadError::Refused(status, reason) => {
                            // What was read of the head may tell its route (one too large).
                            (Route::of_head(&lock(&self.wire).input), status, reason)
                        }
                        HeadError::Io(e) => return Err(e),
                    };
                    self.traffic.answered(route, status);
                    let started = std::time::Instant::now();
                    let response = refusal(status, reason);
                    let written = self
                        .write_response(response, false, Version::HTTP_11, false)
                        .await;
                    if self.traffic.access_log() {
                        super::access_log::refused(route, status, reason.len() + 1, started);
                    }
                    written?;
                    return Ok(true);
                }
            };
            let is_head = head.method == Method::HEAD;
            let version = head.version;
            let asked_keep_alive = head.keep_alive;
            let request = self.request(head);
            let response = match self.router.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let body_read = {
                let mut wire = lock(&self.wire);
                wire.continue_due = false;
                wire.body == BodyState::Done
            };
            let keep_alive = asked_keep_alive && body_read && !*self.shutdown.borrow();
            let kept = self
                .write_response(response, is_head, version, keep_alive)
                .await?;
            if !kept {
                return Ok(!body_read);
            }
            let wire = lock(&self.wire);
            if wire.read_end && wire.input.is_empty() {
                return Ok(false);
            }
        }
    }

    /// Reads the next request head; `None` when the connection should close quietly
    /// (the client left, idled out, or the server is shutting down between requests).
    async fn read_head(&mut self) -> Result<Option<Head>, HeadError> {
        let deadline = tokio::time::Instant::now() + self.limits.idle_timeout;
        loop {
            {
                let mut wire = lock(&self.wire);
                // Empty lines before a request are allowed (RFC 9112, 2.2).
                let blank = wire
                    .input
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                wire.input.advance(blank);
                if !wire.input.is_empty() {
                    if let Some(head) = parse_head(&mut wire.input)? {
                        wire.body = head.body;
                        wire.continue_due = head.expect_continue && head.body != BodyState::Done;
                        return Ok(Some(head));
                    }
                } else if wire.read_end {
                    return Ok(None);
                } else if wire.input.capacity() > KEEP_BUFFER {
                    wire.input = BytesMut::new();
                }
            }
            let waiting = lock(&self.wire).input.is_empty();
            let wire = Arc::clone(&self.wire);
            tokio::select! {
                read = poll_fn(|cx| poll_fill(&mut lock(&wire), cx, HEAD_READ)) => {
                    if read? == 0 {
                        let wire = lock(&self.wire);
                        if wire.input.is_empty() {
                            return Ok(None);
                        }
                        // A head cut off by the end of the connection.
                        return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Ok(None),
                () = shut_down(&mut self.shutdown), if waiting => return Ok(None),
            }
        }
    }

    /// The request for the router, its body reading from this connection.
    fn request(&self, head: Head) -> Request<Body> {
        let body = match head.body {
            BodyState::Done | BodyState::Broken => Body::empty(),
            BodyState::Length(_) | BodyState::Chunked(_) => Body::new(RequestBody {
                wire: Arc::clone(&self.wire),
                length: match head.body {
                    BodyState::Length(n) => Some(n),
                    _ => None,
                },
            }),
        };
        let mut request = Request::new(body);
        *request.method_mut() = head.method;
        *request.uri_mut() = head.uri;
        *request.version_mut() = head.version;
        *request.headers_mut() = head.headers;
        request
    }

    /// Writes an answer; says whether the connection stays open for another request
    /// (`keep_alive` says whether it may).
    async fn write_response(
        &mut self,
        response: Response<Body>,
        is_head: bool,
        version: Version,
        keep_alive: bool,
    ) -> io::Result<bool> {
        let (parts, mut body) = response.into_parts();
        let status = parts.status;
        let bodiless = is_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let declared = parts.headers.get(header::CONTENT_LENGTH).is_some();
        let exact = body.size_hint().exact();
        let framing = if bodiless || declared || exact.is_some() {
            Streamed::No
        } else if version == Version::HTTP_11 {
            Streamed::Chunked
        } else {
            Streamed::CloseDelimited
        };

        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            if name == header::CONNECTION || name == header::TRANSFER_ENCODING {
                continue;
            }
            put_header(out, name.as_str(), value.as_bytes());
        }
        if !parts.headers.contains_key(header::DATE) {
            with_http_date(|date| put_header(out, "date", date.as_bytes()));
        }
        if !declared && status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
            match (framing, exact) {
                (Streamed::No, Some(len)) => {
                    put_header(out, "content-length", digits(len, 10, &mut [0; 20]));
                }
                (Streamed::Chunked, _) => put_header(out, "transfer-encoding", b"chunked"),
                _ => {}
            }
        }
        let said = parts.headers.get(header::CONNECTION);
        let keep_alive = keep_alive
            && framing != Streamed::CloseDelimited
            && !said.is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let connection: &[u8] = match (keep_alive, version) {
            (false, _) => b"close",
            (true, Version::HTTP_10) => b"keep-alive",
            // What the handler said (an event stream says keep-alive, as the reference).
            (true, _) => said.map_or(&b""[..], HeaderValue::as_bytes),
        };
        if !connection.is_empty() {
            put_header(out, "connection", connection);
        }
        out.extend_from_slice(b"\r\n");

        if bodiless {
            return self.flush_out().await.map(|()| keep_alive);
        }
        if framing == Streamed::No {
            // Small answers go out with their head in one write.
            while let Some(data) = next_data(&mut body).await? {
                if self.out.len() + data.len() <= INLINE_BODY {
                    self.out.extend_from_slice(&data);
                } else {
                    self.flush_out().await?;
                    write_all(&self.wire, &mut [IoSlice::new(&data)]).await?;
                }
            }
            self.flush_out().await?;
            return Ok(keep_alive);
        }
        self.flush_out().await?;
        self.stream_body(body, framing).await?;
        Ok(keep_alive)
    }

    /// Writes what `out` holds.
    async fn flush_out(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        write_all(&self.wire, &mut [IoSlice::new(&self.out)]).await?;
        self.out.clear();
        if self.out.capacity() > KEEP_BUFFER {
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Streams a body of unknown size, holding no buffer of the connection's own while
    /// it waits, and ends it if the client leaves.
    async fn stream_body(&mut self, mut body: Body, framing: Streamed) -> io::Result<()> {
        self.out = Vec::new();
        {
            let mut wire = lock(&self.wire);
            if wire.input.is_empty() {
                wire.input = BytesMut::new();
            }
        }
        loop {
            let wire = Arc::clone(&self.wire);
            let data = tokio::select! {
                data = next_data(&mut body) => data?,
                gone = poll_fn(|cx| poll_client_gone(&mut lock(&wire), cx)) => {
                    gone?;
                    return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the client closed the stream"));
                }
            };
            let Some(data) = data else { break };
            if data.is_empty() {
                continue;
            }
            if framing == Streamed::Chunked {
                // `<size in hex>\r\n<data>\r\n`
                let mut size = [0u8; 20];
                let size = digits(data.len() as u64, 16, &mut size);
                write_all(
                    &self.wire,
                    &mut [
                        IoSlice::new(size),
                        IoSlice::new(b"\r\n"),
                        IoSlice::new(&data),
                        IoSlice::new(b"\r\n"),
                    ],
                )
                .await?;
            } else {
                write_all(&self.wire, &mut [IoSlice::new(&data)]).await?;
            }
        }
        if framing == Streamed::Chunked {
            write_all(&self.wire, &mut [IoSlice::new(b"0\r\n\r\n")]).await?;
        }
        Ok(())
    }

    /// Ends the connection: shuts its sending side (TLS: with `close_notify`) and, if the
    /// client may still be sending, reads and drops that for a moment first, so that a
    /// close with unread input does not reset the connection before the client read the
    /// answer.
    async fn close(&mut self, linger: bool) {
        let wire = Arc::clone(&self.wire);
        let _ = poll_fn(|cx| Pin::new(&mut lock(&wire).io).poll_shutdown(cx)).await;
        if linger {
            let drain = poll_fn(|cx| {
                let mut wire = lock(&wire);
                wire.input = BytesMut::new();
                loop {
                    let mut scratch = [0u8; 4096];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut wire.io).poll_read(cx, &mut buf) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                        Poll::Ready(_) => return Poll::Ready(()),
                    }
                }
            });
            let _ = tokio::time::timeout(LINGER, drain).await;
        }
    }
}

/// How an answer's body went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Streamed {
    /// With a known length (or none at all).
    No,
    /// In chunks.
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client).
    CloseDelimited,
}

/// A refusal before any handler ran: a status and a plain-text reason.
fn refusal(status: StatusCode, reason: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(format!("{reason}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `n` in base `radix` (10 or 16, lower case), written at the end of `buf`.
fn digits(mut n: u64, radix: u64, buf: &mut [u8; 20]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = DIGITS[(n % radix) as usize];
        n /= radix;
        if n == 0 {
            return &buf[at..];
        }
    }
}

fn put_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Calls `f` with the current time as an HTTP date, formatted once a second per thread.
fn with_http_date(f: impl FnOnce(&str)) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second {
            *date = (second, httpdate::fmt_http_date(now));
        }
        f(&date.1);
    });
}

/// Returns once the server shuts down (for the server's other connection code too).
pub(super) async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}

/// The next data of a body (trailers are dropped).
async fn next_data(body: &mut Body) -> io::Result<Option<Bytes>> {
    loop {
        let frame = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(io::Error::other(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Writes every byte of `bufs`.
async fn write_all<S: AsyncWrite + Unpin>(
    wire: &Shared<S>,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut lock(wire).io).poll_write_vectored(cx, bufs)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Reads more into the connection's buffer (asking for at least `want` bytes of room);
/// the number read, 0 at the end of the connection.
fn poll_fill<S: AsyncRead + Unpin>(
    wire: &mut Wire<S>,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    if wire.read_end {
        return Poll::Ready(Ok(0));
    }
    if wire.input.capacity() - wire.input.len() < want {
        wire.input.reserve(want);
    }
    let Wire { io, input, .. } = wire;
    let spare = input.spare_capacity_mut();
    let mut buf = ReadBuf::uninit(spare);
    match Pin::new(io).poll_read(cx, &mut buf) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Ready(Ok(())) => {
            let n = buf.filled().len();
            // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity.
            unsafe { input.set_len(input.len() + n) };
            if n == 0 {
                wire.read_end = true;
            }
            Poll::Ready(Ok(n))
        }
    }
}

/// While an answer streams: ready when the client has closed its side (or the
/// connection failed). What it sends meanwhile is kept for after the answer, up to a
/// head's worth; the buffer for it is only allocated if it sends anything.
fn poll_client_gone<S: AsyncRead + Unpin>(
    wire: &mut Wire<S>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    loop {
        if wire.read_end {
            return Poll::Ready(Ok(()));
        }
        if wire.input.len() > MAX_HEAD {
            // Enough is waiting; read no more until the answer is out.
            return Poll::Pending;
        }
        let mut scratch = [0u8; 512];
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut wire.io).poll_read(cx, &mut buf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                wire.read_end = true;
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(())) => wire.input.extend_from_slice(buf.filled()),
        }
    }
}

/// Parses a complete head at the start of `input` and removes it; `None` if more is needed.
fn parse_head(input: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    // Only a head's worth is looked at: a complete head beyond it is as much too large.
    let len = match parsed.parse(&input[..input.len().min(MAX_HEAD)]) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if input.len() > MAX_HEAD => {
            return Err(HeadError::Refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request head is larger than 64 KiB; send a shorter query or fewer headers",
            ))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request has more than 100 header fields",
            ))
        }
        Err(e) => return Err(bad_request_head(e)),
    };
    // Offsets into the head, so that its bytes can be shared once split off.
    let base = input.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let method = parsed.method.unwrap_or("");
    let target = parsed.path.unwrap_or("");
    let target_range = (offset(target.as_bytes()), target.len());
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| {
        HeadError::Refused(StatusCode::BAD_REQUEST, "the request method is not valid")
    })?;
    let mut names = Vec::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| {
            HeadError::Refused(StatusCode::BAD_REQUEST, "a header name is not valid")
        })?;
        names.push((name, offset(field.value), field.value.len()));
    }
    // Refusals from here on are counted by the request line's route.
    let route = Route::of(&method, target.split('?').next().unwrap_or_default());
    let head = input.split_to(len).freeze();
    let slice = |(at, len): (usize, usize)| head.slice(at..at + len);

    let mut headers = HeaderMap::with_capacity(names.len());
    for (name, at, len) in names {
        let value = HeaderValue::from_maybe_shared(slice((at, len))).map_err(|_| {
            HeadError::Refused(StatusCode::BAD_REQUEST, "a header value is not valid").on(route)
        })?;
        headers.append(name, value);
    }
    let uri = lenient_uri(slice(target_range)).map_err(|e| e.on(route))?;
    let body = body_framing(&headers, version).map_err(|e| e.on(route))?;
    let expect_continue = version == Version::HTTP_11
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let keep_alive = wants_keep_alive(&headers, version);
    Ok(Some(Head {
        method,
        uri,
        version,
        headers,
        body,
        expect_continue,
        keep_alive,
    }))
}

fn bad_request_head(e: httparse::Error) -> HeadError {
    let reason = match e {
        httparse::Error::Version => "the request is not HTTP/1.0 or HTTP/1.1",
        httparse::Error::Token => "the request method or a header name is not valid",
        httparse::Error::HeaderName => "a header name is not valid",
        httparse::Error::HeaderValue => "a header value is not valid",
        _ => "the request head is malformed",
    };
    HeadError::Refused(StatusCode::BAD_REQUEST, reason)
}

/// The request target as a URI, with `<`, `>` and `"` percent-encoded first.
fn lenient_uri(target: Bytes) -> Result<Uri, HeadError> {
    let invalid = || {
        HeadError::Refused(
            StatusCode::BAD_REQUEST,
            "the request target is not a valid URI",
        )
    };
    if !target.iter().any(|b| matches!(b, b'<' | b'>' | b'"')) {
        return Uri::from_maybe_shared(target).map_err(|_| invalid());
    }
    let mut encoded = Vec::with_capacity(target.len() + 8);
    for &b in target.iter() {
        match b {
            b'<' => encoded.extend_from_slice(b"%3C"),
            b'>' => encoded.extend_from_slice(b"%3E"),
            b'"' => encoded.extend_from_slice(b"%22"),
            _ => encoded.push(b),
        }
    }
    Uri::from_maybe_shared(Bytes::from(encoded)).map_err(|_| invalid())
}

/// How the request's body is framed (RFC 9112, 6.3).
fn body_framing(headers: &HeaderMap, version: Version) -> Result<BodyState, HeadError> {
    let refused = |reason| HeadError::Refused(StatusCode::BAD_REQUEST, reason);
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let length = match lengths.next() {
        None => None,
        Some(first) => {
            let parse = |v: &HeaderValue| {
                std::str::from_utf8(v.as_bytes())
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
            };
            let n = parse(first).ok_or_else(|| refused("Content-Length is not a number"))?;
            if lengths.any(|other| parse(other) != Some(n)) {
                return Err(refused(
                    "the request has conflicting Content-Length headers",
                ));
            }
            Some(n)
        }
    };
    if let Some(coding) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        if length.is_some() {
            return Err(refused(
                "the request has both Content-Length and Transfer-Encoding; send one",
            ));
        }
        let last = coding
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .unwrap_or_default();
        if version != Version::HTTP_11 || !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err(HeadError::Refused(
                StatusCode::NOT_IMPLEMENTED,
                "only the chunked transfer coding is supported",
            ));
        }
        return Ok(BodyState::Chunked(Chunk::Size));
    }
    Ok(match length {
        None | Some(0) => BodyState::Done,
        Some(n) => BodyState::Length(n),
    })
}

/// Whether the client wants the connection kept open after this request.
fn wants_keep_alive(headers: &HeaderMap, version: Version) -> bool {
    let mut close = false;
    let mut keep = false;
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            close |= token.eq_ignore_ascii_case(b"close");
            keep |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    match version {
        Version::HTTP_10 => keep && !close,
        _ => !close,
    }
}

/// A request's body, read from its connection as the handler asks for it.
struct RequestBody<S> {
    wire: Shared<S>,
    /// `Content-Length`, if the body has one.
    length: Option<u64>,
}

impl<S> HttpBody for RequestBody<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let mut wire = lock(&self.wire);
        if wire.continue_due {
            const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
            // Small enough for any socket buffer; a partial write fails the body.
            match Pin::new(&mut wire.io).poll_write(cx, CONTINUE) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(n)) if n == CONTINUE.len() => wire.continue_due = false,
                Poll::Ready(Ok(_)) => {
                    return Poll::Ready(Some(Err(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
            }
        }
        loop {
            match next_body_piece(&mut wire) {
                Err(e) => {
                    wire.body = BodyState::Broken;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Piece::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Piece::End) => return Poll::Ready(None),
                Ok(Piece::NeedMore) => {
                    let want = match wire.body {
                        BodyState::Length(n) => usize::try_from(n).unwrap_or(BODY_READ),
                        _ => HEAD_READ,
                    }
                    .clamp(1, BODY_READ);
                    match poll_fill(&mut wire, cx, want) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                        Poll::Ready(Ok(0)) => {
                            wire.body = BodyState::Broken;
                            return Poll::Ready(Some(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the connection closed before the body was complete",
                            ))));
                        }
                        Poll::Ready(Ok(_)) => {}
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.wire).body == BodyState::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// What the buffered input gives of the body.
enum Piece {
    Data(Bytes),
    End,
    NeedMore,
}

/// The size a chunk-size line (without its `\n`) gives: hex digits, then optionally
/// whitespace and a `;` extension (ignored), and the `\r` before the `\n`.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 || line.contains(&b'\r') {
        return None;
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    let hex = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

/// Up to `left` body bytes of what is buffered, and how many are left after them; `None`
/// if nothing is buffered.
fn take_body_bytes(input: &mut BytesMut, left: u64) -> Option<(Bytes, u64)> {
    if input.is_empty() {
        return None;
    }
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
    Some((input.split_to(n).freeze(), left - n as u64))
}

fn next_body_piece<S>(wire: &mut Wire<S>) -> io::Result<Piece> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    loop {
        match wire.body {
            BodyState::Done => return Ok(Piece::End),
            BodyState::Broken => return Err(invalid("the body was cut off or malformed")),
            BodyState::Length(left) => {
                let Some((data, left)) = take_body_bytes(&mut wire.input, left) else {
                    return Ok(Piece::NeedMore);
                };
                wire.body = if left == 0 {
                    BodyState::Done
                } else {
                    BodyState::Length(left)
                };
                return Ok(Piece::Data(data));
            }
            BodyState::Chunked(Chunk::Data(left)) => {
                let Some((data, left)) = take_body_bytes(&mut wire.input, left) else {
                    return Ok(Piece::NeedMore);
                };
                wire.body = BodyState::Chunked(if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                });
                return Ok(Piece::Data(data));
            }
            BodyState::Chunked(Chunk::Size) => {
                // Decided on the whole line only, never on part of it, so that what a
                // body means does not depend on how its bytes arrive.
                let Some(end) = wire
                    .input
                    .iter()
                    .take(MAX_CHUNK_LINE + 1)
                    .position(|&b| b == b'\n')
                else {
                    if wire.input.len() > MAX_CHUNK_LINE {
                        return Err(invalid("a chunk-size line of the body is too long"));
                    }
                    return Ok(Piece::NeedMore);
                };
                let size = chunk_size(&wire.input[..end])
                    .ok_or_else(|| invalid("the chunked body's framing is malformed"))?;
                wire.input.advance(end + 1);
                wire.body = BodyState::Chunked(if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                });
            }
            BodyState::Chunked(Chunk::DataEnd) => {
                if wire.input.len() < 2 {
                    return Ok(Piece::NeedMore);
                }
                if &wire.input[..2] != b"\r\n" {
                    return Err(invalid("a chunk of the body does not end with CRLF"));
                }
                wire.input.advance(2);
                wire.body = BodyState::Chunked(Chunk::Size);
            }
            BodyState::Chunked(Chunk::Trailers) => {
                // The same limit however the line arrives: whole, or in pieces.
                let end = wire.input.iter().position(|&b| b == b'\n');
                if end.unwrap_or(wire.input.len()) > MAX_HEAD {
                    return Err(invalid("the body's trailers are too large"));
                }
                let Some(end) = end else {
                    return Ok(Piece::NeedMore);
                };
                let blank = wire.input[..end].iter().all(|&b| b == b'\r');
                wire.input.advance(end + 1);
                if blank {
                    wire.body = BodyState::Done;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
