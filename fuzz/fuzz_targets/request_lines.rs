//! The lenient request-line reader on arbitrary bytes, delivered in arbitrary pieces: its
//! output does not depend on how the connection's bytes arrive or how they are read, it
//! is what a plain whole-input model of the documented rules produces, and it is the input
//! with some `<`, `>` and `"` percent-encoded and nothing else changed.
//!
//! Input layout: the first 4 bytes seed the choice of chunk sizes, read sizes and
//! `Pending`s; the rest is the connection's bytes, where `0xFF n b` stands for
//! `(n + 1) * 128` copies of `b` so that lines around the 16 KiB limit are within reach
//! of small inputs.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bus::http::listener::LenientRequests;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The adapter's limit: a line with more bytes than this before its `\n` is not examined.
const MAX_LINE: usize = 16 << 10;

/// Caps the expanded connection bytes, to keep each run fast.
const MAX_STREAM: usize = 128 << 10;

fuzz_target!(|data: &[u8]| {
    let (seed, script) = data.split_at(data.len().min(4));
    let mut seed_bytes = [0u8; 4];
    seed_bytes[..seed.len()].copy_from_slice(seed);
    let stream = expand(script);

    // All at once: the connection hands over as much as asked for, into a large buffer.
    let whole = run(&stream, None);
    // In random pieces, with random pauses, read in random small or large amounts.
    let pieces = run(&stream, Some(Rng::new(u32::from_le_bytes(seed_bytes))));
    assert!(
        whole == pieces,
        "the output depends on how the input arrives\n  whole:  {:?}\n  pieces: {:?}",
        Show(&whole),
        Show(&pieces)
    );

    let expected = model(&stream);
    assert!(
        whole == expected,
        "the adapter and the model disagree\n  input:   {:?}\n  adapter: {:?}\n  model:   {:?}",
        Show(&stream),
        Show(&whole),
        Show(&expected)
    );

    assert_only_encoded(&stream, &whole);
});

/// The connection's bytes the script stands for.
fn expand(script: &[u8]) -> Vec<u8> {
    let mut stream = Vec::with_capacity(script.len());
    let mut rest = script;
    while let Some((&first, tail)) = rest.split_first() {
        if stream.len() >= MAX_STREAM {
            break;
        }
        rest = match (first, tail) {
            (0xFF, [n, b, tail @ ..]) => {
                stream.resize(stream.len() + (*n as usize + 1) * 128, *b);
                tail
            }
            _ => {
                stream.push(first);
                tail
            }
        };
    }
    stream.truncate(MAX_STREAM);
    stream
}

/// A small deterministic generator (xorshift32), so that the pieces are chosen by the
/// fuzzer's seed bytes while the connection's bytes stay contiguous for its mutations.
struct Rng(u32);

impl Rng {
    fn new(seed: u32) -> Rng {
        // xorshift never leaves zero.
        Rng(seed | 1)
    }

    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    /// A size of 1 byte, a few bytes, or up to `large`, about equally often: single bytes
    /// and small pieces find the boundary cases, large ones the adapter's own buffering.
    fn size(&mut self, large: u32) -> usize {
        let bound = match self.next() % 3 {
            0 => 1,
            1 => 16,
            _ => large,
        };
        (self.next() % bound + 1) as usize
    }
}

/// A connection that delivers its bytes in pieces: one piece (or what fits of it) per
/// read, sometimes after a `Pending` first.
struct Connection<'a> {
    rest: &'a [u8],
    /// What is left of the current piece.
    piece: usize,
    rng: Option<Rng>,
    paused: bool,
}

impl AsyncRead for Connection<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rng) = &mut this.rng {
            // Never twice in a row: the test polls again at once (its waker does nothing).
            if !this.paused && rng.next() % 8 == 0 {
                this.paused = true;
                return Poll::Pending;
            }
            this.paused = false;
            if this.piece == 0 {
                this.piece = rng.size(20_000);
            }
        } else {
            this.piece = usize::MAX;
        }
        let n = this.piece.min(this.rest.len()).min(buf.remaining());
        buf.put_slice(&this.rest[..n]);
        this.rest = &this.rest[n..];
        this.piece -= n;
        Poll::Ready(Ok(()))
    }
}

/// The server's answers: taken whole.
impl AsyncWrite for Connection<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Everything the adapter hands out for `stream` until its end: read in 64 KiB at a time
/// without `rng`, else as `rng` chooses. The end of a connection whose last request was
/// complete is held back until an answer is written, as a server would: when the input
/// is used up and the adapter waits, the test answers.
fn run(stream: &[u8], mut rng: Option<Rng>) -> Vec<u8> {
    let connection = Connection {
        rest: stream,
        piece: 0,
        rng: rng.as_mut().map(|rng| Rng::new(rng.next())),
        paused: false,
    };
    let mut lenient = LenientRequests::new(connection);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    // Every poll hands out a byte, ends, or passes on one of the connection's `Pending`s,
    // which come at most every other read, and the output is at most 3 times the input.
    let mut polls_left = 8 * stream.len() + 64;
    loop {
        let size = match &mut rng {
            Some(rng) => rng.size(10_000),
            None => buf.len(),
        };
        let mut read = ReadBuf::new(&mut buf[..size]);
        polls_left = polls_left
            .checked_sub(1)
            .expect("the adapter makes progress");
        match Pin::new(&mut lenient).poll_read(&mut cx, &mut read) {
            Poll::Pending if lenient.get_ref().rest.is_empty() => answer(&mut lenient, &mut cx),
            Poll::Pending => continue,
            Poll::Ready(Err(e)) => panic!("the connection does not fail, yet: {e}"),
            Poll::Ready(Ok(())) if read.filled().is_empty() => break,
            Poll::Ready(Ok(())) => out.extend_from_slice(read.filled()),
        }
    }
    // The end stays the end.
    let mut read = ReadBuf::new(&mut buf[..1]);
    loop {
        match Pin::new(&mut lenient).poll_read(&mut cx, &mut read) {
            Poll::Pending => answer(&mut lenient, &mut cx),
            Poll::Ready(result) => {
                result.expect("no error after the end");
                assert!(read.filled().is_empty(), "bytes after the end");
                break;
            }
        }
    }
    out
}

/// Writes and flushes an answer, as the server does for each request.
fn answer(lenient: &mut LenientRequests<Connection<'_>>, cx: &mut Context<'_>) {
    let written = Pin::new(&mut *lenient).poll_write(cx, b"HTTP/1.1 200 OK\r\n\r\n");
    assert!(matches!(written, Poll::Ready(Ok(_))));
    assert!(matches!(
        Pin::new(lenient).poll_flush(cx),
        Poll::Ready(Ok(()))
    ));
}

/// The documented rules applied to the whole input at once: request line, header lines
/// up to an empty one, `Content-Length` bytes of body, and again; a line longer than
/// 16 KiB as it is; the rest as it is after a `Transfer-Encoding`, a Content-Length that
/// is not a number or one longer than 16 KiB, and from an unfinished line at the end.
fn model(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = input;
    loop {
        // The request line, after any blank lines (passed on); one over the limit is passed
        // on as it is, and its headers follow.
        let line = match take_line(&mut rest) {
            Line::End => {
                out.extend_from_slice(rest);
                return out;
            }
            Line::Long(line) => line.to_vec(),
            Line::Normal(line) => {
                let is_blank = line
                    .iter()
                    .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'\x0c'));
                if is_blank {
                    out.extend_from_slice(line);
                    continue;
                }
                encode_target(line)
            }
        };
        out.extend_from_slice(&line);

        // The header lines, up to an empty one, which ends the head.
        let mut body_len = 0u64;
        let mut framed = true;
        loop {
            let line = match take_line(&mut rest) {
                Line::End => {
                    out.extend_from_slice(rest);
                    return out;
                }
                Line::Long(line) => {
                    // Passed on unread; if it is a framing header, what follows is too.
                    out.extend_from_slice(line);
                    let name = line.split(|&b| b == b':').next().unwrap_or_default();
                    if name.eq_ignore_ascii_case(b"content-length")
                        || name.eq_ignore_ascii_case(b"transfer-encoding")
                    {
                        framed = false;
                        break;
                    }
                    continue;
                }
                Line::Normal(line) => line,
            };
            out.extend_from_slice(line);
            let mut text = line;
            while let [head @ .., b'\r' | b'\n'] = text {
                text = head;
            }
            if text.is_empty() {
                break;
            }
            let Some(colon) = text.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (&text[..colon], &text[colon + 1..]);
            if name.eq_ignore_ascii_case(b"content-length") {
                match content_length(value) {
                    Some(n) => body_len = n,
                    None => framed = false,
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                framed = false;
            }
        }
        if !framed {
            out.extend_from_slice(rest);
            return out;
        }

        // The body, passed on.
        let n = rest
            .len()
            .min(usize::try_from(body_len).unwrap_or(usize::MAX));
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

/// The next line of the input.
enum Line<'a> {
    /// A line (with its `\n`) of at most `MAX_LINE` bytes before its `\n`.
    Normal(&'a [u8]),
    /// A line with more than `MAX_LINE` bytes before its `\n` (or before the end of the
    /// input, if it has none): passed on as it is.
    Long(&'a [u8]),
    /// No complete line of at most `MAX_LINE` bytes: the rest passes as it is.
    End,
}

/// Takes the next line off `rest`.
fn take_line<'a>(rest: &mut &'a [u8]) -> Line<'a> {
    let end = rest.iter().position(|&b| b == b'\n');
    let content = end.unwrap_or(rest.len());
    if content > MAX_LINE {
        let (line, tail) = rest.split_at(end.map_or(rest.len(), |newline| newline + 1));
        *rest = tail;
        return Line::Long(line);
    }
    let Some(newline) = end else {
        return Line::End;
    };
    let (line, tail) = rest.split_at(newline + 1);
    *rest = tail;
    Line::Normal(line)
}

/// A Content-Length value as a number. Its surrounding whitespace and a leading `+` are
/// accepted as Rust's `str::trim` and `u64::from_str` do, which is what the adapter uses:
/// HTTP allows neither the `+` nor non-ASCII spaces, but the server refuses such a request
/// and closes the connection, so how the adapter frames what follows cannot matter.
fn content_length(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// The request line with `<`, `>` and `"` percent-encoded between its first and last
/// space (the request target of `METHOD target VERSION`).
fn encode_target(line: &[u8]) -> Vec<u8> {
    let spaces: Vec<usize> = (0..line.len()).filter(|&i| line[i] == b' ').collect();
    let (Some(&first), Some(&last)) = (spaces.first(), spaces.last()) else {
        return line.to_vec();
    };
    let mut out = Vec::with_capacity(line.len() + 16);
    for (i, &b) in line.iter().enumerate() {
        match b {
            b'<' if first < i && i < last => out.extend_from_slice(b"%3C"),
            b'>' if first < i && i < last => out.extend_from_slice(b"%3E"),
            b'"' if first < i && i < last => out.extend_from_slice(b"%22"),
            _ => out.push(b),
        }
    }
    out
}

/// Checks that `output` is `input` with zero or more `<`, `>` and `"` percent-encoded.
fn assert_only_encoded(input: &[u8], output: &[u8]) {
    let mut out = output;
    for (at, &b) in input.iter().enumerate() {
        let escape: &[u8] = match b {
            b'<' => b"%3C",
            b'>' => b"%3E",
            b'"' => b"%22",
            _ => b"",
        };
        if out.first() == Some(&b) {
            out = &out[1..];
        } else if !escape.is_empty() && out.starts_with(escape) {
            out = &out[escape.len()..];
        } else {
            panic!(
                "input byte {at} ({:?}) is not in the output as it is or encoded: {:?}",
                b as char,
                Show(&out[..out.len().min(16)])
            );
        }
    }
    assert!(out.is_empty(), "bytes added at the end: {:?}", Show(out));
}

/// Bytes shown as text, with runs of one byte shortened (the inputs can be long).
struct Show<'a>(&'a [u8]);

impl std::fmt::Debug for Show<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = String::new();
        let mut rest = self.0;
        while let Some(&b) = rest.first() {
            let run = rest.iter().take_while(|&&c| c == b).count();
            if run > 8 {
                text.push_str(&format!("{}<x{run}>", b.escape_ascii()));
            } else {
                text.extend(std::iter::repeat_n(b.escape_ascii().to_string(), run));
            }
            rest = &rest[run..];
        }
        write!(f, "\"{text}\" ({} bytes)", self.0.len())
    }
}
