//! A typed async client for a `bus` server (or an ella.to/bus server): publish,
//! subscribe, acknowledge, confirmations and request/reply.
//!
//! What it promises:
//! - Every server refusal becomes a [`ClientError::Server`] carrying the status and the
//!   server's own plain-text message; a server that does not answer within the client's
//!   timeout ([`Client::with_timeout`]) is a [`ClientError::Timeout`], never a hang.
//! - A [`Subscription`] is a [`Stream`] of events. It reconnects by itself when the
//!   connection drops (a server restart), resuming with `Last-Event-ID` so that nothing is
//!   skipped and nothing repeated, and reports each drop and reconnection to its reader.
//!   With manual acks it resumes after the last event up to which everything was
//!   acknowledged, so an unacknowledged event is delivered again.
//! - Confirmations and request/reply are waited for by the server (`confirm=N`,
//!   `reply=1`) or, for servers without that, through an inbox subject subscribed to
//!   *before* publishing ([`Client::publish_and_collect`]), so no answer can be missed.
//!
//! Build it without the server with `default-features = false, features = ["client"]`;
//! feature `tls` adds `https://` servers (see [`install_tls_provider`] for what that
//! means for a program's other reqwest clients).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let server = bus::doc_support::server().await?; let host = server.host();
//! use bus::client::{Client, NewEvent, Received, Start, SubscribeOptions};
//! use futures_util::StreamExt;
//!
//! let client = Client::new(host)?; // e.g. "http://localhost:2021"
//! let mut orders = client
//!     .subscribe(SubscribeOptions::new("orders.>").with_start(Start::Oldest))
//!     .await?;
//! let event = NewEvent::new("orders.created").with_payload(&serde_json::json!({"id": 7}))?;
//! client.publish(&event).await?;
//!
//! while let Some(received) = orders.next().await {
//!     if let Received::Event(event) = received? {
//!         assert_eq!(event.subject, "orders.created");
//!         break;
//!     }
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub(crate) mod sse;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::HeaderValue;
use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use self::sse::{SseMessage, SseParser, TooLarge};
use crate::duration::format_go_duration;

/// The address clients use when none is given.
pub const DEFAULT_HOST: &str = "http://localhost:2021";

/// How long a request may wait for the server unless [`Client::with_timeout`] says
/// otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest event a subscription accepts unless [`Client::with_max_event_size`] says
/// otherwise: 16 MiB, twice the server's default `--max-body` (8 MiB), which bounds an
/// event's JSON but for the few bytes the server adds (its id, time and index).
pub const DEFAULT_MAX_EVENT_SIZE: usize = 16 << 20;

const HEADER_EVENT_ID: &str = "x-bus-event-id";
const HEADER_EVENT_CREATED_AT: &str = "x-bus-event-created-at";
const HEADER_EVENT_INDEX: &str = "x-bus-event-index";
const HEADER_CONSUMER_ID: &str = "x-bus-consumer-id";

/// Why a client call failed.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// use bus::client::{Client, ClientError, NewEvent};
///
/// let client = Client::new(host)?;
/// // `billing` is not a namespace this server declares.
/// match client.publish(&NewEvent::new("billing.paid")).await {
///     Err(ClientError::Server { status, message }) => {
///         assert_eq!(status, 400);
///         assert!(message.contains("billing"), "{message}");
///     }
///     other => panic!("expected a refusal, got {other:?}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address given to [`Client::new`] is not `http://host[:port]` or
    /// `https://host[:port]`.
    #[error("invalid server address {0:?}: use http://host:port or https://host:port")]
    InvalidHost(String),
    /// The certificate given to [`Client::with_root_certificate`] is not usable.
    #[error("cannot use the CA certificate: {0}")]
    Certificate(String),
    /// The server could not be reached, or the connection broke; `reason` is the
    /// innermost cause (connection refused, reset, …).
    #[error("cannot reach the bus server at {host}: {reason}")]
    Unreachable {
        /// The server's address.
        host: String,
        /// What went wrong.
        reason: String,
    },
    /// The server refused the request; `message` is its explanation.
    #[error("the server refused the request ({status}): {message}")]
    Server {
        /// The HTTP status.
        status: u16,
        /// The server's plain-text explanation.
        message: String,
    },
    /// The server answered something this client does not understand, or a value could
    /// not be encoded or decoded.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The server ended a subscription with an error event.
    #[error("the server ended the subscription: {0}")]
    Subscription(String),
    /// A subscription's stream brought an event (or a line) larger than the client's
    /// limit ([`Client::with_max_event_size`]); the subscription ends, since reconnecting
    /// would bring the same event again.
    #[error(
        "an event on the stream is larger than the client's limit of {limit} bytes \
         (Client::with_max_event_size); the subscription ends"
    )]
    EventTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The server did not answer in time, or the answers waited for did not all come.
    #[error("{0}")]
    Timeout(String),
}

impl ClientError {
    fn unreachable(host: &Url, error: &reqwest::Error) -> ClientError {
        // reqwest's outer message is generic; the cause says what happened.
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason = cause.to_string();
            source = cause.source();
        }
        ClientError::Unreachable {
            host: host.as_str().trim_end_matches('/').to_owned(),
            reason,
        }
    }
}

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
#[derive(Debug, Clone, Default, Serialize)]
pub struct NewEvent {
    /// The event id; empty lets the server assign one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// An id carried through unchanged, for tracing a request across services.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
    /// A deduplication key: the server refuses (409) another event with the same key on
    /// the same subject within its deduplication window.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// Where the event goes (`orders.created`); its first segment is the namespace.
    pub subject: String,
    /// Where answers to this event go (an inbox subject), for confirmations and replies.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub response_subject: String,
    /// RFC 3339 creation time; empty lets the server stamp it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub created_at: String,
    /// Any JSON value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
}

impl NewEvent {
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
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// The event's id.
    pub id: String,
    /// The trace id it was published with (may be empty).
    #[serde(default)]
    pub trace_id: String,
    /// The deduplication key it was published with (may be empty).
    #[serde(default)]
    pub key: String,
    /// Its subject.
    pub subject: String,
    /// Where its publisher waits for answers (empty if it does not).
    #[serde(default)]
    pub response_subject: String,
    /// Its creation time (RFC 3339).
    pub created_at: String,
    /// Its payload as JSON text.
    #[serde(default)]
    pub payload: Option<Box<RawValue>>,
    /// Its position in the namespace's log (-1 for inbox events).
    #[serde(default)]
    pub index: i64,
    /// The event's JSON exactly as the server sent it.
    #[serde(skip)]
    pub json: String,
    /// The consumer the event was delivered to (acks name it).
    #[serde(skip)]
    pub consumer_id: String,
    /// The subscription that delivered it, for acks.
    #[serde(skip)]
    delivery: Option<Arc<Delivery>>,
}

impl Event {
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
        self.delivery()?.ack(self, None).await
    }

    /// Acknowledges this event and replies to its publisher with `payload` in the same
    /// call; the publisher waits with [`Client::request`].
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
        self.delivery()?.ack(self, Some(&payload)).await
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

/// Where a subscription starts.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use bus::client::{Start, SubscribeOptions};
///
/// // Everything stored from an hour ago on.
/// let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
/// let options = SubscribeOptions::new("orders.>").with_start(Start::Time(an_hour_ago));
/// assert_eq!(options.start, Start::Time(an_hour_ago));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The oldest event kept.
    Oldest,
    /// Only events published after the subscription opens.
    Newest,
    /// Strictly after the event with this id.
    After(String),
    /// At this log position (an event's `index`).
    Position(u64),
    /// At the first event created at or after this time.
    Time(SystemTime),
}

/// Whether the server waits for acknowledgements.
///
/// ```
/// use std::time::Duration;
/// use bus::client::{AckMode, SubscribeOptions};
///
/// let options = SubscribeOptions::new("orders.>").with_redelivery(Duration::from_secs(5), 3);
/// assert_eq!(
///     options.ack,
///     AckMode::Manual { redelivery: Some(Duration::from_secs(5)), redelivery_count: Some(3) }
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckMode {
    /// Events stream without acknowledgements.
    None,
    /// The server keeps `max_inflight` events (default 1: stop-and-wait) out until they
    /// are acknowledged, and delivers one again when its ack does not come in time.
    /// `None` leaves the server's defaults.
    Manual {
        /// How long to wait for an ack before delivering again.
        redelivery: Option<Duration>,
        /// How many deliveries in all before giving up on an event (negative: forever).
        redelivery_count: Option<i64>,
    },
}

/// What to subscribe to and how. Build it with [`SubscribeOptions::new`] and the `with_`
/// methods (the fields are public too).
///
/// ```
/// use std::time::Duration;
/// use bus::client::{Start, SubscribeOptions};
///
/// let options = SubscribeOptions::new("orders.>")
///     .with_start(Start::Oldest)
///     .with_consumer("billing")
///     .with_max_inflight(32)
///     .with_reconnect_for(Duration::from_secs(300));
/// assert_eq!(options.consumer.as_deref(), Some("billing"));
/// ```
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// A subject or pattern (`orders.*`, `orders.>`).
    pub subject: String,
    /// Where to start (default: [`Start::Newest`]).
    pub start: Start,
    /// Whether events need acknowledgements (default: [`AckMode::None`]).
    pub ack: AckMode,
    /// End once the events stored when the subscription opened have been delivered.
    pub until_now: bool,
    /// How long to keep trying to reconnect after the connection drops; zero ends the
    /// subscription with an error at the first drop (default: one minute).
    pub reconnect_for: Duration,
    /// With manual acks: attach to (or create) this durable consumer, whose progress the
    /// server keeps across reconnects and restarts, and which connections with the same
    /// name share (a queue group).
    pub consumer: Option<String>,
    /// With manual acks: how many unacknowledged events the server may have out to this
    /// connection at once (the server's default is 1).
    pub max_inflight: Option<usize>,
    /// With manual acks: the zone this consumer is in, for publishers that wait for
    /// acknowledgements from several zones.
    pub zone: Option<String>,
}

impl SubscribeOptions {
    /// New events of `subject` (a subject or pattern), without acks.
    ///
    /// ```
    /// use bus::client::{AckMode, Start, SubscribeOptions};
    ///
    /// let options = SubscribeOptions::new("orders.*");
    /// assert_eq!((options.start, options.ack), (Start::Newest, AckMode::None));
    /// ```
    pub fn new(subject: impl Into<String>) -> SubscribeOptions {
        SubscribeOptions {
            subject: subject.into(),
            start: Start::Newest,
            ack: AckMode::None,
            until_now: false,
            reconnect_for: Duration::from_secs(60),
            consumer: None,
            max_inflight: None,
            zone: None,
        }
    }

    /// Starts at `start`.
    ///
    /// ```
    /// use bus::client::{Start, SubscribeOptions};
    ///
    /// let options = SubscribeOptions::new("orders.*").with_start(Start::Position(1000));
    /// assert_eq!(options.start, Start::Position(1000));
    /// ```
    pub fn with_start(mut self, start: Start) -> SubscribeOptions {
        self.start = start;
        self
    }

    /// Events need acknowledgements (the server's redelivery defaults).
    ///
    /// ```
    /// use bus::client::{AckMode, SubscribeOptions};
    ///
    /// let options = SubscribeOptions::new("orders.*").with_manual_ack();
    /// assert!(matches!(options.ack, AckMode::Manual { redelivery: None, .. }));
    /// ```
    pub fn with_manual_ack(mut self) -> SubscribeOptions {
        if self.ack == AckMode::None {
            self.ack = AckMode::Manual {
                redelivery: None,
                redelivery_count: None,
            };
        }
        self
    }

    /// Events need acknowledgements; one not acknowledged within `every` is delivered
    /// again, up to `count` deliveries in all (negative: forever).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus::client::SubscribeOptions;
    ///
    /// let options = SubscribeOptions::new("orders.*").with_redelivery(Duration::from_secs(2), -1);
    /// assert!(matches!(options.ack, bus::client::AckMode::Manual { redelivery_count: Some(-1), .. }));
    /// ```
    pub fn with_redelivery(mut self, every: Duration, count: i64) -> SubscribeOptions {
        self.ack = AckMode::Manual {
            redelivery: Some(every),
            redelivery_count: Some(count),
        };
        self
    }

    /// Attaches to durable consumer `name` (implies manual acks).
    ///
    /// ```
    /// let options = bus::client::SubscribeOptions::new("orders.*").with_consumer("billing");
    /// assert_eq!(options.consumer.as_deref(), Some("billing"));
    /// ```
    pub fn with_consumer(self, name: impl Into<String>) -> SubscribeOptions {
        let mut options = self.with_manual_ack();
        options.consumer = Some(name.into());
        options
    }

    /// Lets the server have up to `window` unacknowledged events out at once (implies
    /// manual acks).
    ///
    /// ```
    /// let options = bus::client::SubscribeOptions::new("orders.*").with_max_inflight(100);
    /// assert_eq!(options.max_inflight, Some(100));
    /// ```
    pub fn with_max_inflight(self, window: usize) -> SubscribeOptions {
        let mut options = self.with_manual_ack();
        options.max_inflight = Some(window);
        options
    }

    /// Places this consumer in `zone` (implies manual acks).
    ///
    /// ```
    /// let options = bus::client::SubscribeOptions::new("orders.*").with_zone("eu-west");
    /// assert_eq!(options.zone.as_deref(), Some("eu-west"));
    /// ```
    pub fn with_zone(self, zone: impl Into<String>) -> SubscribeOptions {
        let mut options = self.with_manual_ack();
        options.zone = Some(zone.into());
        options
    }

    /// Ends the subscription once the events stored when it opened are delivered.
    ///
    /// ```
    /// let options = bus::client::SubscribeOptions::new("orders.*").with_until_now();
    /// assert!(options.until_now);
    /// ```
    pub fn with_until_now(mut self) -> SubscribeOptions {
        self.until_now = true;
        self
    }

    /// Keeps reconnecting for `limit` after a drop (zero: never reconnect).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let options = bus::client::SubscribeOptions::new("orders.*").with_reconnect_for(Duration::ZERO);
    /// assert!(options.reconnect_for.is_zero());
    /// ```
    pub fn with_reconnect_for(mut self, limit: Duration) -> SubscribeOptions {
        self.reconnect_for = limit;
        self
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

/// A durable consumer, as `GET /consumers/{namespace}` lists it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// use bus::client::{Client, SubscribeOptions};
///
/// let client = Client::new(host)?;
/// let _billing = client
///     .subscribe(SubscribeOptions::new("orders.>").with_consumer("billing"))
///     .await?;
/// let consumers = client.consumers("orders").await?;
/// assert_eq!(consumers[0].name, "billing");
/// assert_eq!(consumers[0].members, 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ConsumerInfo {
    /// Its name.
    pub name: String,
    /// The subject pattern it consumes.
    pub pattern: String,
    /// The first position it is not done with (done: acknowledged, given up, or not
    /// matching its pattern).
    pub acked_floor: u64,
    /// Events it has read and not had acknowledged.
    pub pending: u64,
    /// Events in the log from its floor on, matching its pattern or not.
    pub lag: u64,
    /// Connections attached now.
    pub members: u64,
    /// Where events it gives up on go.
    pub dead_letter_subject: String,
}

/// A connection to a bus server. Cheap to clone; clones share connections.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// use std::time::Duration;
/// use bus::client::Client;
///
/// let client = Client::new(host)?.with_timeout(Duration::from_secs(5));
/// client.health().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    base: Url,
    http: reqwest::Client,
    /// What `http` was built with, to build it again with one more setting.
    settings: HttpSettings,
    /// How long a request may wait for the server's answer.
    timeout: Duration,
    /// The largest event (SSE message) a subscription buffers.
    max_event_size: usize,
}

#[derive(Debug, Clone, Default)]
struct HttpSettings {
    /// `Authorization` on every request.
    token: Option<HeaderValue>,
    /// Certificate authorities trusted besides the system's.
    #[cfg(feature = "tls")]
    roots: Vec<reqwest::Certificate>,
}

impl Client {
    /// A client for the server at `host`: `http://host:port`, `https://host:port` for a
    /// server with TLS (`--tls-cert`; its certificate is checked against the system's
    /// authorities and [`Client::with_root_certificate`]), or `host:port`, taken as http.
    /// Nothing is sent until the first call.
    ///
    /// ```
    /// use bus::client::{Client, ClientError};
    ///
    /// let client = Client::new("localhost:2021")?;
    /// assert_eq!(client.host(), "http://localhost:2021");
    /// assert_eq!(Client::new("https://bus.example.com")?.host(), "https://bus.example.com");
    /// assert!(matches!(Client::new("ftp://x"), Err(ClientError::InvalidHost(_))));
    /// # Ok::<(), ClientError>(())
    /// ```
    pub fn new(host: &str) -> Result<Client, ClientError> {
        let host = host.trim();
        let with_scheme = if host.contains("://") {
            host.to_owned()
        } else {
            format!("http://{host}")
        };
        let base = Url::parse(&with_scheme)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
            .ok_or_else(|| ClientError::InvalidHost(host.to_owned()))?;
        if base.scheme() == "https" && !cfg!(feature = "tls") {
            return Err(ClientError::InvalidHost(format!(
                "{host} (https needs the `tls` feature of the bus crate)"
            )));
        }
        let settings = HttpSettings::default();
        Ok(Client {
            base,
            http: settings.client()?,
            settings,
            timeout: DEFAULT_TIMEOUT,
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
        })
    }

    /// The same client, presenting `token` (`Authorization: Bearer`) on every request to
    /// a server that authenticates them (`--auth-file`).
    ///
    /// ```
    /// let client = bus::client::Client::new("localhost:2021")?.with_token("s3cr3t")?;
    /// # Ok::<(), bus::client::ClientError>(())
    /// ```
    pub fn with_token(mut self, token: &str) -> Result<Client, ClientError> {
        let mut value =
            HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
                ClientError::Protocol("the token holds characters a header cannot carry".into())
            })?;
        value.set_sensitive(true);
        self.settings.token = Some(value);
        self.http = self.settings.client()?;
        Ok(self)
    }

    /// The same client, also trusting the certificate authorities in `pem` (one or more
    /// PEM certificates) for an `https://` server: a private CA, or a self-signed server
    /// certificate.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::tls_server().await?; let host = server.host();
    /// # let ca_pem_path = server.ca_pem_path();
    /// use bus::client::Client;
    ///
    /// let ca = std::fs::read(ca_pem_path)?; // the CA that signed the server's certificate
    /// let client = Client::new(host)?.with_root_certificate(&ca)?; // host: "https://localhost:…"
    /// client.health().await?;
    ///
    /// // Without it, the server's certificate is refused.
    /// assert!(Client::new(host)?.health().await.is_err());
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    pub fn with_root_certificate(mut self, pem: &[u8]) -> Result<Client, ClientError> {
        let roots = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| ClientError::Certificate(e.to_string()))?;
        if roots.is_empty() {
            return Err(ClientError::Certificate(
                "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
            ));
        }
        self.settings.roots.extend(roots);
        self.http = self.settings.client()?;
        Ok(self)
    }

    /// The same client, giving up on a request when the server has not answered within
    /// `timeout` (default [`DEFAULT_TIMEOUT`]), with [`ClientError::Timeout`]. It bounds
    /// connecting and the wait for an answer; an open subscription's stream is not
    /// bounded, and calls that wait on purpose ([`Client::request`],
    /// [`Client::publish_confirmed`]) get it on top of their own timeout.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use bus::client::{Client, ClientError};
    ///
    /// // A listener that accepts connections and never answers.
    /// let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let client = Client::new(&silent.local_addr()?.to_string())?
    ///     .with_timeout(Duration::from_millis(200));
    /// assert!(matches!(client.health().await, Err(ClientError::Timeout(_))));
    /// # Ok(()) }
    /// ```
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The same client, accepting events of up to `limit` bytes on its subscriptions
    /// (default [`DEFAULT_MAX_EVENT_SIZE`], 16 MiB). A subscription buffers an event until
    /// it is complete, and never more than this: a larger one (or a stream line that never
    /// ends) fails the subscription with [`ClientError::EventTooLarge`]. Raise it for a
    /// server whose `--max-body` is above 16 MiB.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use futures_util::StreamExt;
    /// use bus::client::{Client, ClientError, NewEvent, Start, SubscribeOptions};
    ///
    /// let client = Client::new(host)?.with_max_event_size(1024);
    /// let big = NewEvent::new("app.big").with_payload(&"x".repeat(2000))?;
    /// client.publish(&big).await?;
    /// let mut events = client
    ///     .subscribe(SubscribeOptions::new("app.big").with_start(Start::Oldest))
    ///     .await?;
    /// assert!(matches!(
    ///     events.next().await,
    ///     Some(Err(ClientError::EventTooLarge { limit: 1024 }))
    /// ));
    /// assert!(events.next().await.is_none(), "the subscription has ended");
    /// # Ok(()) }
    /// ```
    pub fn with_max_event_size(mut self, limit: usize) -> Client {
        self.max_event_size = limit;
        self
    }

    /// The server's address.
    ///
    /// ```
    /// let client = bus::client::Client::new("http://10.0.0.7:2021/")?;
    /// assert_eq!(client.host(), "http://10.0.0.7:2021");
    /// # Ok::<(), bus::client::ClientError>(())
    /// ```
    pub fn host(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// Checks that the server is up (`GET /health`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// bus::client::Client::new(host)?.health().await?;
    /// # Ok(()) }
    /// ```
    pub async fn health(&self) -> Result<(), ClientError> {
        let url = self
            .base
            .join("health")
            .map_err(|_| ClientError::InvalidHost(self.host().to_owned()))?;
        let response = self.send(self.http.get(url), self.timeout).await?;
        expect_status(response, StatusCode::OK).await.map(drop)
    }

    /// Publishes one event; returns once it is stored (durably, with the server's
    /// default `--fsync`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use bus::client::{Client, NewEvent};
    ///
    /// let client = Client::new(host)?;
    /// let event = NewEvent::new("orders.created").with_payload(&serde_json::json!({"id": 7}))?;
    /// let published = client.publish(&event).await?;
    /// assert_eq!(published.index, 0);
    /// # Ok(()) }
    /// ```
    pub async fn publish(&self, event: &NewEvent) -> Result<Published, ClientError> {
        let response = self.post(to_body(event)?).await?;
        published(&response)
    }

    /// Publishes events as one batch: all stored, contiguously and in order, or none.
    /// They must all be in one namespace and none may have a response subject.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use bus::client::{Client, NewEvent};
    ///
    /// let client = Client::new(host)?;
    /// let lines: Vec<NewEvent> = (0..100)
    ///     .map(|n| NewEvent::new("app.lines").with_payload(&n))
    ///     .collect::<Result<_, _>>()?;
    /// let published = client.publish_batch(&lines).await?;
    /// assert_eq!(published.count, 100);
    /// # Ok(()) }
    /// ```
    pub async fn publish_batch(&self, events: &[NewEvent]) -> Result<PublishedBatch, ClientError> {
        let response = self.post(to_body(events)?).await?;
        Ok(PublishedBatch {
            count: events.len(),
            last: published(&response).ok(),
        })
    }

    /// Publishes a body that is already JSON: one event (an object), or a batch (an array
    /// of events, stored atomically).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// let client = bus::client::Client::new(host)?;
    /// let body = r#"[{"subject":"app.a"},{"subject":"app.b","payload":[1,2]}]"#;
    /// client.publish_json(body.into()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_json(&self, body: Bytes) -> Result<(), ClientError> {
        self.post(body).await.map(drop)
    }

    /// Publishes one event and waits until `consumers` distinct consumers, in `zones`
    /// distinct zones, have acknowledged it, or `timeout` passes (the server waits:
    /// `confirm=N`). Returns whether that was reached, and how many did. The event is
    /// stored either way.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use std::time::Duration;
    /// use bus::client::{Client, NewEvent, Received, SubscribeOptions};
    ///
    /// let client = Client::new(host)?;
    /// let mut billing = client
    ///     .subscribe(SubscribeOptions::new("orders.>").with_manual_ack())
    ///     .await?;
    /// tokio::spawn(async move {
    ///     while let Some(Ok(received)) = billing.next().await {
    ///         if let Received::Event(order) = received {
    ///             let _ = order.ack().await;
    ///         }
    ///     }
    /// });
    ///
    /// let order = NewEvent::new("orders.created");
    /// let confirmation = client.publish_confirmed(&order, 1, 0, Duration::from_secs(5)).await?;
    /// assert!(confirmation.reached);
    /// assert_eq!(confirmation.consumers, 1);
    /// # Ok(()) }
    /// ```
    pub async fn publish_confirmed(
        &self,
        event: &NewEvent,
        consumers: usize,
        zones: usize,
        timeout: Duration,
    ) -> Result<Confirmation, ClientError> {
        let wait = [
            ("confirm", consumers.to_string()),
            ("confirm_zones", zones.to_string()),
        ];
        let response = self.publish_waiting(event, &wait, timeout).await?;
        let count = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let confirmation = Confirmation {
            reached: response.status() == StatusCode::ACCEPTED,
            consumers: count("x-bus-confirmed"),
            zones: count("x-bus-confirmed-zones"),
        };
        if confirmation.reached || response.status() == StatusCode::GATEWAY_TIMEOUT {
            return Ok(confirmation);
        }
        expect_status(response, StatusCode::ACCEPTED)
            .await
            .map(|_| confirmation)
    }

    /// Request/reply in one call: publishes `event` (the server gives it a fresh inbox as
    /// its response subject) and returns the first reply's payload (JSON), or
    /// [`ClientError::Timeout`] after `timeout` (the server's `POST /?reply=1`). Workers
    /// answer with [`Event::reply`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use std::time::Duration;
    /// use bus::client::{Client, ClientError, NewEvent};
    ///
    /// let client = Client::new(host)?;
    /// // Nobody answers app.quote.
    /// let asked = client.request(&NewEvent::new("app.quote"), Duration::from_millis(100)).await;
    /// assert!(matches!(asked, Err(ClientError::Timeout(_))));
    /// # Ok(()) }
    /// ```
    pub async fn request(&self, event: &NewEvent, timeout: Duration) -> Result<Bytes, ClientError> {
        let response = self
            .publish_waiting(event, &[("reply", "1".into())], timeout)
            .await?;
        if response.status() == StatusCode::GATEWAY_TIMEOUT {
            return Err(ClientError::Timeout(format!(
                "no reply within {}",
                format_go_duration(timeout)
            )));
        }
        let response = expect_status(response, StatusCode::OK).await?;
        response
            .bytes()
            .await
            .map_err(|e| ClientError::unreachable(&self.base, &e))
    }

    /// Publishes `event` with a fresh inbox as its response subject and collects `count`
    /// answers (confirmations or replies) from it, or fails once `timeout` has passed.
    /// This is how the Go SDK confirms and requests; it works with servers that cannot
    /// wait themselves (the reference server). Consumers answer with
    /// [`Client::respond`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use std::time::Duration;
    /// use bus::client::{Client, NewEvent, Received, SubscribeOptions};
    ///
    /// let client = Client::new(host)?;
    /// let mut shipping = client.subscribe(SubscribeOptions::new("orders.>")).await?;
    /// let answering = client.clone();
    /// tokio::spawn(async move {
    ///     while let Some(Ok(received)) = shipping.next().await {
    ///         if let Received::Event(order) = received {
    ///             let _ = answering.respond(&order, None).await; // a bare confirmation
    ///         }
    ///     }
    /// });
    ///
    /// let (published, answers) = client
    ///     .publish_and_collect(NewEvent::new("orders.created"), 1, Duration::from_secs(5))
    ///     .await?;
    /// assert_eq!(answers.len(), 1);
    /// assert_eq!(published.index, 0);
    /// # Ok(()) }
    /// ```
    pub async fn publish_and_collect(
        &self,
        mut event: NewEvent,
        count: usize,
        timeout: Duration,
    ) -> Result<(Published, Vec<Event>), ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let inbox = format!("_bus_.{}", random_token());
        let options = SubscribeOptions::new(inbox.clone()).with_reconnect_for(Duration::ZERO);
        let mut answers = tokio::time::timeout_at(deadline, self.subscribe(options))
            .await
            .map_err(|_| timed_out(timeout, 0, count))??;
        event.response_subject = inbox;
        let published = self.publish(&event).await?;
        let mut received = Vec::with_capacity(count);
        while received.len() < count {
            match tokio::time::timeout_at(deadline, answers.next()).await {
                Err(_) => return Err(timed_out(timeout, received.len(), count)),
                Ok(Some(Ok(Received::Event(answer)))) => received.push(answer),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => {
                    return Err(ClientError::Protocol(
                        "the server closed the inbox subscription".into(),
                    ))
                }
            }
        }
        Ok((published, received))
    }

    /// Acknowledges event `event_id` delivered to consumer `consumer_id` (what
    /// [`Event::ack`] does, for ids that came another way).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use bus::client::{Client, NewEvent, Received, SubscribeOptions};
    ///
    /// let client = Client::new(host)?;
    /// let mut jobs = client.subscribe(SubscribeOptions::new("app.jobs").with_manual_ack()).await?;
    /// client.publish(&NewEvent::new("app.jobs")).await?;
    /// let Some(Ok(Received::Event(job))) = jobs.next().await else { panic!() };
    /// client.ack(&job.consumer_id, &job.id).await?;
    /// # Ok(()) }
    /// ```
    pub async fn ack(&self, consumer_id: &str, event_id: &str) -> Result<(), ClientError> {
        self.put_ack(consumer_id, event_id, None).await
    }

    /// Answers an event that carries a `response_subject`, as the Go SDK's `Ack` does: a
    /// confirmation without payload, or a reply with one. Does nothing for other events.
    /// (With this server, [`Event::reply`] acknowledges and replies in one call.)
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use std::time::Duration;
    /// use bus::client::{Client, NewEvent, Received, SubscribeOptions};
    ///
    /// let client = Client::new(host)?;
    /// let mut quotes = client.subscribe(SubscribeOptions::new("app.quote")).await?;
    /// let answering = client.clone();
    /// tokio::spawn(async move {
    ///     while let Some(Ok(received)) = quotes.next().await {
    ///         if let Received::Event(ask) = received {
    ///             let price = serde_json::value::to_raw_value(&12.5).ok();
    ///             let _ = answering.respond(&ask, price).await;
    ///         }
    ///     }
    /// });
    /// let (_, replies) = client
    ///     .publish_and_collect(NewEvent::new("app.quote"), 1, Duration::from_secs(5))
    ///     .await?;
    /// assert_eq!(replies[0].payload_as::<f64>()?, 12.5);
    /// # Ok(()) }
    /// ```
    pub async fn respond(
        &self,
        event: &Event,
        payload: Option<Box<RawValue>>,
    ) -> Result<(), ClientError> {
        if event.response_subject.is_empty() {
            return Ok(());
        }
        self.publish(&NewEvent {
            subject: event.response_subject.clone(),
            payload,
            ..NewEvent::default()
        })
        .await
        .map(drop)
    }

    /// Opens a subscription; returns once the server has accepted it, so that every
    /// event published after this returns is delivered to it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use bus::client::{Client, NewEvent, Received, Start, SubscribeOptions};
    /// use futures_util::StreamExt;
    ///
    /// let client = Client::new(host)?;
    /// client.publish_batch(&[NewEvent::new("app.a"), NewEvent::new("app.b")]).await?;
    /// // Replay what is stored, then end.
    /// let options = SubscribeOptions::new("app.*").with_start(Start::Oldest).with_until_now();
    /// let subjects: Vec<String> = client
    ///     .subscribe(options)
    ///     .await?
    ///     .filter_map(|received| async move {
    ///         match received {
    ///             Ok(Received::Event(event)) => Some(event.subject),
    ///             _ => None,
    ///         }
    ///     })
    ///     .collect()
    ///     .await;
    /// assert_eq!(subjects, ["app.a", "app.b"]);
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, ClientError> {
        let (consumer_id, body) = self.open_stream(&options, None).await?;
        let delivery = Arc::new(Delivery {
            client: self.clone(),
            manual: options.ack != AckMode::None,
            progress: Mutex::new(Progress {
                consumer_id,
                unacked: VecDeque::new(),
                resume_after: None,
            }),
        });
        let reader = Reader {
            options,
            delivery: Arc::clone(&delivery),
            body: Some(body),
            parser: SseParser::new(self.max_event_size),
            pending: VecDeque::new(),
            refused: None,
            finished: false,
        };
        let events = futures_util::stream::unfold(reader, |mut reader| async move {
            let item = reader.next().await?;
            Some((item, reader))
        });
        Ok(Subscription {
            events: Mutex::new(Box::pin(events)),
            delivery,
        })
    }

    /// The durable consumers of `namespace` (`GET /consumers/{namespace}`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// let client = bus::client::Client::new(host)?;
    /// assert!(client.consumers("app").await?.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn consumers(&self, namespace: &str) -> Result<Vec<ConsumerInfo>, ClientError> {
        let url = self.admin_url(&["consumers", namespace])?;
        let response = self.send(self.http.get(url), self.timeout).await?;
        let response = expect_status(response, StatusCode::OK).await?;
        let text = response
            .text()
            .await
            .map_err(|e| ClientError::unreachable(&self.base, &e))?;
        serde_json::from_str(&text)
            .map_err(|e| ClientError::Protocol(format!("unexpected consumer list: {e}")))
    }

    /// Deletes durable consumer `name` of `namespace`: its members' streams end and its
    /// progress is forgotten. A consumer that does not exist is a 404 error.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use bus::client::{Client, SubscribeOptions};
    ///
    /// let client = Client::new(host)?;
    /// drop(client.subscribe(SubscribeOptions::new("app.>").with_consumer("audit")).await?);
    /// client.delete_consumer("app", "audit").await?;
    /// assert!(client.consumers("app").await?.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn delete_consumer(&self, namespace: &str, name: &str) -> Result<(), ClientError> {
        let url = self.admin_url(&["consumers", namespace, name])?;
        let response = self.send(self.http.delete(url), self.timeout).await?;
        expect_status(response, StatusCode::NO_CONTENT)
            .await
            .map(drop)
    }

    fn admin_url(&self, segments: &[&str]) -> Result<Url, ClientError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| ClientError::InvalidHost(self.host().to_owned()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// Sends `request` and waits at most `timeout` for the answer's head.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        match tokio::time::timeout(timeout, request.send()).await {
            Ok(answer) => answer.map_err(|e| ClientError::unreachable(&self.base, &e)),
            Err(_) => Err(ClientError::Timeout(format!(
                "the bus server at {} did not answer within {}",
                self.host(),
                format_go_duration(timeout)
            ))),
        }
    }

    async fn post(&self, body: Bytes) -> Result<reqwest::Response, ClientError> {
        let request = self
            .http
            .post(self.base.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let response = self.send(request, self.timeout).await?;
        expect_status(response, StatusCode::ACCEPTED).await
    }

    /// `PUT /?consumer_id=…&event_id=…`, with a reply body or none.
    async fn put_ack(
        &self,
        consumer_id: &str,
        event_id: &str,
        reply: Option<&RawValue>,
    ) -> Result<(), ClientError> {
        let mut url = self.base.clone();
        url.query_pairs_mut()
            .append_pair("consumer_id", consumer_id)
            .append_pair("event_id", event_id);
        let mut request = self.http.put(url);
        if let Some(reply) = reply {
            request = request.body(reply.get().to_owned());
        }
        let response = self.send(request, self.timeout).await?;
        expect_status(response, StatusCode::ACCEPTED)
            .await
            .map(drop)
    }

    /// Publishes `event` with `wait` parameters that make the server answer only once
    /// they are met or `timeout` passed; the answer, whatever its status.
    async fn publish_waiting(
        &self,
        event: &NewEvent,
        wait: &[(&str, String)],
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let mut url = self.base.clone();
        {
            let mut query = url.query_pairs_mut();
            for (name, value) in wait {
                query.append_pair(name, value);
            }
            query.append_pair("timeout", &format!("{}ms", timeout.as_millis().max(1)));
        }
        let request = self.http.post(url).body(to_body(event)?);
        // The server answers within `timeout`; allow for the way there and back.
        self.send(request, timeout + self.timeout).await
    }

    async fn open_stream(
        &self,
        options: &SubscribeOptions,
        last_event_id: Option<&str>,
    ) -> Result<(String, ByteStream), ClientError> {
        let mut url = self.base.clone();
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("subject", &options.subject);
            match &options.start {
                Start::Oldest => query.append_pair("start", "oldest"),
                Start::Newest => query.append_pair("start", "newest"),
                Start::After(id) => query.append_pair("start", id),
                Start::Position(index) => query.append_pair("start_index", &index.to_string()),
                Start::Time(time) => query.append_pair("start_time", &rfc3339(*time)),
            };
            if let AckMode::Manual {
                redelivery,
                redelivery_count,
            } = &options.ack
            {
                query.append_pair("ack", "manual");
                if let Some(every) = redelivery {
                    query.append_pair("redelivery", &format!("{}ms", every.as_millis()));
                }
                if let Some(count) = redelivery_count {
                    query.append_pair("redelivery_count", &count.to_string());
                }
                if let Some(name) = &options.consumer {
                    query.append_pair("consumer", name);
                }
                if let Some(window) = options.max_inflight {
                    query.append_pair("max_inflight", &window.to_string());
                }
                if let Some(zone) = &options.zone {
                    query.append_pair("zone", zone);
                }
            }
            if options.until_now {
                query.append_pair("until", "now");
            }
        }
        let mut request = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = self.send(request, self.timeout).await?;
        let response = expect_status(response, StatusCode::OK).await?;
        let consumer_id = response
            .headers()
            .get(HEADER_CONSUMER_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((consumer_id, Box::pin(response.bytes_stream())))
    }
}

impl HttpSettings {
    fn client(&self) -> Result<reqwest::Client, ClientError> {
        let mut builder = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10));
        #[cfg(feature = "tls")]
        {
            install_tls_provider();
            builder = builder.tls_certs_merge(self.roots.iter().cloned());
        }
        if let Some(token) = &self.token {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(reqwest::header::AUTHORIZATION, token.clone());
            builder = builder.default_headers(headers);
        }
        builder
            .build()
            .map_err(|e| ClientError::Protocol(format!("cannot set up HTTP: {e}")))
    }
}

/// Makes ring rustls's process-wide crypto provider, unless one is installed already.
///
/// With the `tls` feature, reqwest (in the whole program: cargo unifies its features)
/// uses rustls without a provider of its own, and panics when a `reqwest::Client` is
/// built before one is installed. A [`Client`] calls this itself; a program that builds
/// its own reqwest clients calls it first (or installs the provider it prefers).
///
/// ```
/// bus::client::install_tls_provider();
/// let http = reqwest::Client::new(); // would panic without a provider
/// # drop(http);
/// ```
#[cfg(feature = "tls")]
pub fn install_tls_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may have installed one meanwhile; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Box<RawValue>, ClientError> {
    serde_json::value::to_raw_value(value)
        .map_err(|e| ClientError::Protocol(format!("cannot encode the payload as JSON: {e}")))
}

fn to_body<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, ClientError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| ClientError::Protocol(format!("cannot encode the event: {e}")))
}

/// The `X-BUS-EVENT-*` headers of a publish's answer.
fn published(response: &reqwest::Response) -> Result<Published, ClientError> {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Protocol(format!("the answer has no {name} header")))
    };
    Ok(Published {
        id: header(HEADER_EVENT_ID)?,
        created_at: header(HEADER_EVENT_CREATED_AT)?,
        index: header(HEADER_EVENT_INDEX)?
            .parse()
            .map_err(|_| ClientError::Protocol("the event index is not a number".into()))?,
    })
}

/// `time` as the server reads `start_time` (times before 1970 are taken as 1970).
fn rfc3339(time: SystemTime) -> String {
    crate::timestamp::Timestamp::from(time.max(SystemTime::UNIX_EPOCH)).to_string()
}

fn timed_out(timeout: Duration, got: usize, wanted: usize) -> ClientError {
    ClientError::Timeout(format!(
        "timed out after {}: {got} of {wanted} expected answers arrived",
        format_go_duration(timeout)
    ))
}

/// 20 random lowercase letters and digits, for inbox subjects.
fn random_token() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuv";
    let mut bytes = [0u8; 20];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = (nanos >> (i * 5 % 120)) as u8 ^ i as u8;
        }
    }
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(b & 31)] as char)
        .collect()
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;
type ReceivedStream = Pin<Box<dyn Stream<Item = Result<Received, ClientError>> + Send>>;

async fn expect_status(
    response: reqwest::Response,
    expected: StatusCode,
) -> Result<reqwest::Response, ClientError> {
    let status = response.status();
    if status == expected {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let message = match text.trim() {
        "" => status
            .canonical_reason()
            .unwrap_or("no explanation")
            .to_owned(),
        text => text.to_owned(),
    };
    Err(ClientError::Server {
        status: status.as_u16(),
        message,
    })
}

/// What a subscription yields.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// use bus::client::{Client, NewEvent, Received, SubscribeOptions};
///
/// let client = Client::new(host)?;
/// let mut events = client.subscribe(SubscribeOptions::new("app.>")).await?;
/// client.publish(&NewEvent::new("app.hello")).await?;
/// while let Some(received) = events.next().await {
///     match received? {
///         Received::Event(event) => {
///             println!("{}: {}", event.subject, event.json);
///             break;
///         }
///         Received::Disconnected(why) => eprintln!("connection lost ({why}); reconnecting"),
///         Received::Reconnected { .. } => eprintln!("reconnected"),
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub enum Received {
    /// An event.
    Event(Event),
    /// The connection dropped; the subscription is trying to reconnect.
    Disconnected(ClientError),
    /// The subscription is connected again and resumes where it was.
    Reconnected {
        /// The server's id for the new connection's consumer.
        consumer_id: String,
    },
}

/// An open subscription: a [`Stream`] of [`Received`] items (events, and connection
/// changes), ending (`None`) when the `until_now` end is reached, the server ends it, or
/// reconnecting failed (reported as the last item). Dropping it closes the connection.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// use bus::client::{Client, NewEvent, Received, SubscribeOptions};
/// use futures_util::StreamExt;
///
/// let client = Client::new(host)?;
/// let subscription = client.subscribe(SubscribeOptions::new("app.clicks")).await?;
/// for n in 0..3 {
///     client.publish(&NewEvent::new("app.clicks").with_payload(&n)?).await?;
/// }
/// let clicks: Vec<u32> = subscription
///     .filter_map(|received| async move {
///         match received {
///             Ok(Received::Event(event)) => event.payload_as::<u32>().ok(),
///             _ => None,
///         }
///     })
///     .take(3)
///     .collect()
///     .await;
/// assert_eq!(clicks, [0, 1, 2]);
/// # Ok(()) }
/// ```
pub struct Subscription {
    /// In a mutex only so that `&Subscription` can be sent between threads (acks hold
    /// one across an await); reading needs `&mut self`, which needs no locking.
    events: Mutex<ReceivedStream>,
    delivery: Arc<Delivery>,
}

impl Subscription {
    /// The server's id for this consumer (it changes when the subscription reconnects).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// let client = bus::client::Client::new(host)?;
    /// let subscription = client.subscribe(bus::client::SubscribeOptions::new("app.>")).await?;
    /// assert!(subscription.consumer_id().starts_with("c_"));
    /// # Ok(()) }
    /// ```
    pub fn consumer_id(&self) -> String {
        self.delivery.progress().consumer_id.clone()
    }

    /// The next event or connection change; `None` once the subscription has ended. The
    /// same as [`StreamExt::next`], without importing it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use bus::client::{Client, NewEvent, Received, SubscribeOptions};
    ///
    /// let client = Client::new(host)?;
    /// let mut events = client.subscribe(SubscribeOptions::new("app.>")).await?;
    /// client.publish(&NewEvent::new("app.ping")).await?;
    /// assert!(matches!(events.next().await, Some(Ok(Received::Event(_)))));
    /// # Ok(()) }
    /// ```
    pub async fn next(&mut self) -> Option<Result<Received, ClientError>> {
        StreamExt::next(self).await
    }

    /// Acknowledges an event of this subscription (the same as [`Event::ack`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use bus::client::{Client, NewEvent, Received, SubscribeOptions};
    ///
    /// let client = Client::new(host)?;
    /// let mut jobs = client.subscribe(SubscribeOptions::new("app.jobs").with_manual_ack()).await?;
    /// client.publish(&NewEvent::new("app.jobs")).await?;
    /// let Some(Ok(Received::Event(job))) = jobs.next().await else { panic!() };
    /// jobs.ack(&job).await?;
    /// # Ok(()) }
    /// ```
    pub async fn ack(&self, event: &Event) -> Result<(), ClientError> {
        self.delivery.ack(event, None).await
    }

    /// Acknowledges `event` and replies to it with `payload` (the same as
    /// [`Event::reply`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// use std::time::Duration;
    /// use bus::client::{Client, NewEvent, Received, SubscribeOptions};
    ///
    /// let client = Client::new(host)?;
    /// let mut echo = client.subscribe(SubscribeOptions::new("app.echo").with_manual_ack()).await?;
    /// tokio::spawn(async move {
    ///     while let Some(Ok(Received::Event(said))) = echo.next().await {
    ///         let _ = echo.reply(&said, &said.payload).await;
    ///     }
    /// });
    /// let said = NewEvent::new("app.echo").with_payload("hello")?;
    /// assert_eq!(&client.request(&said, Duration::from_secs(5)).await?[..], br#""hello""#);
    /// # Ok(()) }
    /// ```
    pub async fn reply<T: Serialize + ?Sized>(
        &self,
        event: &Event,
        payload: &T,
    ) -> Result<(), ClientError> {
        self.delivery.ack(event, Some(&to_json(payload)?)).await
    }
}

impl Stream for Subscription {
    type Item = Result<Received, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let events = self.events.get_mut().unwrap_or_else(|p| p.into_inner());
        events.as_mut().poll_next(cx)
    }
}

/// What a subscription's events share with it: the client to ack through, and how far
/// acknowledgements have come (where to resume after a reconnection).
struct Delivery {
    client: Client,
    manual: bool,
    progress: Mutex<Progress>,
}

struct Progress {
    consumer_id: String,
    /// Manual acks: ids delivered on this connection, in order, and whether each was
    /// acknowledged. Bounded by the server's window (`max_inflight`).
    unacked: VecDeque<(String, bool)>,
    /// The event after which a reconnection resumes: the last delivered without acks,
    /// the last up to which all were acknowledged with them.
    resume_after: Option<String>,
}

impl std::fmt::Debug for Delivery {
    // Every delivered event carries one: keep their debug output short.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("host", &self.client.host())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn delivered(&self, id: &str) {
        let mut progress = self.progress();
        if !self.manual {
            progress.resume_after = Some(id.to_owned());
        } else if !progress.unacked.iter().any(|(unacked, _)| unacked == id) {
            // A redelivery is already listed.
            progress.unacked.push_back((id.to_owned(), false));
        }
    }

    async fn ack(&self, event: &Event, reply: Option<&RawValue>) -> Result<(), ClientError> {
        self.client
            .put_ack(&event.consumer_id, &event.id, reply)
            .await?;
        self.progress().acked(&event.id);
        Ok(())
    }
}

impl Progress {
    fn acked(&mut self, id: &str) {
        if let Some(entry) = self.unacked.iter_mut().find(|(unacked, _)| unacked == id) {
            entry.1 = true;
        }
        while self.unacked.front().is_some_and(|(_, acked)| *acked) {
            self.resume_after = self.unacked.pop_front().map(|(id, _)| id);
        }
    }
}

/// Reads one subscription's event stream, reconnecting when it drops.
struct Reader {
    options: SubscribeOptions,
    delivery: Arc<Delivery>,
    /// `None` while disconnected.
    body: Option<ByteStream>,
    /// Bounded: it holds at most the client's `max_event_size`.
    parser: SseParser,
    pending: VecDeque<SseMessage>,
    /// The stream went past the size limit: the error to end with once the messages
    /// completed before it are delivered.
    refused: Option<ClientError>,
    finished: bool,
}

impl Reader {
    async fn next(&mut self) -> Option<Result<Received, ClientError>> {
        loop {
            if let Some(message) = self.pending.pop_front() {
                match message.event.as_str() {
                    "msg" => return Some(self.event(message)),
                    "error" => {
                        self.finish();
                        return Some(Err(ClientError::Subscription(message.data)));
                    }
                    "done" => {
                        self.finish();
                        return None;
                    }
                    _ => continue,
                }
            }
            if self.finished {
                return None;
            }
            if let Some(refused) = self.refused.take() {
                self.finish();
                return Some(Err(refused));
            }
            let Some(body) = self.body.as_mut() else {
                return Some(self.reconnect().await);
            };
            let client = &self.delivery.client;
            let lost = match body.next().await {
                Some(Ok(chunk)) => {
                    let mut messages = Vec::new();
                    let pushed = self.parser.push(&chunk, &mut messages);
                    self.pending.extend(messages);
                    if let Err(TooLarge { limit }) = pushed {
                        // Stop reading (dropping the connection) before buffering more.
                        self.body = None;
                        self.refused = Some(ClientError::EventTooLarge { limit });
                    }
                    continue;
                }
                Some(Err(e)) => ClientError::unreachable(&client.base, &e),
                None => ClientError::Unreachable {
                    host: client.host().to_owned(),
                    reason: "the server closed the event stream".into(),
                },
            };
            self.body = None;
            self.parser = SseParser::new(client.max_event_size);
            if self.options.reconnect_for.is_zero() {
                self.finish();
                return Some(Err(lost));
            }
            return Some(Ok(Received::Disconnected(lost)));
        }
    }

    fn finish(&mut self) {
        self.finished = true;
        self.body = None;
    }

    fn event(&mut self, message: SseMessage) -> Result<Received, ClientError> {
        let mut event: Event = serde_json::from_str(&message.data)
            .map_err(|e| ClientError::Protocol(format!("an event is not valid JSON: {e}")))?;
        event.json = message.data;
        event.consumer_id = self.delivery.progress().consumer_id.clone();
        self.delivery.delivered(&event.id);
        event.delivery = Some(Arc::clone(&self.delivery));
        Ok(Received::Event(event))
    }

    async fn reconnect(&mut self) -> Result<Received, ClientError> {
        let deadline = tokio::time::Instant::now() + self.options.reconnect_for;
        let mut backoff = Duration::from_millis(50);
        loop {
            let resume = self.delivery.progress().resume_after.clone();
            match self
                .delivery
                .client
                .open_stream(&self.options, resume.as_deref())
                .await
            {
                Ok((consumer_id, body)) => {
                    let mut progress = self.delivery.progress();
                    progress.consumer_id = consumer_id.clone();
                    // What was not acknowledged comes again on the new connection.
                    progress.unacked.clear();
                    drop(progress);
                    self.body = Some(body);
                    return Ok(Received::Reconnected { consumer_id });
                }
                Err(e @ (ClientError::Unreachable { .. } | ClientError::Timeout(_))) => {
                    if tokio::time::Instant::now() + backoff > deadline {
                        self.finish();
                        return Err(e);
                    }
                }
                Err(ClientError::Server { status, message }) if status >= 500 => {
                    // Starting up or shutting down: try again.
                    if tokio::time::Instant::now() + backoff > deadline {
                        self.finish();
                        return Err(ClientError::Server { status, message });
                    }
                }
                Err(e) => {
                    self.finish();
                    return Err(e);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_with_and_without_scheme() {
        for (given, expected) in [
            ("http://localhost:2021", "http://localhost:2021"),
            ("localhost:2021", "http://localhost:2021"),
            (" http://10.0.0.1:80/ ", "http://10.0.0.1"),
        ] {
            assert_eq!(Client::new(given).unwrap().host(), expected);
        }
        for bad in ["", "https://", "ftp://x", "http://"] {
            assert!(
                matches!(Client::new(bad), Err(ClientError::InvalidHost(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn inbox_tokens_are_valid_subject_segments() {
        let a = random_token();
        assert_eq!(a.len(), 20);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        assert_ne!(a, random_token());
    }

    #[test]
    fn manual_acks_resume_after_the_last_contiguous_ack() {
        let delivery = Delivery {
            client: Client::new("localhost:1").unwrap(),
            manual: true,
            progress: Mutex::new(Progress {
                consumer_id: String::new(),
                unacked: VecDeque::new(),
                resume_after: None,
            }),
        };
        for id in ["e1", "e2", "e3", "e2"] {
            delivery.delivered(id);
        }
        let mark = |id: &str| delivery.progress().acked(id);
        mark("e2");
        assert_eq!(
            delivery.progress().resume_after,
            None,
            "e1 is still unacked"
        );
        mark("e1");
        assert_eq!(delivery.progress().resume_after.as_deref(), Some("e2"));
        mark("e3");
        assert_eq!(delivery.progress().resume_after.as_deref(), Some("e3"));
        assert!(delivery.progress().unacked.is_empty());
    }
}
