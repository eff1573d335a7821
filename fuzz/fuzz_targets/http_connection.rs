//! The server's HTTP/1 connection on arbitrary bytes, delivered in arbitrary pieces: it
//! never panics, every answer is an HTTP/1.1 answer, what it answers does not depend on
//! how the connection's bytes arrive, and the request targets the router sees have their
//! raw `<`, `>` and `"` percent-encoded.
//!
//! Input layout: the first 4 bytes seed the choice of piece sizes and `Pending`s; the
//! rest is the connection's bytes, where `0xFF n b` stands for `(n + 1) * 128` copies of
//! `b` so that heads around the 64 KiB limit are within reach of small inputs.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use bus::http::connection::serve;
use bus::http::traffic::Traffic;
use bus::http::Limits;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Caps the expanded connection bytes, to keep each run fast.
const MAX_STREAM: usize = 160 << 10;

fuzz_target!(|data: &[u8]| {
    let (seed, script) = data.split_at(data.len().min(4));
    let mut seed_bytes = [0u8; 4];
    seed_bytes[..seed.len()].copy_from_slice(seed);
    let stream = expand(script);

    let whole = run(&stream, None);
    let pieces = run(&stream, Some(Rng::new(u32::from_le_bytes(seed_bytes))));
    assert!(
        whole == pieces,
        "the answers depend on how the input arrives\n  whole:  {:?}\n  pieces: {:?}",
        String::from_utf8_lossy(&whole),
        String::from_utf8_lossy(&pieces)
    );
    if !whole.is_empty() {
        assert!(whole.starts_with(b"HTTP/1.1 "), "{:?}", String::from_utf8_lossy(&whole));
    }
    for line in String::from_utf8_lossy(&whole).split("\r\n") {
        if let Some(target) = line.strip_prefix("target=") {
            assert!(!target.contains(['<', '>', '"']), "{target:?}");
        }
    }
});

/// Serves the connection's bytes to the end and returns what the server wrote, without
/// its `date:` lines (the only part that depends on the clock).
fn run(stream: &[u8], rng: Option<Rng>) -> Vec<u8> {
    let written = Arc::new(Mutex::new(Vec::new()));
    let connection = Connection {
        input: stream.to_vec(),
        at: 0,
        piece: 0,
        rng,
        paused: false,
        written: Arc::clone(&written),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let limits = Arc::new(Limits {
        max_body: 1 << 20,
        max_subject_len: 1024,
        max_connections: 1,
        max_subscriptions: 1,
        max_key_len: 1024,
        max_batch: 100,
        idle_timeout: Duration::from_secs(60),
        body_timeout: Duration::from_secs(60),
    });
    runtime.block_on(serve(
        connection,
        BytesMut::new(),
        router(),
        limits,
        Arc::new(Traffic::new(false)),
        shutdown,
    ));
    let written = written.lock().expect("not poisoned").clone();
    let text = written
        .split_inclusive(|&b| b == b'\n')
        .filter(|line| !line.starts_with(b"date: "))
        .flatten()
        .copied()
        .collect();
    text
}

/// Echoes each request's method, target and body.
fn router() -> Router {
    Router::new().fallback(|request: Request| async move {
        let (parts, body) = request.into_parts();
        let body = match axum::body::to_bytes(body, 1 << 20).await {
            Ok(body) => String::from_utf8_lossy(&body).into_owned(),
            Err(e) => format!("error {e}"),
        };
        Body::from(format!(
            "method={}\r\ntarget={}\r\nbody={body:?}\r\n",
            parts.method, parts.uri
        ))
    })
}

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

/// A connection that delivers its bytes in pieces (one piece, or what fits of it, per
/// read, sometimes after a `Pending` first) and keeps what is written to it.
struct Connection {
    input: Vec<u8>,
    at: usize,
    /// What is left of the current piece.
    piece: usize,
    rng: Option<Rng>,
    paused: bool,
    written: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rng) = &mut this.rng {
            if !this.paused && rng.next() % 8 == 0 {
                this.paused = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            this.paused = false;
            if this.piece == 0 {
                this.piece = rng.size(20_000);
            }
        } else {
            this.piece = usize::MAX;
        }
        let rest = &this.input[this.at..];
        let n = this.piece.min(rest.len()).min(buf.remaining());
        buf.put_slice(&rest[..n]);
        this.at += n;
        this.piece -= n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.written.lock().expect("not poisoned").extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
