//! The event's JSON in both directions: [`EventIn`], what a publisher sends in a `POST /`
//! body (one object, or an array of them for an atomic batch), and [`EventOut`], what the
//! server streams in `data:` lines and writes in dumps.
//!
//! Payloads stay raw JSON ([`RawValue`]): reading or writing an event never re-encodes
//! its payload. A `payload` member that is present is a payload even when it is JSON
//! `null`; only an absent member means "no payload".
//!
//! These types say what the members are called, which may be left out, and what they
//! hold. What the server checks beyond that (lengths, subject syntax, payload depth) is
//! the HTTP layer's; the server's own encoder of stored events is `crate::event`'s, whose
//! tests check that its bytes read back as an [`EventOut`] with every member equal.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The data of an `event: skipped` frame: retention removed the events from `first_index`
/// to `last_index` before the subscription read them, and it goes on from `next_index`.
/// (EventSource hides SSE comments, so the server sends this as an event too.)
///
/// ```
/// use bus::wire::Skipped;
///
/// let data = r#"{"first_index":0,"last_index":99,"next_index":100}"#;
/// let skipped: Skipped = serde_json::from_str(data)?;
/// assert_eq!(skipped.last_index - skipped.first_index + 1, 100);
/// assert_eq!(serde_json::to_string(&skipped)?, data);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The first removed position.
    pub first_index: u64,
    /// The last removed position.
    pub last_index: u64,
    /// The position the subscription goes on from.
    pub next_index: u64,
}

/// Go's zero `time.Time`, which Go clients send as `created_at` when they leave it unset:
/// the server treats it as absent.
pub const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// An event as a publisher sends it. Every member may be left out (the server refuses an
/// event without a subject, with its own message); members the server assigns (`index`)
/// and members it does not know are ignored, as the reference server does.
///
/// `S` is the type of its strings and `P` of its payload: the server reads owned ones
/// (`EventIn`, the default), a client writes borrowed ones (`EventIn<&str, &RawValue>`),
/// so that sending an event copies nothing. A publish body is one `EventIn` (an object)
/// or an array of them (a batch, stored atomically).
///
/// ```
/// use bus::wire::EventIn;
/// use serde_json::value::RawValue;
///
/// let event: EventIn = serde_json::from_str(r#"{"subject":"a.b","payload":null,"index":9}"#)?;
/// assert_eq!(event.subject, "a.b");
/// assert_eq!(event.payload.as_deref().map(|p| p.get()), Some("null"));
///
/// let sent = EventIn::<&str, &RawValue> { subject: "a.b", ..EventIn::default() };
/// assert_eq!(serde_json::to_string(&sent)?, r#"{"subject":"a.b"}"#);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound(
    serialize = "S: Serialize + AsRef<str>, P: Serialize",
    deserialize = "S: Deserialize<'de> + Default, P: Deserialize<'de>"
))]
pub struct EventIn<S = String, P = Box<RawValue>> {
    /// The event's id (`e_…`); empty or absent lets the server assign one.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub id: S,
    /// Carried through unchanged, for tracing a request across services.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub trace_id: S,
    /// A deduplication key.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub key: S,
    /// Where the event goes; its first segment is the namespace.
    #[serde(default)]
    pub subject: S,
    /// Where answers to the event go (an inbox subject).
    #[serde(default, skip_serializing_if = "is_empty")]
    pub response_subject: S,
    /// RFC 3339 creation time; absent, `null`, empty or [`GO_ZERO_TIME`] lets the server
    /// stamp it (see [`EventIn::given_created_at`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<S>,
    /// Any JSON value.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_payload"
    )]
    pub payload: Option<P>,
}

impl<S: Default, P> Default for EventIn<S, P> {
    // Not derived: that would ask for `P: Default`, which raw JSON is not.
    fn default() -> Self {
        EventIn {
            id: S::default(),
            trace_id: S::default(),
            key: S::default(),
            subject: S::default(),
            response_subject: S::default(),
            created_at: None,
            payload: None,
        }
    }
}

impl<S: AsRef<str>, P> EventIn<S, P> {
    /// The creation time the publisher gave, `None` when it leaves the server to stamp it
    /// (absent, empty, or Go's zero time).
    ///
    /// ```
    /// use bus::wire::{EventIn, GO_ZERO_TIME};
    ///
    /// let mut event: EventIn = EventIn::default();
    /// assert_eq!(event.given_created_at(), None);
    /// event.created_at = Some(GO_ZERO_TIME.into());
    /// assert_eq!(event.given_created_at(), None);
    /// event.created_at = Some("2026-01-02T03:04:05Z".into());
    /// assert_eq!(event.given_created_at(), Some("2026-01-02T03:04:05Z"));
    /// ```
    pub fn given_created_at(&self) -> Option<&str> {
        match self.created_at.as_ref().map(AsRef::as_ref) {
            None | Some("") | Some(GO_ZERO_TIME) => None,
            Some(text) => Some(text),
        }
    }
}

/// An event as the server delivers it (a stream's `data:` line) and dumps it (a line of
/// `bus dump`): its members in the server's order, `trace_id`, `key` and
/// `response_subject` left out when empty and `payload` when the event has none.
///
/// ```
/// use bus::wire::EventOut;
///
/// let line = r#"{"id":"e_1","subject":"a.b","created_at":"2026-01-02T03:04:05.000000000Z","payload":{"n":1},"index":0}"#;
/// let event: EventOut = serde_json::from_str(line)?;
/// assert_eq!((event.id.as_str(), event.index), ("e_1", 0));
/// assert_eq!(serde_json::to_string(&event)?, line);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventOut {
    /// The event's id.
    pub id: String,
    /// The trace id it was published with (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
    /// The deduplication key it was published with (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// Its subject.
    pub subject: String,
    /// Where its publisher waits for answers (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub response_subject: String,
    /// Its creation time (RFC 3339).
    pub created_at: String,
    /// Its payload, `None` if it has none (a `null` payload is `Some`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_payload"
    )]
    pub payload: Option<Box<RawValue>>,
    /// Its position in the namespace's log; -1 for inbox events, which are not stored.
    /// Servers that do not send it (older reference servers) leave it 0.
    #[serde(default)]
    pub index: i64,
}

fn is_empty<S: AsRef<str>>(text: &S) -> bool {
    text.as_ref().is_empty()
}

/// Reads a `payload` member so that JSON `null` is a payload like any other: with
/// `#[serde(default, deserialize_with = "present_payload")]`, only an absent member is
/// `None` (a plain `Option` would take `null` for absent).
fn present_payload<'de, D, P>(deserializer: D) -> Result<Option<P>, D::Error>
where
    D: serde::Deserializer<'de>,
    P: Deserialize<'de>,
{
    P::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_event_reads_leniently() {
        let event: EventIn = serde_json::from_str(
            r#"{"subject":"a.b","created_at":null,"index":3,"unknown":[1],"payload":{"x": [1, 2]}}"#,
        )
        .unwrap();
        assert_eq!(event.subject, "a.b");
        assert_eq!(event.id, "");
        assert_eq!(event.created_at, None);
        assert_eq!(
            event.payload.unwrap().get(),
            r#"{"x": [1, 2]}"#,
            "raw, as sent"
        );

        let bare: EventIn = serde_json::from_str("{}").unwrap();
        assert!(bare.subject.is_empty() && bare.payload.is_none());
        let null: EventIn = serde_json::from_str(r#"{"payload":null}"#).unwrap();
        assert_eq!(
            null.payload.map(|p| p.get().to_owned()).as_deref(),
            Some("null")
        );
    }

    #[test]
    fn a_borrowed_event_writes_what_the_server_reads() {
        let payload = RawValue::from_string("[1,2]".into()).unwrap();
        let sent = EventIn::<&str, &RawValue> {
            id: "e_1",
            key: "k\"",
            subject: "a.b",
            created_at: Some("2026-01-02T03:04:05Z"),
            payload: Some(&payload),
            ..EventIn::default()
        };
        let json = serde_json::to_string(&sent).unwrap();
        assert_eq!(
            json,
            r#"{"id":"e_1","key":"k\"","subject":"a.b","created_at":"2026-01-02T03:04:05Z","payload":[1,2]}"#
        );
        let read: EventIn = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (read.id.as_str(), read.key.as_str(), read.subject.as_str()),
            ("e_1", "k\"", "a.b")
        );
        assert_eq!(read.given_created_at(), Some("2026-01-02T03:04:05Z"));
        assert_eq!(read.payload.unwrap().get(), "[1,2]");
    }

    #[test]
    fn a_delivered_event_needs_its_id_subject_and_time() {
        for missing in [
            r#"{"subject":"a.b","created_at":"t"}"#,
            r#"{"id":"e_1","created_at":"t"}"#,
            r#"{"id":"e_1","subject":"a.b"}"#,
        ] {
            assert!(
                serde_json::from_str::<EventOut>(missing).is_err(),
                "{missing}"
            );
        }
        let minimal: EventOut =
            serde_json::from_str(r#"{"id":"e_1","subject":"a.b","created_at":"t"}"#).unwrap();
        assert_eq!((minimal.index, minimal.payload.is_none()), (0, true));
    }
}
