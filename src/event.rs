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

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::timestamp::{Timestamp, FORMATTED_LEN};

/// Longest id a client may supply.
pub const MAX_ID_LEN: usize = 128;

/// Longest subject an event may have: a [`StoredEvent`] keeps its subject's length in 16
/// bits. (`--max-subject-len` cannot be set higher.)
pub const MAX_SUBJECT_LEN: usize = u16::MAX as usize;

/// Why an event cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("invalid event id {0:?}: ids start with \"e_\" and use only letters, digits and _ - . ~ : (at most 128 characters)")]
    InvalidId(String),
    #[error("the subject is {0} bytes long; an event's subject may have at most {max} bytes", max = MAX_SUBJECT_LEN)]
    SubjectTooLong(usize),
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
    /// The JSON members between `id` and `created_at`, each preceded by a comma, then
    /// `,"payload":<json>` (or nothing) from `payload_at` on: one buffer, made with one
    /// allocation of exactly its size.
    encoded: Bytes,
    /// Where the payload member starts in `encoded`.
    payload_at: usize,
    /// Where the members are in `encoded` (see [`JsonLayout`]; `id` is unused).
    members_layout: JsonLayout,
}

impl PendingEvent {
    pub fn new(draft: &EventDraft<'_>) -> Result<PendingEvent, EventError> {
        if let Some(id) = draft.id {
            validate_client_id(id)?;
        }
        if draft.subject.len() > MAX_SUBJECT_LEN {
            return Err(EventError::SubjectTooLong(draft.subject.len()));
        }
        let member_len = |name: &str, value: &str| {
            if value.is_empty() {
                0
            } else {
                b",\"\":".len() + name.len() + json_string_len(value)
            }
        };
        let payload_len = draft.payload.map_or(0, |p| PAYLOAD_PREFIX.len() + p.len());
        // The exact size, so that the buffer becomes `Bytes` without another allocation.
        let len = member_len("trace_id", draft.trace_id)
            + member_len("key", draft.key)
            + b",\"subject\":".len()
            + json_string_len(draft.subject)
            + member_len("response_subject", draft.response_subject)
            + payload_len;
        let mut members = Vec::with_capacity(len);
        let trace_id = push_member(&mut members, "trace_id", draft.trace_id);
        let key = push_member(&mut members, "key", draft.key);
        members.extend_from_slice(b",\"subject\":");
        let subject_start = members.len() + 1;
        push_json_string(&mut members, draft.subject);
        let subject = subject_start..members.len() - 1;
        let response_subject =
            push_member(&mut members, "response_subject", draft.response_subject);
        let payload_at = members.len();
        if let Some(payload) = draft.payload {
            members.extend_from_slice(PAYLOAD_PREFIX);
            members.extend_from_slice(payload);
        }
        debug_assert_eq!(
            members.len(),
            len,
            "PendingEvent::new sizes its buffer exactly"
        );
        Ok(PendingEvent {
            id: draft.id.map(Box::from),
            created_at: draft.created_at,
            encoded: Bytes::from(members),
            payload_at,
            members_layout: JsonLayout {
                id: 0..0,
                trace_id,
                key,
                subject,
                response_subject,
                created_at: 0..0,
            },
        })
    }

    /// The JSON members between `id` and `created_at`.
    fn members(&self) -> &[u8] {
        &self.encoded[..self.payload_at]
    }

    /// `,"payload":<json>` or empty.
    fn payload_member(&self) -> &[u8] {
        &self.encoded[self.payload_at..]
    }

    /// The client-supplied id, if any.
    /// The event's subject and deduplication key as they are encoded (JSON strings,
    /// escaped), if it has a key: what tells keyed events apart, as
    /// [`JsonLayout::subject_and_key`] reads it from a stored event.
    pub fn encoded_key(&self) -> Option<(&[u8], &[u8])> {
        let key = self.members_layout.key.clone()?;
        Some((
            &self.encoded[self.members_layout.subject.clone()],
            &self.encoded[key],
        ))
    }

    pub fn client_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Upper bound of the encoded JSON's length, for buffer sizing.
    pub(crate) fn encoded_len_hint(&self) -> usize {
        self.encoded.len() + MAX_ID_LEN + FORMATTED_LEN + 64
    }

    /// The exact length of the JSON [`PendingEvent::write_json`] writes with an id of
    /// `id_len` bytes at `index`, without writing it.
    pub fn json_len(&self, id_len: usize, index: i64) -> usize {
        let digits = index
            .unsigned_abs()
            .checked_ilog10()
            .map_or(1, |d| d as usize + 1);
        b"{\"id\":\"".len()
            + id_len
            + 1
            + self.encoded.len()
            + b",\"created_at\":\"".len()
            + FORMATTED_LEN
            + 1
            + b",\"index\":".len()
            + usize::from(index < 0)
            + digits
            + 1
    }

    /// Appends the event's compact JSON to `out` and returns its layout (relative to the
    /// JSON's first byte). `index` is the position, or -1 for events that are not stored
    /// (inbox subjects).
    pub fn write_json(
        &self,
        out: &mut Vec<u8>,
        id: &str,
        created_at: &[u8; FORMATTED_LEN],
        index: i64,
    ) -> JsonLayout {
        const ID_START: usize = b"{\"id\":\"".len();
        let json_start = out.len();
        out.extend_from_slice(b"{\"id\":\"");
        out.extend_from_slice(id.as_bytes());
        out.push(b'"');
        out.extend_from_slice(self.members());
        out.extend_from_slice(b",\"created_at\":\"");
        let created_at_start = out.len() - json_start;
        out.extend_from_slice(created_at);
        out.push(b'"');
        out.extend_from_slice(self.payload_member());
        out.extend_from_slice(b",\"index\":");
        if index < 0 {
            out.push(b'-');
        }
        push_decimal(out, index.unsigned_abs());
        out.push(b'}');

        let members_start = ID_START + id.len() + 1;
        let shift = |r: &Range<usize>| r.start + members_start..r.end + members_start;
        let m = &self.members_layout;
        JsonLayout {
            id: ID_START..ID_START + id.len(),
            trace_id: m.trace_id.as_ref().map(shift),
            key: m.key.as_ref().map(shift),
            subject: shift(&m.subject),
            response_subject: m.response_subject.as_ref().map(shift),
            created_at: created_at_start..created_at_start + FORMATTED_LEN,
        }
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

/// Where the members of a stored event's JSON are, as byte ranges of the JSON. `id`,
/// `subject` and `created_at` (which never need escapes) are given without quotes; the
/// other strings as raw JSON strings, quotes included (they may contain escapes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonLayout {
    pub id: Range<usize>,
    pub trace_id: Option<Range<usize>>,
    pub key: Option<Range<usize>>,
    pub subject: Range<usize>,
    pub response_subject: Option<Range<usize>>,
    /// The RFC 3339 text, without quotes.
    pub created_at: Range<usize>,
}

impl JsonLayout {
    /// Reads the layout of JSON written by [`PendingEvent::write_json`] (it relies on the
    /// fixed member order, it is not a JSON parser).
    pub fn parse(json: &[u8]) -> Option<JsonLayout> {
        let mut at = b"{\"id\":".len();
        if !json.starts_with(b"{\"id\":\"") {
            return None;
        }
        let id = unescaped_string(json, at)?;
        at = id.end + 1;
        let member = |name: &[u8], at: &mut usize| -> Option<Option<Range<usize>>> {
            let rest = json.get(*at..)?;
            if rest.first() == Some(&b',')
                && rest.get(1) == Some(&b'"')
                && rest[2..].starts_with(name)
                && rest.get(2 + name.len()..4 + name.len()) == Some(b"\":")
            {
                let start = *at + 4 + name.len();
                let end = string_end(json, start)?;
                *at = end;
                return Some(Some(start..end));
            }
            Some(None)
        };
        let trace_id = member(b"trace_id", &mut at)?;
        let key = member(b"key", &mut at)?;
        let subject = member(b"subject", &mut at)??;
        let subject = subject.start + 1..subject.end - 1;
        let response_subject = member(b"response_subject", &mut at)?;
        let created_at = member(b"created_at", &mut at)??;
        Some(JsonLayout {
            id: id.start..id.end,
            trace_id,
            key,
            subject,
            response_subject,
            created_at: created_at.start + 1..created_at.end - 1,
        })
    }

    /// The subject and key of a stored event's JSON as they are encoded, if it has a key
    /// (see [`PendingEvent::encoded_key`]).
    pub fn subject_and_key<'a>(&self, json: &'a [u8]) -> Option<(&'a [u8], &'a [u8])> {
        Some((
            json.get(self.subject.clone())?,
            json.get(self.key.clone()?)?,
        ))
    }

    /// The event's deduplication key, if it has one of at most `max_len` bytes.
    pub fn key_within(&self, json: &[u8], max_len: usize) -> Option<String> {
        let raw = &json[self.key.clone()?];
        // Its JSON form is at least as long as the key: longer keys are not decoded.
        if raw.len() > max_len + 2 && !raw.contains(&b'\\') {
            return None;
        }
        let key: String = serde_json::from_slice(raw).ok()?;
        (key.len() <= max_len).then_some(key)
    }
}

/// The end (exclusive, after the closing quote) of the JSON string starting at `start`.
fn string_end(json: &[u8], start: usize) -> Option<usize> {
    if json.get(start) != Some(&b'"') {
        return None;
    }
    let mut i = start + 1;
    loop {
        match json.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// The contents of a JSON string without escapes starting at `start` (its opening quote).
fn unescaped_string(json: &[u8], start: usize) -> Option<Range<usize>> {
    let end = string_end(json, start)?;
    let inner = start + 1..end - 1;
    (!json[inner.clone()].contains(&b'\\')).then_some(inner)
}

/// The id of a stored event, read from the front of its JSON (`{"id":"…"`).
pub fn id_of_json(json: &[u8]) -> Option<&str> {
    let id = unescaped_string(json, b"{\"id\":".len())?;
    std::str::from_utf8(&json[id]).ok()
}

/// Cuts a buffer of consecutive frames into events: `spans` gives each event's position,
/// where its frame starts and its JSON layout, in buffer order.
pub(crate) fn split_frames(
    frames: Bytes,
    spans: Vec<(u64, usize, JsonLayout)>,
) -> Vec<StoredEvent> {
    let mut events = Vec::with_capacity(spans.len());
    let mut spans = spans.into_iter().peekable();
    while let Some((position, start, layout)) = spans.next() {
        let end = spans.peek().map_or(frames.len(), |next| next.1);
        events.push(StoredEvent::new(
            position,
            frames.slice(start..end),
            &layout,
        ));
    }
    events
}

/// The `index` of a stored event (its position), read from the end of its JSON
/// (`…,"index":N}`): the one member that is always last.
pub fn index_of_json(json: &[u8]) -> Option<u64> {
    const INDEX: &[u8] = b",\"index\":";
    let body = json.strip_suffix(b"}")?;
    let digits = body.len() - body.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if digits == body.len() || !body[..digits].ends_with(INDEX) {
        return None;
    }
    std::str::from_utf8(&body[digits..]).ok()?.parse().ok()
}

/// A stored event in both wire forms, sharing one buffer: the SSE frame, and the JSON as
/// a slice of it. Cloning is cheap (reference counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    position: u64,
    frame: Bytes,
    id_len: u16,
    /// Where the subject is in the frame.
    subject_start: u32,
    subject_len: u16,
}

impl StoredEvent {
    /// Wraps a frame written by [`push_sse_frame`], given the layout of its JSON.
    pub(crate) fn new(position: u64, frame: Bytes, layout: &JsonLayout) -> StoredEvent {
        let json_start = FRAME_ID.len() + layout.id.len() + FRAME_DATA.len();
        StoredEvent {
            position,
            frame,
            id_len: layout.id.len() as u16,
            subject_start: (json_start + layout.subject.start) as u32,
            subject_len: layout.subject.len() as u16,
        }
    }

    /// The event whose JSON this is (as stored or streamed), at `position`, with a frame
    /// of its own; `None` if the JSON is not an event's.
    pub fn from_json(position: u64, json: &[u8]) -> Option<StoredEvent> {
        let layout = JsonLayout::parse(json)?;
        let id = std::str::from_utf8(&json[layout.id.clone()]).ok()?;
        let mut frame = BytesMut::with_capacity(sse_frame_len(id, json));
        push_sse_frame(&mut frame, id, json);
        Some(StoredEvent::new(position, frame.freeze(), &layout))
    }

    /// The event with a frame of its own, of its exact size: for holding an event long
    /// (an unacknowledged delivery) without keeping alive the larger buffer its frame may
    /// share with other events (a read of the log, a group commit in the tail).
    pub fn detached(&self) -> StoredEvent {
        StoredEvent {
            frame: Bytes::copy_from_slice(&self.frame),
            ..self.clone()
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

    pub fn subject(&self) -> &str {
        let start = self.subject_start as usize;
        let subject = &self.frame[start..start + usize::from(self.subject_len)];
        // Subjects are validated ASCII.
        std::str::from_utf8(subject).unwrap_or_default()
    }

    /// The event's compact JSON, exactly as stored.
    /// The subject a reply should go to, if the publisher asked for one.
    pub fn response_subject(&self) -> Option<String> {
        let json = self.json();
        let layout = JsonLayout::parse(&json)?;
        // Optional members' ranges hold the JSON string, quotes included.
        serde_json::from_slice(&json[layout.response_subject?]).ok()
    }

    /// The payload's JSON, or `null` if the event has none.
    pub fn payload_json(&self) -> Bytes {
        const PAYLOAD: &[u8] = b",\"payload\":";
        const INDEX: &[u8] = b",\"index\":";
        let json = self.json();
        let payload = JsonLayout::parse(&json).and_then(|layout| {
            // The members are written in a fixed order: … created_at, payload, index.
            let after_created_at = layout.created_at.end + 1;
            let index_at = json.windows(INDEX.len()).rposition(|w| w == INDEX)?;
            let member = json.get(after_created_at..index_at)?;
            member
                .starts_with(PAYLOAD)
                .then(|| json.slice(after_created_at + PAYLOAD.len()..index_at))
        });
        payload.unwrap_or_else(|| Bytes::from_static(b"null"))
    }

    /// The creation time as stored (RFC 3339).
    pub fn created_at(&self) -> Option<crate::timestamp::Timestamp> {
        let json = self.json();
        let layout = JsonLayout::parse(&json)?;
        let text = std::str::from_utf8(&json[layout.created_at]).ok()?;
        crate::timestamp::Timestamp::parse(text).ok()
    }

    pub fn json(&self) -> Bytes {
        let start = FRAME_ID.len() + usize::from(self.id_len) + FRAME_DATA.len();
        self.frame.slice(start..self.frame.len() - FRAME_END.len())
    }

    /// The ready-made SSE frame (`id:`, `event: msg`, `data:`).
    pub fn sse_frame(&self) -> &Bytes {
        &self.frame
    }
}

/// Appends `,"name":"value"` unless `value` is empty; returns where the string literal
/// (quotes included) is.
fn push_member(out: &mut Vec<u8>, name: &str, value: &str) -> Option<Range<usize>> {
    if value.is_empty() {
        return None;
    }
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    let start = out.len();
    push_json_string(out, value);
    Some(start..out.len())
}

/// The compact form of valid JSON text: insignificant whitespace removed, everything else
/// (numbers, escapes, member order) byte for byte as given.
pub fn compact_json(json: &[u8]) -> Vec<u8> {
    compact_and_measure(json).0
}

/// How deeply a payload may nest arrays and objects. Inside its event (one more level),
/// that is the 127 levels that serde_json accepts by default (other common parsers accept
/// more), so every subscriber can parse what it receives.
pub const MAX_PAYLOAD_DEPTH: usize = 126;

/// A payload (valid JSON text) as it is stored: compacted as by [`compact_json`], or
/// `None` if it nests arrays and objects more than [`MAX_PAYLOAD_DEPTH`] levels deep.
/// One pass over the bytes.
pub fn compact_payload(json: &[u8]) -> Option<Vec<u8>> {
    let (compact, depth) = compact_and_measure(json);
    (depth <= MAX_PAYLOAD_DEPTH).then_some(compact)
}

/// [`compact_json`], and the deepest nesting of arrays and objects (0 for a scalar).
fn compact_and_measure(json: &[u8]) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(json.len());
    let (mut depth, mut deepest) = (0usize, 0usize);
    // Bytes are copied in runs between the whitespace that is dropped, not one by one.
    let mut run_start = 0;
    let mut i = 0;
    while let Some(&b) = json.get(i) {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {
                out.extend_from_slice(&json[run_start..i]);
                run_start = i + 1;
            }
            b'"' => {
                // Strings are skipped whole, to their closing quote: the next quote or
                // backslash is found with memchr, and an escape skips the byte after it.
                i += 1;
                loop {
                    let rest = json.get(i..).unwrap_or_default();
                    match memchr::memchr2(b'"', b'\\', rest) {
                        Some(found) if rest[found] == b'\\' => i += found + 2,
                        Some(found) => {
                            i += found;
                            break;
                        }
                        None => {
                            i = json.len();
                            break;
                        }
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    out.extend_from_slice(&json[run_start..]);
    (out, deepest)
}

/// The start of a stored event's payload member.
const PAYLOAD_PREFIX: &[u8] = b",\"payload\":";

/// The length of `value` as [`push_json_string`] writes it.
fn json_string_len(value: &str) -> usize {
    2 + value
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
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

    fn encode(draft: &EventDraft<'_>, id: &str, index: i64) -> String {
        let pending = PendingEvent::new(draft).unwrap();
        let created = Timestamp::from_unix_nanos(1_700_000_000_123_456_789).format();
        let mut out = Vec::new();
        let layout = pending.write_json(&mut out, id, &created, index);
        assert_eq!(
            pending.json_len(id.len(), index),
            out.len(),
            "json_len is exact"
        );
        assert_eq!(
            JsonLayout::parse(&out),
            Some(layout),
            "written and parsed layouts agree"
        );
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

    /// The encoder and the wire's type of a delivered event must not drift apart: what
    /// `write_json` writes reads back as a `wire::EventOut` with every member equal, and
    /// that type writes the same bytes again.
    #[test]
    fn encoded_events_are_the_wires_event_out() {
        let created = Timestamp::from_unix_nanos(1_700_000_000_123_456_789);
        let drafts = [
            EventDraft {
                subject: "a.b",
                ..Default::default()
            },
            EventDraft {
                subject: "orders.eu.created",
                trace_id: "t\",\"key\":\"fake\n",
                key: "k\\\u{1}é",
                response_subject: "_bus_.r1",
                payload: Some(br#"{"subject":"not.this","n":[1,2.5,null]}"#),
                ..Default::default()
            },
            EventDraft {
                subject: "a.b",
                payload: Some(b"null"),
                ..Default::default()
            },
            EventDraft {
                subject: "a.b",
                payload: Some(br#""text""#),
                ..Default::default()
            },
        ];
        for (draft, index) in drafts.iter().zip([0, 7, -1, i64::MAX]) {
            let pending = PendingEvent::new(draft).unwrap();
            let mut json = Vec::new();
            pending.write_json(&mut json, "e_9", &created.format(), index);
            let wire: crate::wire::EventOut = serde_json::from_slice(&json).unwrap();
            assert_eq!(wire.id, "e_9");
            assert_eq!(wire.trace_id, draft.trace_id);
            assert_eq!(wire.key, draft.key);
            assert_eq!(wire.subject, draft.subject);
            assert_eq!(wire.response_subject, draft.response_subject);
            assert_eq!(wire.created_at, created.to_string());
            assert_eq!(
                wire.payload.as_deref().map(|p| p.get().as_bytes()),
                draft.payload
            );
            assert_eq!(wire.index, index);
            assert_eq!(
                serde_json::to_vec(&wire).unwrap(),
                json,
                "{}",
                String::from_utf8_lossy(&json)
            );
        }
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
    fn stored_event_exposes_frame_json_id_and_subject() {
        let json = encode(
            &EventDraft {
                subject: "a.b",
                trace_id: "t",
                ..Default::default()
            },
            "e_9",
            3,
        );
        let layout = JsonLayout::parse(json.as_bytes()).unwrap();
        let mut buf = BytesMut::new();
        push_sse_frame(&mut buf, "e_9", json.as_bytes());
        assert_eq!(buf.len(), sse_frame_len("e_9", json.as_bytes()));
        let event = StoredEvent::new(3, buf.freeze(), &layout);
        assert_eq!(event.id(), "e_9");
        assert_eq!(event.subject(), "a.b");
        assert_eq!(event.json(), json.as_bytes());
        assert_eq!(
            event.sse_frame(),
            format!("id: e_9\nevent: msg\ndata: {json}\n\n").as_bytes()
        );
    }

    #[test]
    fn layout_finds_every_member_even_with_escapes() {
        let json = encode(
            &EventDraft {
                subject: "orders.eu.created",
                trace_id: "t\",\"key\":\"fake",
                key: "k\\\"",
                response_subject: "_bus_.r1",
                payload: Some(br#"{"subject":"not.this"}"#),
                ..Default::default()
            },
            "e_1",
            -1,
        );
        assert!(json.ends_with(r#","index":-1}"#), "{json}");
        let layout = JsonLayout::parse(json.as_bytes()).unwrap();
        let b = json.as_bytes();
        assert_eq!(&b[layout.id.clone()], b"e_1");
        assert_eq!(&b[layout.subject.clone()], b"orders.eu.created");
        let key: String = serde_json::from_slice(&b[layout.key.clone().unwrap()]).unwrap();
        assert_eq!(key, "k\\\"");
        let trace: String = serde_json::from_slice(&b[layout.trace_id.clone().unwrap()]).unwrap();
        assert_eq!(trace, "t\",\"key\":\"fake");
        assert_eq!(
            &b[layout.response_subject.clone().unwrap()],
            br#""_bus_.r1""#
        );
        let minimal = encode(
            &EventDraft {
                subject: "a.b",
                ..Default::default()
            },
            "e_2",
            0,
        );
        let layout = JsonLayout::parse(minimal.as_bytes()).unwrap();
        assert_eq!(
            (layout.trace_id, layout.key, layout.response_subject),
            (None, None, None)
        );
        assert_eq!(
            JsonLayout::parse(b"{\"id\":\"e_1\",\"subject\":\"a.b\"}"),
            None
        );
        assert_eq!(JsonLayout::parse(b"[]"), None);
    }

    #[test]
    fn compaction_keeps_strings_and_drops_layout() {
        let pretty = b"{\n  \"a\" : [ 1, 2.50 ,\"x y\\\" \\\\\" ],\r\n\t\"b\": { } }";
        assert_eq!(
            compact_json(pretty),
            br#"{"a":[1,2.50,"x y\" \\"],"b":{}}"#.to_vec()
        );
        assert_eq!(compact_json(b" \"\\u00e9\\n\" "), br#""\u00e9\n""#.to_vec());
        // Pretty-printed values compact to serde's compact form.
        let values = [
            serde_json::json!({"text": "a b  c", "nested": [1, {"k": " \" \\ "}, null], "é": true}),
            serde_json::json!(["  ", "\t\n", {}, [], -1.5e3]),
            serde_json::json!("just a string with spaces"),
        ];
        for value in values {
            let pretty = serde_json::to_vec_pretty(&value).unwrap();
            assert_eq!(compact_json(&pretty), serde_json::to_vec(&value).unwrap());
        }
    }

    #[test]
    fn payloads_deeper_than_the_limit_are_refused() {
        let nested = |depth: usize| format!("{}1{}", "[ ".repeat(depth), " ]".repeat(depth));
        let deepest = nested(MAX_PAYLOAD_DEPTH);
        assert_eq!(
            compact_payload(deepest.as_bytes()),
            Some(deepest.replace(' ', "").into_bytes())
        );
        assert_eq!(
            compact_payload(nested(MAX_PAYLOAD_DEPTH + 1).as_bytes()),
            None
        );
        // Brackets inside strings do not nest.
        let quoted = format!(r#"["{}"]"#, "[{".repeat(200));
        assert_eq!(
            compact_payload(quoted.as_bytes()),
            Some(quoted.into_bytes())
        );
    }

    #[test]
    fn the_index_is_read_from_the_end_of_the_json() {
        let created = Timestamp::parse("2023-11-14T22:13:20.123456789Z").unwrap();
        let draft = EventDraft {
            subject: "a.b",
            payload: Some(br#"{"index":5}"#),
            ..EventDraft::default()
        };
        let pending = PendingEvent::new(&draft).unwrap();
        for index in [0, 7, 12345, i64::MAX] {
            let mut json = Vec::new();
            pending.write_json(&mut json, "e_1", &created.format(), index);
            assert_eq!(index_of_json(&json), Some(index as u64));
        }
        let mut json = Vec::new();
        pending.write_json(&mut json, "e_1", &created.format(), -1);
        assert_eq!(index_of_json(&json), None, "not stored");
        assert_eq!(index_of_json(br#"{"id":"e_1","index":}"#), None);
        assert_eq!(index_of_json(br#"{"id":"e_1","x":12}"#), None);
        assert_eq!(index_of_json(b""), None);
    }

    #[test]
    fn json_len_is_exact_for_any_index() {
        let pending = PendingEvent::new(&EventDraft {
            subject: "a.b",
            key: "k\"",
            payload: Some(b"[1]"),
            ..Default::default()
        })
        .unwrap();
        let created = Timestamp::from_unix_nanos(0).format();
        for index in [0, 1, 9, 10, 99, 100, 12345, -1, -10, i64::MAX, i64::MIN] {
            let mut out = Vec::new();
            pending.write_json(&mut out, "e_x", &created, index);
            assert_eq!(pending.json_len(3, index), out.len(), "index {index}");
        }
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
