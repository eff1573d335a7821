//! Events: what a publisher hands to the log ([`PendingEvent`]) and the two wire forms of
//! an event once it is stored — its compact JSON and its Server-Sent-Events frame.
//!
//! The stored JSON has a fixed member order,
//! `{"id":…,"trace_id":…,"key":…,"subject":…,"response_subject":…,"created_at":…,"payload":…,"index":N}`,
//! with `trace_id`, `key`, `response_subject` omitted when empty and `payload` omitted when
//! absent. Because `id` always comes first, the id of a stored record can be read without
//! parsing the JSON ([`id_of_json`]). Everything except the id, `created_at` and `index` is
//! encoded by [`PendingEvent::new`] on the publisher's task, so the log's single writer
//! only splices those three in.
//!
//! Client-supplied ids are restricted to URL-safe ASCII and must start with `e_`: they
//! travel unescaped in SSE `id:` lines, `Last-Event-ID` headers and query strings, and
//! acks require the `e_` prefix.

use bytes::{Bytes, BytesMut};

use crate::timestamp::{Timestamp, FORMATTED_LEN};

/// Longest id a client may supply.
pub const MAX_ID_LEN: usize = 128;

/// Why an event cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("invalid event id {0:?}: ids start with \"e_\" and use only letters, digits and _ - . ~ : (at most 128 characters)")]
    InvalidId(String),
}

/// The fields of an event as a publisher gives them. `payload` must be one compact JSON
/// value (no insignificant whitespace), as the HTTP layer produces after validating it.
#[derive(Debug, Clone, Default)]
pub struct EventDraft<'a> {
    pub subject: &'a str,
    pub trace_id: &'a str,
    pub key: &'a str,
    pub response_subject: &'a str,
    pub payload: Option<&'a [u8]>,
    /// A client-supplied id (restore and copy tools keep ids); `None` lets the log assign one.
    pub id: Option<&'a str>,
    /// A client-supplied creation time; `None` lets the log assign the commit time.
    pub created_at: Option<Timestamp>,
}

/// An event ready to be appended: validated, and encoded except for the id, the creation
/// time and the position, which the log assigns at commit.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub(crate) id: Option<Box<str>>,
    pub(crate) created_at: Option<Timestamp>,
    /// The JSON members between `id` and `created_at`, each preceded by a comma.
    members: Bytes,
    /// `,"payload":<json>` or empty.
    payload_member: Bytes,
}

impl PendingEvent {
    pub fn new(draft: &EventDraft<'_>) -> Result<PendingEvent, EventError> {
        if let Some(id) = draft.id {
            validate_client_id(id)?;
        }
        let mut members = Vec::with_capacity(
            32 + draft.subject.len()
                + draft.trace_id.len()
                + draft.key.len()
                + draft.response_subject.len(),
        );
        push_member(&mut members, "trace_id", draft.trace_id);
        push_member(&mut members, "key", draft.key);
        members.extend_from_slice(b",\"subject\":");
        push_json_string(&mut members, draft.subject);
        push_member(&mut members, "response_subject", draft.response_subject);
        let payload_member = match draft.payload {
            Some(payload) => {
                let mut member = Vec::with_capacity(payload.len() + 11);
                member.extend_from_slice(b",\"payload\":");
                member.extend_from_slice(payload);
                Bytes::from(member)
            }
            None => Bytes::new(),
        };
        Ok(PendingEvent {
            id: draft.id.map(Box::from),
            created_at: draft.created_at,
            members: Bytes::from(members),
            payload_member,
        })
    }

    /// The client-supplied id, if any.
    pub fn client_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Upper bound of the encoded JSON's length, for buffer sizing.
    pub(crate) fn encoded_len_hint(&self) -> usize {
        self.members.len() + self.payload_member.len() + MAX_ID_LEN + FORMATTED_LEN + 64
    }

    /// Appends the event's compact JSON to `out`.
    pub(crate) fn write_json(
        &self,
        out: &mut Vec<u8>,
        id: &str,
        created_at: &[u8; FORMATTED_LEN],
        index: u64,
    ) {
        out.extend_from_slice(b"{\"id\":\"");
        out.extend_from_slice(id.as_bytes());
        out.push(b'"');
        out.extend_from_slice(&self.members);
        out.extend_from_slice(b",\"created_at\":\"");
        out.extend_from_slice(created_at);
        out.push(b'"');
        out.extend_from_slice(&self.payload_member);
        out.extend_from_slice(b",\"index\":");
        push_decimal(out, index);
        out.push(b'}');
    }
}

/// Checks a client-supplied event id (see the module docs for the rules).
pub fn validate_client_id(id: &str) -> Result<(), EventError> {
    let ok = id.len() <= MAX_ID_LEN
        && id.len() > 2
        && id.starts_with("e_")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'~' | b':'));
    if ok {
        Ok(())
    } else {
        Err(EventError::InvalidId(id.to_owned()))
    }
}

/// The id of a stored event, read from the front of its JSON (`{"id":"…"`).
pub fn id_of_json(json: &[u8]) -> Option<&str> {
    let rest = json.strip_prefix(b"{\"id\":\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}

const FRAME_ID: &[u8] = b"id: ";
const FRAME_DATA: &[u8] = b"\nevent: msg\ndata: ";
const FRAME_END: &[u8] = b"\n\n";

/// Length of the SSE frame that [`push_sse_frame`] writes.
pub fn sse_frame_len(id: &str, json: &[u8]) -> usize {
    FRAME_ID.len() + id.len() + FRAME_DATA.len() + json.len() + FRAME_END.len()
}

/// Appends `id: <id>\nevent: msg\ndata: <json>\n\n`. The JSON is compact, hence one line.
pub fn push_sse_frame(out: &mut BytesMut, id: &str, json: &[u8]) {
    out.extend_from_slice(FRAME_ID);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(FRAME_DATA);
    out.extend_from_slice(json);
    out.extend_from_slice(FRAME_END);
}

/// A stored event in both wire forms, sharing one buffer: the SSE frame, and the JSON as
/// a slice of it. Cloning is cheap (reference counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    position: u64,
    frame: Bytes,
    id_len: u16,
}

impl StoredEvent {
    /// Wraps a frame written by [`push_sse_frame`] for an id of `id_len` bytes.
    pub(crate) fn from_frame(position: u64, frame: Bytes, id_len: usize) -> StoredEvent {
        debug_assert!(id_len <= MAX_ID_LEN);
        StoredEvent {
            position,
            frame,
            id_len: id_len as u16,
        }
    }

    /// The event's position in its namespace's log (also its `index`).
    pub fn position(&self) -> u64 {
        self.position
    }

    pub fn id(&self) -> &str {
        let id = &self.frame[FRAME_ID.len()..FRAME_ID.len() + usize::from(self.id_len)];
        // Ids are ASCII: server-made ones by construction, client ones by validation.
        std::str::from_utf8(id).unwrap_or_default()
    }

    /// The event's compact JSON, exactly as stored.
    pub fn json(&self) -> Bytes {
        let start = FRAME_ID.len() + usize::from(self.id_len) + FRAME_DATA.len();
        self.frame.slice(start..self.frame.len() - FRAME_END.len())
    }

    /// The ready-made SSE frame (`id:`, `event: msg`, `data:`).
    pub fn sse_frame(&self) -> &Bytes {
        &self.frame
    }
}

fn push_member(out: &mut Vec<u8>, name: &str, value: &str) {
    if value.is_empty() {
        return;
    }
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    push_json_string(out, value);
}

/// Appends `value` as a JSON string literal.
pub fn push_json_string(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    let bytes = value.as_bytes();
    let mut clean_from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[clean_from..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        clean_from = i + 1;
    }
    out.extend_from_slice(&bytes[clean_from..]);
    out.push(b'"');
}

pub(crate) fn push_decimal(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(draft: &EventDraft<'_>, id: &str, index: u64) -> String {
        let pending = PendingEvent::new(draft).unwrap();
        let created = Timestamp::from_unix_nanos(1_700_000_000_123_456_789).format();
        let mut out = Vec::new();
        pending.write_json(&mut out, id, &created, index);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_has_reference_member_order_and_omits_empty_fields() {
        let json = encode(
            &EventDraft {
                subject: "a.b",
                payload: Some(br#"{"x":1}"#),
                ..Default::default()
            },
            "e_1",
            7,
        );
        assert_eq!(
            json,
            r#"{"id":"e_1","subject":"a.b","created_at":"2023-11-14T22:13:20.123456789Z","payload":{"x":1},"index":7}"#
        );
        let json = encode(
            &EventDraft {
                subject: "a.b",
                trace_id: "t\"1",
                key: "k",
                response_subject: "_bus_.x",
                ..Default::default()
            },
            "e_2",
            0,
        );
        assert_eq!(
            json,
            r#"{"id":"e_2","trace_id":"t\"1","key":"k","subject":"a.b","response_subject":"_bus_.x","created_at":"2023-11-14T22:13:20.123456789Z","index":0}"#
        );
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["trace_id"], "t\"1");
        assert_eq!(id_of_json(json.as_bytes()), Some("e_2"));
    }

    #[test]
    fn json_strings_escape_control_characters() {
        let mut out = Vec::new();
        push_json_string(&mut out, "a\u{1}b\n\\\u{7f}é");
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "\"a\\u0001b\\n\\\\\u{7f}é\"");
        let back: String = serde_json::from_str(&text).unwrap();
        assert_eq!(back, "a\u{1}b\n\\\u{7f}é");
    }

    #[test]
    fn client_ids_are_validated() {
        assert!(validate_client_id("e_cn0vq1g2ps3c73b6vvqg").is_ok());
        assert!(validate_client_id("e_0190-uuid.like~x:y").is_ok());
        for bad in ["", "e_", "x_abc", "e_a b", "e_a\nb", "e_a\"b", "e_é"] {
            assert!(validate_client_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_client_id(&format!("e_{}", "a".repeat(MAX_ID_LEN))).is_err());
    }

    #[test]
    fn stored_event_exposes_frame_json_and_id() {
        let json = br#"{"id":"e_9","subject":"a.b","index":3}"#;
        let mut buf = BytesMut::new();
        push_sse_frame(&mut buf, "e_9", json);
        assert_eq!(buf.len(), sse_frame_len("e_9", json));
        let event = StoredEvent::from_frame(3, buf.freeze(), 3);
        assert_eq!(event.id(), "e_9");
        assert_eq!(&event.json()[..], json);
        assert_eq!(
            &event.sse_frame()[..],
            b"id: e_9\nevent: msg\ndata: {\"id\":\"e_9\",\"subject\":\"a.b\",\"index\":3}\n\n"
        );
    }

    #[test]
    fn decimals() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
        }
    }
}
