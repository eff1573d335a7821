//! A typed async client for a `bus` server (or an ella.to/bus server): publish,
//! subscribe, acknowledge, confirmations and request/reply.
//!
//! What it promises:
//! - Every server refusal becomes a [`ClientError::Server`] carrying the status and the
//!   server's own plain-text message; a server that does not answer within the client's
//!   timeout ([`Client::with_timeout`]) is a [`ClientError::Timeout`], never a hang.
//! - A [`Subscription`] is a [`Stream`](futures_util::Stream) of events. It reconnects by
//!   itself when the connection drops (a server restart), resuming with `Last-Event-ID` so
//!   that nothing is skipped and nothing repeated, and reports each drop and reconnection
//!   to its reader.
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
//! The module's files, each with one job: `error` ([`ClientError`]), `events` (what is
//! published and delivered: [`NewEvent`], [`Event`], …), `options` ([`SubscribeOptions`]),
//! `subscription` ([`Subscription`] and its reconnecting reader), `delivery` (how far a
//! subscription's acks have come), `transport` (the HTTP under them all) and `sse` (the
//! event-stream parser); this file holds [`Client`] and its calls. What crosses the wire
//! (event JSON, header and parameter names, consumer listings) is [`crate::wire`]'s.
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

mod delivery;
mod error;
mod events;
mod options;
pub(crate) mod sse;
mod subscription;
mod transport;

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::HeaderValue;
use reqwest::{StatusCode, Url};
use serde::Serialize;
use serde_json::value::RawValue;

pub use self::error::ClientError;
pub use self::events::{Confirmation, Event, NewEvent, Published, PublishedBatch};
pub use self::options::{AckMode, Start, SubscribeOptions};
pub use self::subscription::{Received, Subscription};
#[cfg(feature = "tls")]
pub use self::transport::install_tls_provider;
// The durable-consumer listing is the wire's; it is here too for the SDK's users.
pub use crate::wire::{ConsumerInfo, NamespaceInfo};

use self::transport::{expect_status, Transport};
use crate::duration::format_go_duration;
use crate::wire::{
    param, HEADER_CONFIRMED, HEADER_CONFIRMED_ZONES, HEADER_EVENT_CREATED_AT, HEADER_EVENT_ID,
    HEADER_EVENT_INDEX,
};

/// The address clients use when none is given.
pub const DEFAULT_HOST: &str = "http://localhost:2021";

/// How long a request may wait for the server unless [`Client::with_timeout`] says
/// otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest event a subscription accepts unless [`Client::with_max_event_size`] says
/// otherwise: 16 MiB, twice the server's default `--max-body` (8 MiB), which bounds an
/// event's JSON but for the few bytes the server adds (its id, time and index).
pub const DEFAULT_MAX_EVENT_SIZE: usize = 16 << 20;

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
    /// Shared with the subscriptions this client opens and the events they deliver.
    transport: Transport,
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
        Ok(Client {
            transport: Transport::new(base, DEFAULT_TIMEOUT, DEFAULT_MAX_EVENT_SIZE)?,
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
        self.transport.set_token(value)?;
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
        self.transport.trust(roots)?;
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
        self.transport.timeout = timeout;
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
        self.transport.max_event_size = limit;
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
        self.transport.host()
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
        let transport = &self.transport;
        let url = transport
            .base
            .join("health")
            .map_err(|_| ClientError::InvalidHost(self.host().to_owned()))?;
        let response = transport
            .send(transport.http.get(url), transport.timeout)
            .await?;
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
            (param::CONFIRM, consumers.to_string()),
            (param::CONFIRM_ZONES, zones.to_string()),
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
            consumers: count(HEADER_CONFIRMED),
            zones: count(HEADER_CONFIRMED_ZONES),
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
            .publish_waiting(event, &[(param::REPLY, "1".into())], timeout)
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
            .map_err(|e| self.transport.unreachable(&e))
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
        let inbox = format!("_bus_.{}", crate::random::token(20));
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
        self.transport.put_ack(consumer_id, event_id, None).await
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
        subscription::open(&self.transport, options).await
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
        self.get_json(&["consumers", namespace], "consumer list")
            .await
    }

    /// Every namespace the server serves (`GET /namespaces`): what each log keeps and
    /// who reads it. With authentication, those the token may administer.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// let client = bus::client::Client::new(host)?;
    /// let names: Vec<String> = client.namespaces().await?.into_iter().map(|n| n.namespace).collect();
    /// assert!(names.contains(&"app".to_owned()));
    /// # Ok(()) }
    /// ```
    pub async fn namespaces(&self) -> Result<Vec<NamespaceInfo>, ClientError> {
        self.get_json(&["namespaces"], "namespace list").await
    }

    /// One namespace (`GET /namespaces/{namespace}`): what its log keeps and who reads
    /// it. A namespace the server does not serve is a 404 error.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = bus::doc_support::server().await?; let host = server.host();
    /// let client = bus::client::Client::new(host)?;
    /// assert_eq!(client.namespace("app").await?.events, 0);
    /// assert!(client.namespace("nowhere").await.is_err());
    /// # Ok(()) }
    /// ```
    pub async fn namespace(&self, namespace: &str) -> Result<NamespaceInfo, ClientError> {
        self.get_json(&["namespaces", namespace], "namespace description")
            .await
    }

    /// `GET` of an admin path whose `200` answer is JSON (`what` names it in errors).
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &[&str],
        what: &str,
    ) -> Result<T, ClientError> {
        let transport = &self.transport;
        let url = self.admin_url(path)?;
        let response = transport
            .send(transport.http.get(url), transport.timeout)
            .await?;
        let response = expect_status(response, StatusCode::OK).await?;
        let text = response
            .text()
            .await
            .map_err(|e| transport.unreachable(&e))?;
        serde_json::from_str(&text)
            .map_err(|e| ClientError::Protocol(format!("unexpected {what}: {e}")))
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
        let transport = &self.transport;
        let url = self.admin_url(&["consumers", namespace, name])?;
        let response = transport
            .send(transport.http.delete(url), transport.timeout)
            .await?;
        expect_status(response, StatusCode::NO_CONTENT)
            .await
            .map(drop)
    }

    fn admin_url(&self, segments: &[&str]) -> Result<Url, ClientError> {
        let mut url = self.transport.base.clone();
        url.path_segments_mut()
            .map_err(|()| ClientError::InvalidHost(self.host().to_owned()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    async fn post(&self, body: Bytes) -> Result<reqwest::Response, ClientError> {
        let transport = &self.transport;
        let request = transport
            .http
            .post(transport.base.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let response = transport.send(request, transport.timeout).await?;
        expect_status(response, StatusCode::ACCEPTED).await
    }

    /// Publishes `event` with `wait` parameters that make the server answer only once
    /// they are met or `timeout` passed; the answer, whatever its status.
    async fn publish_waiting(
        &self,
        event: &NewEvent,
        wait: &[(&str, String)],
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let transport = &self.transport;
        let mut url = transport.base.clone();
        {
            let mut query = url.query_pairs_mut();
            for (name, value) in wait {
                query.append_pair(name, value);
            }
            // At least 1ms: the server refuses a zero timeout.
            let timeout = timeout.max(Duration::from_millis(1));
            query.append_pair(param::TIMEOUT, &param::millis(timeout));
        }
        let request = transport.http.post(url).body(to_body(event)?);
        // The server answers within `timeout`; allow for the way there and back.
        transport.send(request, timeout + transport.timeout).await
    }
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

fn timed_out(timeout: Duration, got: usize, wanted: usize) -> ClientError {
    ClientError::Timeout(format!(
        "timed out after {}: {got} of {wanted} expected answers arrived",
        format_go_duration(timeout)
    ))
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
}
