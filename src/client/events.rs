//! The events a client sends and receives: [`NewEvent`] to publish, what the server
//! assigned to it ([`Published`], [`PublishedBatch`], [`Confirmation`]), and the
//! [`Event`]s a subscription delivers, which are acknowledged and answered through it.
//!
//! Their JSON is [`crate::wire`]'s ([`EventIn`], [`EventOut`]); these types add what an
//! application works with (builders, typed payloads, acks).

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::delivery::Delivery;
use super::error::ClientError;
use crate::wire::{EventIn, EventOut};

/// An event to publish. Empty strings mean "not set": the server assigns the id and the
/// creation time unless they are given (restore tools give them).
///
/// ```
/// use bus::client::NewEvent;
///
/// let event = NewEvent::new("orders.created")
///     .with_key("order-7")
///     .with_trace_id("req-81f2")
///     .with_payload(&serde_json::json!({"id": 7, "total": 12.5}))?;
/// assert_eq!(event.payload.as_deref().map(|p| p.get()), Some(r#"{"id":7,"total":12.5}"#));
/// # Ok::<(), bus::client::ClientError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    /// The event id; empty lets the server assign one.
    pub id: String,
    /// An id carried through unchanged, for tracing a request across services.
    pub trace_id: String,
    /// A deduplication key: the server refuses (409) another event with the same key on
    /// the same subject within its deduplication window.
    pub key: String,
    /// Where the event goes (`orders.created`); its first segment is the namespace.
    pub subject: String,
    /// Where answers to this event go (an inbox subject), for confirmations and replies.
    pub response_subject: String,
    /// RFC 3339 creation time; empty lets the server stamp it.
    pub created_at: String,
    /// Any JSON value.
    pub payload: Option<Box<RawValue>>,
}

impl NewEvent {
    /// The event as the wire writes it, borrowed from this one.
    fn wire(&self) -> EventIn<&str, &RawValue> {
        EventIn {
            id: &self.id,
            trace_id: &self.trace_id,
            key: &self.key,
            subject: &self.subject,
            response_subject: &self.response_subject,
            // Empty means "not set" here, and absent on the wire.
            created_at: (!self.created_at.is_empty()).then_some(self.created_at.as_str()),
            payload: self.payload.as_deref(),
        }
    }

    /// An event for `subject`, with nothing else set.
    ///
    /// ```
    /// let event = bus::client::NewEvent::new("app.signup");
    /// assert_eq!(event.subject, "app.signup");
    /// assert!(event.payload.is_none());
    /// ```
    pub fn new(subject: impl Into<String>) -> NewEvent {
        NewEvent {
            subject: subject.into(),
            ..NewEvent::default()
        }
    }

    /// Sets the payload to `payload` encoded as JSON.
    ///
    /// ```
    /// #[derive(serde::Serialize)]
    /// struct Signup<'a> { email: &'a str }
    ///
    /// let event = bus::client::NewEvent::new("app.signup")
    ///     .with_payload(&Signup { email: "ada@example.com" })?;
    /// assert_eq!(event.payload.unwrap().get(), r#"{"email":"ada@example.com"}"#);
    /// # Ok::<(), bus::client::ClientError>(())
    /// ```
    pub fn with_payload<T: Serialize + ?Sized>(
        mut self,
        payload: &T,
    ) -> Result<NewEvent, ClientError> {
        self.payload = Some(to_json(payload)?);
        Ok(self)
    }

    /// Sets the deduplication key.
    ///
    /// ```
    /// let event = bus::client::NewEvent::new("orders.paid").with_key("order-7");
    /// assert_eq!(event.key, "order-7");
    /// ```
    pub fn with_key(mut self, key: impl Into<String>) -> NewEvent {
        self.key = key.into();
        self
    }

    /// Sets the trace id.
    ///
    /// ```
    /// let event = bus::client::NewEvent::new("orders.paid").with_trace_id("req-81f2");
    /// assert_eq!(event.trace_id, "req-81f2");
    /// ```
    pub fn with_trace_id(mut self, trace_id: impl Into<String>) -> NewEvent {
        self.trace_id = trace_id.into();
        self
    }

    /// Sets the event id instead of letting the server assign one (the server refuses an
    /// id it already holds with 409).
    ///
    /// ```
    /// let event = bus::client::NewEvent::new("orders.paid").with_id("e_0000000000000000001");
    /// assert_eq!(event.id, "e_0000000000000000001");
    /// ```
    pub fn with_id(mut self, id: impl Into<String>) -> NewEvent {
        self.id = id.into();
        self
    }
}

/// Written as [`EventIn`] writes it: empty fields are left out.
impl Serialize for NewEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.wire().serialize(serializer)
    }
}

/// What the server assigned to a published event.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// let client = bus::client::Client::new(host)?;
/// let first = client.publish(&bus::client::NewEvent::new("app.a")).await?;
/// let second = client.publish(&bus::client::NewEvent::new("app.b")).await?;
/// assert_eq!(second.index, first.index + 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event's id.
    pub id: String,
    /// Its creation time (RFC 3339).
    pub created_at: String,
    /// Position in the namespace's log; -1 for inbox events, which are not stored.
    pub index: i64,
}

/// What the server said of a published batch.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// use bus::client::{Client, NewEvent};
///
/// let client = Client::new(host)?;
/// let batch = [NewEvent::new("app.a"), NewEvent::new("app.b"), NewEvent::new("app.c")];
/// let published = client.publish_batch(&batch).await?;
/// assert_eq!(published.count, 3);
/// assert_eq!(published.first_index(), Some(0));
/// assert_eq!(published.last.map(|last| last.index), Some(2));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedBatch {
    /// How many events were stored (all of them: batches are all-or-nothing).
    pub count: usize,
    /// What the server assigned to the batch's last event; `None` from a server that
    /// does not say (the reference server answers batches with a bare 202).
    pub last: Option<Published>,
}

impl PublishedBatch {
    /// The log position of the batch's first event (the batch is stored contiguously).
    ///
    /// ```
    /// use bus::client::{Published, PublishedBatch};
    ///
    /// let last = Published { id: "e_9".into(), created_at: String::new(), index: 9 };
    /// let batch = PublishedBatch { count: 4, last: Some(last) };
    /// assert_eq!(batch.first_index(), Some(6));
    /// ```
    pub fn first_index(&self) -> Option<i64> {
        let last = self.last.as_ref()?;
        (last.index >= 0).then(|| last.index + 1 - self.count as i64)
    }
}

/// An event as the server delivers it. Events of a manual-ack subscription are
/// acknowledged with [`Event::ack`] (or answered with [`Event::reply`]).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// use bus::client::{Client, NewEvent, Received, Start, SubscribeOptions};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// let client = Client::new(host)?;
/// let order = NewEvent::new("orders.created").with_payload(&serde_json::json!({"id": 7}))?;
/// client.publish(&order).await?;
///
/// let options = SubscribeOptions::new("orders.*").with_start(Start::Oldest).with_manual_ack();
/// let mut orders = client.subscribe(options).await?;
/// let Some(Ok(Received::Event(event))) = orders.next().await else { panic!() };
/// assert_eq!(event.payload_as::<Order>()?.id, 7);
/// event.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Event {
    /// The event's id.
    pub id: String,
    /// The trace id it was published with (may be empty).
    pub trace_id: String,
    /// The deduplication key it was published with (may be empty).
    pub key: String,
    /// Its subject.
    pub subject: String,
    /// Where its publisher waits for answers (empty if it does not).
    pub response_subject: String,
    /// Its creation time (RFC 3339).
    pub created_at: String,
    /// Its payload as JSON text.
    pub payload: Option<Box<RawValue>>,
    /// Its position in the namespace's log (-1 for inbox events).
    pub index: i64,
    /// The event's JSON exactly as the server sent it.
    pub json: String,
    /// The consumer the event was delivered to (acks name it).
    pub consumer_id: String,
    /// The subscription that delivered it, for acks.
    delivery: Option<Arc<Delivery>>,
}

/// Read as [`EventOut`] reads it (without [`Event::json`] and [`Event::consumer_id`], which
/// only a subscription knows).
impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Event, D::Error> {
        EventOut::deserialize(deserializer)
            .map(|wire| Event::from_wire(wire, String::new(), String::new(), None))
    }
}

impl Event {
    /// The event a subscription delivered: `wire` read from `json`, for `consumer_id`.
    pub(super) fn from_wire(
        wire: EventOut,
        json: String,
        consumer_id: String,
        delivery: Option<Arc<Delivery>>,
    ) -> Event {
        Event {
            id: wire.id,
            trace_id: wire.trace_id,
            key: wire.key,
            subject: wire.subject,
            response_subject: wire.response_subject,
            created_at: wire.created_at,
            // This client has always given a `null` payload as `None` (`payload_as`
            // decodes both as `null`); the wire type keeps them apart for the server.
            payload: wire.payload.filter(|payload| payload.get() != "null"),
            index: wire.index,
            json,
            consumer_id,
            delivery,
        }
    }

    /// Decodes the payload (a missing payload decodes as JSON `null`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use bus::client::{Client, NewEvent, Received, Start, SubscribeOptions};
    ///
    /// let client = Client::new(host)?;
    /// client.publish(&NewEvent::new("app.count").with_payload(&41)?).await?;
    /// let options = SubscribeOptions::new("app.count").with_start(Start::Oldest);
    /// let mut counts = client.subscribe(options).await?;
    /// let Some(Ok(Received::Event(event))) = counts.next().await else { panic!() };
    /// assert_eq!(event.payload_as::<u32>()? + 1, 42);
    /// # Ok(()) }
    /// ```
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        let text = self.payload.as_deref().map_or("null", RawValue::get);
        serde_json::from_str(text).map_err(|e| {
            ClientError::Protocol(format!(
                "the payload of event {} does not decode: {e}",
                self.id
            ))
        })
    }

    /// Acknowledges this event (manual-ack subscriptions): the server delivers the next
    /// one and stops redelivering this one.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use bus::client::{Client, NewEvent, Received, Start, SubscribeOptions};
    ///
    /// let client = Client::new(host)?;
    /// for n in 0..2 {
    ///     client.publish(&NewEvent::new("app.jobs").with_payload(&n)?).await?;
    /// }
    /// let options = SubscribeOptions::new("app.jobs").with_start(Start::Oldest).with_manual_ack();
    /// let mut jobs = client.subscribe(options).await?;
    /// for n in 0..2 {
    ///     // Stop-and-wait: job 1 comes once job 0 is acknowledged.
    ///     let Some(Ok(Received::Event(job))) = jobs.next().await else { panic!() };
    ///     assert_eq!(job.payload_as::<u32>()?, n);
    ///     job.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ack(&self) -> Result<(), ClientError> {
        self.delivery()?
            .ack(&self.consumer_id, &self.id, None)
            .await
    }

    /// Acknowledges this event and replies to its publisher with `payload` in the same
    /// call; the publisher waits with [`Client::request`](super::Client::request).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use std::time::Duration;
    /// use bus::client::{Client, NewEvent, Received, SubscribeOptions};
    ///
    /// let client = Client::new(host)?;
    /// let mut questions = client
    ///     .subscribe(SubscribeOptions::new("app.add").with_manual_ack())
    ///     .await?;
    /// let worker = tokio::spawn(async move {
    ///     while let Some(Ok(received)) = questions.next().await {
    ///         if let Received::Event(question) = received {
    ///             let [a, b] = question.payload_as::<[i64; 2]>()?;
    ///             question.reply(&(a + b)).await?;
    ///         }
    ///     }
    ///     Ok::<(), bus::client::ClientError>(())
    /// });
    ///
    /// let question = NewEvent::new("app.add").with_payload(&[2, 3])?;
    /// let answer = client.request(&question, Duration::from_secs(5)).await?;
    /// assert_eq!(&answer[..], b"5");
    /// # worker.abort();
    /// # Ok(()) }
    /// ```
    pub async fn reply<T: Serialize + ?Sized>(&self, payload: &T) -> Result<(), ClientError> {
        let payload = to_json(payload)?;
        self.delivery()?
            .ack(&self.consumer_id, &self.id, Some(&payload))
            .await
    }

    fn delivery(&self) -> Result<&Delivery, ClientError> {
        self.delivery.as_deref().ok_or_else(|| {
            ClientError::Protocol(format!(
                "event {} was not delivered by a subscription of this client; ack it with Client::ack",
                self.id
            ))
        })
    }
}

/// How a confirmed publish ended.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// use std::time::Duration;
/// use bus::client::{Client, NewEvent};
///
/// let client = Client::new(host)?;
/// // Nobody consumes app.audit: the wait ends at its timeout, unreached.
/// let event = NewEvent::new("app.audit");
/// let confirmation = client.publish_confirmed(&event, 1, 0, Duration::from_millis(100)).await?;
/// assert!(!confirmation.reached);
/// assert_eq!(confirmation.consumers, 0);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmation {
    /// Whether enough consumers (and zones) acknowledged within the timeout.
    pub reached: bool,
    /// Distinct consumers that acknowledged.
    pub consumers: usize,
    /// Distinct zones they were in.
    pub zones: usize,
}

/// `value` as JSON text, for a payload.
pub(super) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Box<RawValue>, ClientError> {
    serde_json::value::to_raw_value(value)
        .map_err(|e| ClientError::Protocol(format!("cannot encode the payload as JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_event_is_written_without_what_is_not_set() {
        let bare = NewEvent::new("a.b");
        assert_eq!(
            serde_json::to_string(&bare).unwrap(),
            r#"{"subject":"a.b"}"#
        );
        let full = NewEvent {
            created_at: "2026-01-02T03:04:05Z".into(),
            response_subject: "_bus_.x".into(),
            ..NewEvent::new("a.b")
                .with_id("e_1")
                .with_key("k")
                .with_trace_id("t")
                .with_payload(&[1, 2])
                .unwrap()
        };
        assert_eq!(
            serde_json::to_string(&full).unwrap(),
            r#"{"id":"e_1","trace_id":"t","key":"k","subject":"a.b","response_subject":"_bus_.x","created_at":"2026-01-02T03:04:05Z","payload":[1,2]}"#
        );
    }

    #[test]
    fn a_delivered_null_payload_is_no_payload() {
        let json = r#"{"id":"e_1","subject":"a.b","created_at":"t","payload":null,"index":4}"#;
        let event: Event = serde_json::from_str(json).unwrap();
        assert!(event.payload.is_none());
        assert_eq!(event.payload_as::<Option<u8>>().unwrap(), None);
        assert_eq!((event.id.as_str(), event.index), ("e_1", 4));
        let event: Event = serde_json::from_str(&json.replace("null", "[7]")).unwrap();
        assert_eq!(event.payload_as::<[u8; 1]>().unwrap(), [7]);
    }
}
