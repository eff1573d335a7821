//! An incremental Server-Sent Events parser: bytes in, messages out.
//!
//! It follows the event-stream format as browsers read it: lines end with `\n`, `\r\n`
//! or `\r`; `field: value` lines accumulate; a blank line dispatches the message; lines
//! starting with `:` are comments (the server's pings) and are dropped; multi-line `data`
//! is joined with `\n`. A block with neither data nor an event name is not a message.
//!
//! What it holds is bounded: the message being assembled (its fields and the unfinished
//! line, comments included) may not exceed the parser's limit. A stream that goes past it
//! (a line that never ends, or a message that never does) is refused with [`TooLarge`]
//! before the bytes past the limit are copied: the parser never holds more than the limit
//! (the line's buffer never grows past it; the data's, at most to twice what it holds).

/// One dispatched message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseMessage {
    /// The `event:` field; `message` when absent, as in browsers.
    pub event: String,
    pub data: String,
    /// The `id:` field, if the message had one.
    pub id: Option<String>,
}

/// The stream went past the parser's limit; the parser must not be fed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// The limit, in bytes.
    pub limit: usize,
}

#[derive(Debug)]
pub struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The previous chunk ended with `\r`: a `\n` starting the next one is part of it.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
    id: Option<String>,
    /// Most bytes the message being assembled may hold.
    limit: usize,
}

impl SseParser {
    /// A parser that refuses a message (with its unfinished line) of more than `limit`
    /// bytes.
    pub fn new(limit: usize) -> SseParser {
        SseParser {
            line: Vec::new(),
            after_cr: false,
            event: String::new(),
            data: String::new(),
            has_data: false,
            id: None,
            limit,
        }
    }

    /// Feeds a chunk; complete messages are appended to `out`. Fails, keeping no more
    /// than the limit, once the message being assembled would exceed it (the messages
    /// completed before it are in `out`).
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseMessage>) -> Result<(), TooLarge> {
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(tail) = rest.strip_prefix(b"\n") {
                rest = tail;
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.extend_line(&rest[..end])?;
            let terminator = rest[end];
            rest = &rest[end + 1..];
            if terminator == b'\r' {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
            let line = std::mem::take(&mut self.line);
            self.take_line(&line, out);
        }
        self.extend_line(rest)
    }

    /// Bytes held for the message being assembled.
    fn held(&self) -> usize {
        self.line.len()
            + self.data.len()
            + self.event.len()
            + self.id.as_ref().map_or(0, String::len)
    }

    /// Appends to the unfinished line, unless that would hold more than the limit; the
    /// line's buffer never grows past the limit either.
    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), TooLarge> {
        let held = self.held() + bytes.len();
        if held > self.limit {
            return Err(TooLarge { limit: self.limit });
        }
        let wanted = self.line.len() + bytes.len();
        if wanted > self.line.capacity() {
            // Grow as a Vec would (doubling), but not beyond what the limit allows.
            let room = self.limit - (held - wanted);
            let capacity = (self.line.capacity() * 2).clamp(wanted, room.max(wanted));
            self.line.reserve_exact(capacity - self.line.len());
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn take_line(&mut self, line: &[u8], out: &mut Vec<SseMessage>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.event = value.into_owned(),
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            b"id" if !value.contains('\0') => self.id = Some(value.into_owned()),
            _ => {} // `retry` and unknown fields
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseMessage>) {
        let event = std::mem::take(&mut self.event);
        let data = std::mem::take(&mut self.data);
        let has_data = std::mem::replace(&mut self.has_data, false);
        let id = self.id.take();
        if !has_data && event.is_empty() {
            return;
        }
        out.push(SseMessage {
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data,
            id,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_chunks(
        input: &[u8],
        chunk: usize,
        limit: usize,
    ) -> Result<Vec<SseMessage>, TooLarge> {
        let mut parser = SseParser::new(limit);
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            parser.push(piece, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn frames_comments_and_line_endings() {
        let input = b": ping\n\nid: e_1\nevent: msg\ndata: {\"a\":1}\n\n\
                      event: error\r\ndata: line one\r\ndata: line two\r\n\r\n\
                      data:no space\r\rretry: 10\nevent: done\ndata: end\n\n\
                      id: e_partial\ndata: cut";
        let expected = vec![
            SseMessage {
                event: "msg".into(),
                data: "{\"a\":1}".into(),
                id: Some("e_1".into()),
            },
            SseMessage {
                event: "error".into(),
                data: "line one\nline two".into(),
                id: None,
            },
            SseMessage {
                event: "message".into(),
                data: "no space".into(),
                id: None,
            },
            SseMessage {
                event: "done".into(),
                data: "end".into(),
                id: None,
            },
        ];
        // Every split of the input gives the same messages.
        for chunk in 1..=input.len() {
            assert_eq!(
                parse_in_chunks(input, chunk, 1 << 10),
                Ok(expected.clone()),
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn a_message_may_hold_up_to_the_limit_and_not_a_byte_more() {
        // Held for the first message: `event: msg` (3), `id: e_1` (3), then a data line
        // of 10 bytes; the next message starts from nothing.
        let input = b"event: msg\nid: e_1\ndata: 0123456789\n\ndata: again\n\n";
        let first = SseMessage {
            event: "msg".into(),
            data: "0123456789".into(),
            id: Some("e_1".into()),
        };
        let second = SseMessage {
            event: "message".into(),
            data: "again".into(),
            id: None,
        };
        // The data line is held whole (`data: 0123456789`, 16 bytes) with event and id.
        let fits = 3 + 3 + 16;
        for chunk in 1..=input.len() {
            assert_eq!(
                parse_in_chunks(input, chunk, fits),
                Ok(vec![first.clone(), second.clone()]),
                "chunks of {chunk}"
            );
            assert_eq!(
                parse_in_chunks(input, chunk, fits - 1),
                Err(TooLarge { limit: fits - 1 }),
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn an_endless_line_or_message_is_refused_within_the_limit() {
        const LIMIT: usize = 100_000;
        for (start, piece) in [
            (&b"data: "[..], &b"x"[..]),   // a line that never ends
            (&b""[..], &b"data: y\n"[..]), // a message that never ends
            (&b""[..], &b": ping?"[..]),   // a comment that never ends
        ] {
            for chunk in [1, 7, 4096, 65536] {
                let mut parser = SseParser::new(LIMIT);
                let mut out = Vec::new();
                parser.push(start, &mut out).unwrap();
                let chunk: Vec<u8> = piece.iter().copied().cycle().take(chunk).collect();
                let mut fed = start.len();
                let refused = loop {
                    match parser.push(&chunk, &mut out) {
                        Ok(()) => fed += chunk.len(),
                        Err(e) => break e,
                    }
                    assert!(parser.held() <= LIMIT, "held more than the limit");
                    assert!(
                        parser.line.capacity() <= LIMIT,
                        "the line's buffer outgrew the limit"
                    );
                    assert!(fed <= 10 * LIMIT, "never refused");
                };
                assert_eq!(refused, TooLarge { limit: LIMIT });
                assert!(out.is_empty());
                assert!(parser.held() <= LIMIT && parser.line.capacity() <= LIMIT);
            }
        }
    }
}
