//! Request lines as lenient as the reference's.
//!
//! The reference server (Go's `net/http`) accepts a raw `>` — the multi-segment wildcard —
//! in a query string, so `curl 'http://host/?subject=orders.>'` works against it. The URL
//! standard, which the HTTP parser here follows, requires `%3E`. [`LenientRequests`]
//! bridges the two: it percent-encodes `<`, `>` and `"` in each request line before the
//! parser sees it, and passes everything else through untouched. It follows the HTTP/1.1
//! framing (headers, then `Content-Length` bytes of body) to find every request line of a
//! keep-alive connection; after a chunked body it stops rewriting for that connection
//! (the parser's strict behaviour then applies). A line longer than 16 KiB is passed
//! through as it is, and only that line: the requests after it are rewritten as usual
//! (unless it was a `Content-Length` or `Transfer-Encoding` header, whose framing is then
//! left to the parser for the rest of the connection).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest request or header line that is examined.
const MAX_LINE: usize = 16 << 10;

/// Where the reader is in the stream of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request line.
    RequestLine,
    /// Collecting header lines of the current request.
    Headers { content_length: u64, chunked: bool },
    /// Passing the rest of a line longer than [`MAX_LINE`] through unexamined; the header
    /// lines of the current request follow it.
    LongLine { content_length: u64, chunked: bool },
    /// Passing `n` more body bytes through.
    Body(u64),
    /// Passing everything through, for the rest of the connection.
    Verbatim,
}

/// A connection whose request lines are made acceptable to a strict URL parser.
pub struct LenientRequests<S> {
    inner: S,
    state: State,
    /// The line being collected (request line or header line).
    line: Vec<u8>,
    /// Bytes ready to be read, and how many of them were.
    ready: Vec<u8>,
    ready_from: usize,
    /// What each read from the connection goes into (allocated once, not zeroed per read).
    chunk: Box<[u8]>,
    /// Complete requests received since the last answer was flushed.
    unanswered: usize,
    /// Whether the last request is answered even if the client ends its side of the
    /// connection right after sending it: all but event streams (`GET /`), which end when
    /// their client does.
    answer_after_end: bool,
    /// The client ended its side of the connection after a complete request: its end is
    /// held back from the parser until the answer is out.
    end_held: bool,
    /// Wakes the parser's read once a held end can be passed on.
    reader: Option<Waker>,
    /// Bytes were written since the last flush.
    wrote: bool,
}

impl<S> LenientRequests<S> {
    pub fn new(inner: S) -> LenientRequests<S> {
        LenientRequests {
            inner,
            state: State::RequestLine,
            line: Vec::new(),
            ready: Vec::new(),
            ready_from: 0,
            chunk: vec![0u8; 8192].into_boxed_slice(),
            unanswered: 0,
            answer_after_end: false,
            end_held: false,
            reader: None,
            wrote: false,
        }
    }

    /// The connection underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Runs bytes read from the connection through the state machine into `ready`.
    fn absorb(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.state {
                State::Verbatim => {
                    self.ready.extend_from_slice(input);
                    return;
                }
                State::Body(left) => {
                    let n = (left as usize).min(input.len());
                    self.ready.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if left as usize == n {
                        self.unanswered += 1;
                        State::RequestLine
                    } else {
                        State::Body(left - n as u64)
                    };
                }
                State::LongLine {
                    content_length,
                    chunked,
                } => {
                    let (part, end_of_line) = split_line(input);
                    self.ready.extend_from_slice(part);
                    input = &input[part.len()..];
                    if end_of_line {
                        self.state = State::Headers {
                            content_length,
                            chunked,
                        };
                    }
                }
                State::RequestLine | State::Headers { .. } => {
                    let (part, end_of_line) = split_line(input);
                    self.line.extend_from_slice(part);
                    input = &input[part.len()..];
                    // The limit holds however the line arrived: in one read or several.
                    let content_len = self.line.len() - usize::from(end_of_line);
                    if content_len > MAX_LINE {
                        self.pass_long_line(end_of_line);
                    } else if end_of_line {
                        self.finish_line();
                    }
                }
            }
        }
    }

    /// Passes a line over [`MAX_LINE`] (what has arrived of it) through as it is.
    fn pass_long_line(&mut self, end_of_line: bool) {
        let (content_length, chunked) = match self.state {
            State::Headers {
                content_length,
                chunked,
            } => {
                // A framing header this long is malformed: the parser will refuse it, so
                // stop interpreting what follows.
                let name = self.line.split(|&b| b == b':').next().unwrap_or_default();
                let framing = [&b"content-length"[..], b"transfer-encoding"]
                    .iter()
                    .any(|header| name.eq_ignore_ascii_case(header));
                (content_length, chunked || framing)
            }
            _ => (0, false),
        };
        self.ready.append(&mut self.line);
        self.state = match (chunked, end_of_line) {
            (true, _) => State::Verbatim,
            (false, true) => State::Headers {
                content_length,
                chunked,
            },
            (false, false) => State::LongLine {
                content_length,
                chunked,
            },
        };
    }

    /// Handles one complete line (with its line ending).
    fn finish_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        match self.state {
            State::RequestLine => {
                // Empty lines between requests are allowed and passed on.
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    self.ready.extend_from_slice(&line);
                    return;
                }
                encode_request_line(&line, &mut self.ready);
                self.answer_after_end = !is_event_stream_request(&line);
                self.state = State::Headers {
                    content_length: 0,
                    chunked: false,
                };
            }
            State::Headers {
                mut content_length,
                mut chunked,
            } => {
                self.ready.extend_from_slice(&line);
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\r', '\n']);
                if text.is_empty() {
                    self.state = if chunked {
                        State::Verbatim
                    } else if content_length > 0 {
                        State::Body(content_length)
                    } else {
                        self.unanswered += 1;
                        State::RequestLine
                    };
                    return;
                }
                if let Some((name, value)) = text.split_once(':') {
                    let value = value.trim();
                    if name.eq_ignore_ascii_case("content-length") {
                        match value.parse() {
                            Ok(n) => content_length = n,
                            // The parser will refuse this request; stop interpreting.
                            Err(_) => chunked = true,
                        }
                    } else if name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = true;
                    }
                }
                self.state = State::Headers {
                    content_length,
                    chunked,
                };
            }
            State::Body(_) | State::LongLine { .. } | State::Verbatim => {
                self.ready.extend_from_slice(&line)
            }
        }
    }
}

/// The input up to and including its first `\n` (and whether there was one).
fn split_line(input: &[u8]) -> (&[u8], bool) {
    match input.iter().position(|&b| b == b'\n') {
        Some(i) => (&input[..=i], true),
        None => (input, false),
    }
}

/// Whether a request line asks for an event stream: `GET` of `/` (with a query).
fn is_event_stream_request(line: &[u8]) -> bool {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return false;
    };
    method == b"GET" && (target == b"/" || target.starts_with(b"/?"))
}

/// Copies a request line, percent-encoding `<`, `>` and `"` in its request target.
fn encode_request_line(line: &[u8], out: &mut Vec<u8>) {
    let first_space = line.iter().position(|&b| b == b' ');
    let last_space = line.iter().rposition(|&b| b == b' ');
    let (Some(start), Some(end)) = (first_space, last_space) else {
        out.extend_from_slice(line);
        return;
    };
    if end <= start {
        out.extend_from_slice(line);
        return;
    }
    out.extend_from_slice(&line[..=start]);
    for &b in &line[start + 1..end] {
        match b {
            b'<' => out.extend_from_slice(b"%3C"),
            b'>' => out.extend_from_slice(b"%3E"),
            b'"' => out.extend_from_slice(b"%22"),
            _ => out.push(b),
        }
    }
    out.extend_from_slice(&line[end..]);
}

impl<S: AsyncRead + Unpin> AsyncRead for LenientRequests<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready_from < this.ready.len() {
                let n = (this.ready.len() - this.ready_from).min(buf.remaining());
                buf.put_slice(&this.ready[this.ready_from..this.ready_from + n]);
                this.ready_from += n;
                if this.ready_from == this.ready.len() {
                    this.ready.clear();
                    this.ready_from = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.end_held {
                if this.unanswered == 0 {
                    return Poll::Ready(Ok(())); // the held end, now that the answer is out
                }
                this.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            // Bodies and verbatim connections go straight into the caller's buffer.
            if let State::Verbatim = this.state {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // Read into the reused buffer, which is taken out while `absorb` borrows `this`.
            let mut chunk = std::mem::take(&mut this.chunk);
            let mut chunk_buf = ReadBuf::new(&mut chunk[..]);
            let read = Pin::new(&mut this.inner).poll_read(cx, &mut chunk_buf);
            let filled = chunk_buf.filled().len();
            if let Poll::Ready(Ok(())) = read {
                this.absorb(&chunk[..filled]);
            }
            this.chunk = chunk;
            ready!(read)?;
            if filled == 0 {
                // End of the connection: hand over any unfinished line as it is.
                if !this.line.is_empty() {
                    this.ready.append(&mut this.line);
                    continue;
                }
                // A client that shut down its sending side right after a complete request
                // (`nc -N`, `shutdown(SHUT_WR)`) still waits for the answer: the parser,
                // which would drop the connection on seeing the end before answering,
                // sees it once the answer is flushed. Event streams end with their client.
                if this.state == State::RequestLine && this.unanswered > 0 && this.answer_after_end
                {
                    this.end_held = true;
                    this.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LenientRequests<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.wrote |= written > 0;
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        self.wrote |= written > 0;
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        // The parser writes a whole answer, then flushes it: whatever was asked is
        // answered now.
        if std::mem::take(&mut self.wrote) {
            self.unanswered = 0;
            if let Some(reader) = self.reader.take() {
                reader.wake();
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn rewrite(input: &[u8], chunk: usize) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in input.chunks(chunk) {
                client.write_all(piece).await.unwrap();
            }
        });
        let mut lenient = LenientRequests::new(server);
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            // Small reads on purpose: the adapter must hand out partial output correctly.
            let n = tokio::time::timeout(
                std::time::Duration::from_millis(200),
                lenient.read(&mut buf),
            )
            .await
            .map(|r| r.unwrap())
            .unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn encodes_raw_wildcards_in_every_request_line_only() {
        let body = r#"{"subject":"a.>","x":"<"}"#;
        let input = format!(
            "GET /?subject=orders.>&x=\"<a>\" HTTP/1.1\r\nHost: h\r\n\r\n\
             POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}\
             GET /?subject=a.> HTTP/1.1\r\nX: >\r\n\r\n",
            body.len()
        );
        let expected = format!(
            "GET /?subject=orders.%3E&x=%22%3Ca%3E%22 HTTP/1.1\r\nHost: h\r\n\r\n\
             POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}\
             GET /?subject=a.%3E HTTP/1.1\r\nX: >\r\n\r\n",
            body.len()
        );
        for chunk in [1, 3, 17, 4096] {
            let out = rewrite(input.as_bytes(), chunk).await;
            assert_eq!(
                String::from_utf8(out).unwrap(),
                expected,
                "chunks of {chunk}"
            );
        }
    }

    #[tokio::test]
    async fn a_line_over_the_limit_passes_through_alone_however_it_arrives() {
        let long = "a".repeat(MAX_LINE);
        let input = format!(
            "GET /?s={long}> HTTP/1.1\r\nHost: h\r\n\r\n\
             GET /?s=a.> HTTP/1.1\r\nX-Long: {long}>\r\nHost: h\r\n\r\n\
             GET /?s=b.> HTTP/1.1\r\n\r\n"
        );
        // Only the long lines are left as they are, whether they came in one read or in
        // many; the requests after them are rewritten.
        let expected = input
            .replace("/?s=a.>", "/?s=a.%3E")
            .replace("/?s=b.>", "/?s=b.%3E");
        for chunk in [1, 4096, 1 << 16] {
            let out = rewrite(input.as_bytes(), chunk).await;
            assert_eq!(
                String::from_utf8(out).unwrap(),
                expected,
                "chunks of {chunk}"
            );
        }
    }

    #[tokio::test]
    async fn an_overlong_framing_header_ends_the_rewriting() {
        let input = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\nGET /?s=a.> HTTP/1.1\r\n\r\n",
            "1".repeat(MAX_LINE)
        );
        assert_eq!(rewrite(input.as_bytes(), 4096).await, input.into_bytes());
    }

    #[tokio::test]
    async fn chunked_bodies_end_the_rewriting() {
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nGET\r\n0\r\n\r\nGET /?s=a.> HTTP/1.1\r\n\r\n";
        assert_eq!(rewrite(input, 5).await, input.to_vec());
    }
}
