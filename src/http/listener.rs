//! Request lines as lenient as the reference's.
//!
//! The reference server (Go's `net/http`) accepts a raw `>` — the multi-segment wildcard —
//! in a query string, so `curl 'http://host/?subject=orders.>'` works against it. The URL
//! standard, which the HTTP parser here follows, requires `%3E`. [`LenientRequests`]
//! bridges the two: it percent-encodes `<`, `>` and `"` in each request line before the
//! parser sees it, and passes everything else through untouched. It follows the HTTP/1.1
//! framing (headers, then `Content-Length` bytes of body) to find every request line of a
//! keep-alive connection; after a chunked body it stops rewriting for that connection
//! (the parser's strict behaviour then applies), and a line longer than 16 KiB is passed
//! through as it is.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

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
        }
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
                        State::RequestLine
                    } else {
                        State::Body(left - n as u64)
                    };
                }
                State::RequestLine | State::Headers { .. } => {
                    let (part, end_of_line) = match input.iter().position(|&b| b == b'\n') {
                        Some(i) => (&input[..=i], true),
                        None => (input, false),
                    };
                    self.line.extend_from_slice(part);
                    input = &input[part.len()..];
                    // The limit holds however the line arrived: in one read or several.
                    let content_len = self.line.len() - usize::from(end_of_line);
                    if content_len > MAX_LINE {
                        self.ready.append(&mut self.line);
                        self.state = State::Verbatim;
                    } else if end_of_line {
                        self.finish_line();
                    }
                }
            }
        }
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
            State::Body(_) | State::Verbatim => self.ready.extend_from_slice(&line),
        }
    }
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
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
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
    async fn a_line_over_the_limit_passes_through_however_it_arrives() {
        let long = format!("GET /?s={}> HTTP/1.1\r\n", "a".repeat(MAX_LINE));
        let input = format!("{long}Host: h\r\n\r\nGET /?s=a.> HTTP/1.1\r\n\r\n");
        // Once over the limit, the rest of the connection is passed through as it is,
        // whether the long line came in one read or in many.
        for chunk in [1, 4096, 1 << 16] {
            let out = rewrite(input.as_bytes(), chunk).await;
            assert_eq!(String::from_utf8(out).unwrap(), input, "chunks of {chunk}");
        }
    }

    #[tokio::test]
    async fn chunked_bodies_end_the_rewriting() {
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nGET\r\n0\r\n\r\nGET /?s=a.> HTTP/1.1\r\n\r\n";
        assert_eq!(rewrite(input, 5).await, input.to_vec());
    }
}
