//! An incremental Server-Sent Events parser: bytes in, messages out.
//!
//! It follows the event-stream format as browsers read it: lines end with `\n`, `\r\n`
//! or `\r`; `field: value` lines accumulate; a blank line dispatches the message; lines
//! starting with `:` are comments (the server's pings) and are dropped; multi-line `data`
//! is joined with `\n`. A block with neither data nor an event name is not a message.

/// One dispatched message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseMessage {
    /// The `event:` field; `message` when absent, as in browsers.
    pub event: String,
    pub data: String,
    /// The `id:` field, if the message had one.
    pub id: Option<String>,
}

#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The previous chunk ended with `\r`: a `\n` starting the next one is part of it.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
    id: Option<String>,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds a chunk; complete messages are appended to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseMessage>) {
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(tail) = rest.strip_prefix(b"\n") {
                rest = tail;
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
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
        self.line.extend_from_slice(rest);
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

    fn parse_in_chunks(input: &[u8], chunk: usize) -> Vec<SseMessage> {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            parser.push(piece, &mut out);
        }
        out
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
            assert_eq!(parse_in_chunks(input, chunk), expected, "chunks of {chunk}");
        }
    }
}
