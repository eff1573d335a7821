//! An HTTP client for a `bus` server (or an ella.to/bus server): publish, subscribe,
//! acknowledge, and the inbox-based confirmations and request/reply of the Go SDK.
//!
//! What it promises:
//! - Every server refusal becomes a [`ClientError::Server`] carrying the status and the
//!   server's own plain-text message.
//! - A [`Subscription`] reconnects by itself when the connection drops (a server restart),
//!   resuming with `Last-Event-ID` so that nothing is skipped and nothing repeated; it
//!   reports each drop and each reconnection to its reader. With manual acks it resumes
//!   after the last event acknowledged through it, so an unacknowledged event is
//!   delivered again.
//! - Confirmations and request/reply subscribe to a fresh inbox subject *before*
//!   publishing, so no answer can be missed, and give up after their timeout.

pub mod sse;

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use self::sse::{SseMessage, SseParser};

/// The address clients use when none is given.
pub const DEFAULT_HOST: &str = "http://localhost:2021";

const HEADER_EVENT_ID: &str = "x-bus-event-id";
const HEADER_EVENT_CREATED_AT: &str = "x-bus-event-created-at";
const HEADER_EVENT_INDEX: &str = "x-bus-event-index";
const HEADER_CONSUMER_ID: &str = "x-bus-consumer-id";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server address {0:?}: use http://host:port")]
    InvalidHost(String),
    #[error("cannot reach the bus server at {host}: {reason}")]
    Unreachable { host: String, reason: String },
    /// The server refused the request; `message` is its explanation.
    #[error("the server refused the request ({status}): {message}")]
    Server { status: u16, message: String },
    /// The server answered something this client does not understand.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The server ended a subscription with an error event.
    #[error("the server ended the subscription: {0}")]
    Subscription(String),
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

/// An event to publish. Empty strings mean "not set"; the server assigns the id and the
/// creation time unless they are given (restore tools give them).
#[derive(Debug, Clone, Default, Serialize)]
pub struct NewEvent {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key: String,
    pub subject: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub response_subject: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
}

/// What the server assigned to a published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub created_at: String,
    /// Position in the namespace's log; -1 for inbox events, which are not stored.
    pub index: i64,
}

/// An event as the server delivers it.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(default)]
    pub trace_id: String,
    #[serde(default)]
    pub key: String,
    pub subject: String,
    #[serde(default)]
    pub response_subject: String,
    pub created_at: String,
    #[serde(default)]
    pub payload: Option<Box<RawValue>>,
    #[serde(default)]
    pub index: i64,
    /// The event's JSON exactly as the server sent it.
    #[serde(skip)]
    pub json: String,
    /// The consumer the event was delivered to (acks name it).
    #[serde(skip)]
    pub consumer_id: String,
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    Oldest,
    Newest,
    /// Strictly after the event with this id.
    After(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckMode {
    None,
    /// Stop-and-wait: the next event comes once this one is acknowledged. `None` leaves
    /// the server's defaults.
    Manual {
        redelivery: Option<Duration>,
        redelivery_count: Option<i64>,
    },
}

#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// A subject or pattern (`orders.*`, `orders.>`).
    pub subject: String,
    pub start: Start,
    pub ack: AckMode,
    /// End once the events stored when the subscription opened have been delivered.
    pub until_now: bool,
    /// How long to keep trying to reconnect after the connection drops; zero ends the
    /// subscription with an error at the first drop.
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
}

/// How a confirmed publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmation {
    /// Whether enough consumers (and zones) acknowledged within the timeout.
    pub reached: bool,
    /// Distinct consumers and zones that acknowledged.
    pub consumers: usize,
    pub zones: usize,
}

/// A durable consumer, as `GET /consumers/{namespace}` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ConsumerInfo {
    pub name: String,
    pub pattern: String,
    /// The first position it has not had acknowledged (or given up).
    pub acked_floor: u64,
    /// Events it has read and not had acknowledged.
    pub pending: u64,
    /// Events in the log from its floor on.
    pub lag: u64,
    /// Connections attached now.
    pub members: u64,
    pub dead_letter_subject: String,
}

/// A connection to a bus server. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct Client {
    base: Url,
    http: reqwest::Client,
}

impl Client {
    /// A client for the server at `host` (`http://host:port`; `host:port` alone is taken
    /// as http).
    pub fn new(host: &str) -> Result<Client, ClientError> {
        let host = host.trim();
        let with_scheme = if host.contains("://") {
            host.to_owned()
        } else {
            format!("http://{host}")
        };
        let base = Url::parse(&with_scheme)
            .ok()
            .filter(|url| url.scheme() == "http" && url.host().is_some())
            .ok_or_else(|| ClientError::InvalidHost(host.to_owned()))?;
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ClientError::Protocol(format!("cannot set up HTTP: {e}")))?;
        Ok(Client { base, http })
    }

    /// The same client, presenting `token` (`Authorization: Bearer`) on every request to
    /// a server that authenticates them (`--auth-file`).
    pub fn with_token(mut self, token: &str) -> Result<Client, ClientError> {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| {
                ClientError::Protocol("the token holds characters a header cannot carry".into())
            })?;
        value.set_sensitive(true);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, value);
        self.http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .default_headers(headers)
            .build()
            .map_err(|e| ClientError::Protocol(format!("cannot set up HTTP: {e}")))?;
        Ok(self)
    }

    /// The server's address.
    pub fn host(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// Checks that the server is up (`GET /health`).
    pub async fn health(&self) -> Result<(), ClientError> {
        let url = self
            .base
            .join("health")
            .map_err(|_| ClientError::InvalidHost(self.host().to_owned()))?;
        let response = self
            .http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| ClientError::unreachable(&self.base, &e))?;
        expect_status(response, StatusCode::OK).await.map(drop)
    }

    /// Publishes one event and waits until `consumers` distinct consumers, in `zones`
    /// distinct zones, have acknowledged it, or `timeout` passes (server-side
    /// confirmation). Returns whether that was reached, and how many did.
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

    /// The durable consumers of `namespace` (`GET /consumers/{namespace}`).
    pub async fn consumers(&self, namespace: &str) -> Result<Vec<ConsumerInfo>, ClientError> {
        let url = self.admin_url(&["consumers", namespace])?;
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| ClientError::unreachable(&self.base, &e))?;
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
    pub async fn delete_consumer(&self, namespace: &str, name: &str) -> Result<(), ClientError> {
        let url = self.admin_url(&["consumers", namespace, name])?;
        let response = self
            .http
            .delete(url)
            .send()
            .await
            .map_err(|e| ClientError::unreachable(&self.base, &e))?;
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

    /// Publishes one event.
    pub async fn publish(&self, event: &NewEvent) -> Result<Published, ClientError> {
        let body = serde_json::to_vec(event)
            .map_err(|e| ClientError::Protocol(format!("cannot encode the event: {e}")))?;
        let response = self.post(body.into()).await?;
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

    /// Publishes a body that is already JSON: one event (an object), or a batch (an array
    /// of events, stored atomically).
    pub async fn publish_json(&self, body: Bytes) -> Result<(), ClientError> {
        self.post(body).await.map(drop)
    }

    async fn post(&self, body: Bytes) -> Result<reqwest::Response, ClientError> {
        let response = self
            .http
            .post(self.base.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| ClientError::unreachable(&self.base, &e))?;
        expect_status(response, StatusCode::ACCEPTED).await
    }

    /// Acknowledges an event delivered to a manual-ack consumer.
    pub async fn ack(&self, consumer_id: &str, event_id: &str) -> Result<(), ClientError> {
        let mut url = self.base.clone();
        url.query_pairs_mut()
            .append_pair("consumer_id", consumer_id)
            .append_pair("event_id", event_id);
        let response = self
            .http
            .put(url)
            .send()
            .await
            .map_err(|e| ClientError::unreachable(&self.base, &e))?;
        expect_status(response, StatusCode::ACCEPTED)
            .await
            .map(drop)
    }

    /// Answers an event that carries a `response_subject`, as the Go SDK's `Ack` does: a
    /// confirmation without payload, or a reply with one. Does nothing for other events.
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

    /// Opens a subscription; returns once the server has accepted it.
    pub async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, ClientError> {
        let (consumer_id, body) = self.open_stream(&options, None).await?;
        Ok(Subscription {
            client: self.clone(),
            options,
            consumer_id,
            body: Some(body),
            parser: SseParser::new(),
            pending: VecDeque::new(),
            last_delivered: None,
            last_acked: None,
            finished: false,
        })
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
        let response = request
            .send()
            .await
            .map_err(|e| ClientError::unreachable(&self.base, &e))?;
        let response = expect_status(response, StatusCode::OK).await?;
        let consumer_id = response
            .headers()
            .get(HEADER_CONSUMER_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((consumer_id, Box::pin(response.bytes_stream())))
    }

    /// Request/reply in one call: publishes `event` (the server gives it a fresh inbox as
    /// its response subject) and returns the first reply's payload (JSON), or
    /// [`ClientError::Timeout`] after `timeout` (the server's `POST /?reply=1`).
    pub async fn request(&self, event: &NewEvent, timeout: Duration) -> Result<Bytes, ClientError> {
        let response = self
            .publish_waiting(event, &[("reply", "1".into())], timeout)
            .await?;
        if response.status() == StatusCode::GATEWAY_TIMEOUT {
            return Err(ClientError::Timeout(format!("no reply within {timeout:?}")));
        }
        let response = expect_status(response, StatusCode::OK).await?;
        response
            .bytes()
            .await
            .map_err(|e| ClientError::unreachable(&self.base, &e))
    }

    /// Publishes `event` with `wait` parameters that make the server answer only once
    /// they are met or `timeout` passed; the answer, whatever its status.
    async fn publish_waiting(
        &self,
        event: &NewEvent,
        wait: &[(&str, String)],
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let body = serde_json::to_vec(event)
            .map_err(|e| ClientError::Protocol(format!("cannot encode the event: {e}")))?;
        let mut url = self.base.clone();
        {
            let mut query = url.query_pairs_mut();
            for (name, value) in wait {
                query.append_pair(name, value);
            }
            query.append_pair("timeout", &format!("{}ms", timeout.as_millis().max(1)));
        }
        self.http
            .post(url)
            .body(body)
            // The server answers within `timeout`; allow for the way there and back.
            .timeout(timeout + Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| ClientError::unreachable(&self.base, &e))
    }

    /// Acknowledges `event` and replies to it with `payload` (JSON) in the same call: the
    /// reply goes to the event's response subject.
    pub async fn reply(&self, event: &Event, payload: &RawValue) -> Result<(), ClientError> {
        let mut url = self.base.clone();
        url.query_pairs_mut()
            .append_pair("consumer_id", &event.consumer_id)
            .append_pair("event_id", &event.id);
        let response = self
            .http
            .put(url)
            .body(payload.get().to_owned())
            .send()
            .await
            .map_err(|e| ClientError::unreachable(&self.base, &e))?;
        expect_status(response, StatusCode::ACCEPTED)
            .await
            .map(drop)
    }

    /// Publishes `event` with a fresh inbox as its response subject and collects `count`
    /// answers (confirmations or replies) from it, or fails once `timeout` has passed.
    pub async fn publish_and_collect(
        &self,
        mut event: NewEvent,
        count: usize,
        timeout: Duration,
    ) -> Result<(Published, Vec<Event>), ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let inbox = format!("_bus_.{}", random_token());
        let mut options = SubscribeOptions::new(inbox.clone());
        options.reconnect_for = Duration::ZERO;
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
}

fn timed_out(timeout: Duration, got: usize, wanted: usize) -> ClientError {
    ClientError::Timeout(format!(
        "timed out after {}: {got} of {wanted} expected answers arrived",
        crate::duration::format_go_duration(timeout)
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
#[derive(Debug)]
pub enum Received {
    Event(Event),
    /// The connection dropped; the subscription is trying to reconnect.
    Disconnected(ClientError),
    /// The subscription is connected again, under a new consumer id, and resumes where it
    /// was.
    Reconnected {
        consumer_id: String,
    },
}

/// An open subscription. Read it with [`Subscription::next`].
pub struct Subscription {
    client: Client,
    options: SubscribeOptions,
    consumer_id: String,
    /// `None` while disconnected.
    body: Option<ByteStream>,
    parser: SseParser,
    pending: VecDeque<SseMessage>,
    last_delivered: Option<String>,
    last_acked: Option<String>,
    finished: bool,
}

impl Subscription {
    /// The server's id for this consumer (it changes when the subscription reconnects).
    pub fn consumer_id(&self) -> &str {
        &self.consumer_id
    }

    /// The next event or connection change; `None` once the subscription has ended (the
    /// `until_now` end was reached, or it failed and reported why).
    pub async fn next(&mut self) -> Option<Result<Received, ClientError>> {
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
            let Some(body) = self.body.as_mut() else {
                return Some(self.reconnect().await);
            };
            let lost = match body.next().await {
                Some(Ok(chunk)) => {
                    let mut messages = Vec::new();
                    self.parser.push(&chunk, &mut messages);
                    self.pending.extend(messages);
                    continue;
                }
                Some(Err(e)) => ClientError::unreachable(&self.client.base, &e),
                None => ClientError::Unreachable {
                    host: self.client.host().to_owned(),
                    reason: "the server closed the event stream".into(),
                },
            };
            self.body = None;
            self.parser = SseParser::new();
            if self.options.reconnect_for.is_zero() {
                self.finish();
                return Some(Err(lost));
            }
            return Some(Ok(Received::Disconnected(lost)));
        }
    }

    /// Acknowledges an event of this subscription, and remembers it as the point to
    /// resume after if the connection drops.
    pub async fn ack(&mut self, event: &Event) -> Result<(), ClientError> {
        self.client.ack(&event.consumer_id, &event.id).await?;
        self.last_acked = Some(event.id.clone());
        Ok(())
    }

    /// Acknowledges `event` and replies to it with `payload`, in one call (see
    /// [`Client::reply`]).
    pub async fn reply(&mut self, event: &Event, payload: &RawValue) -> Result<(), ClientError> {
        self.client.reply(event, payload).await?;
        self.last_acked = Some(event.id.clone());
        Ok(())
    }

    fn finish(&mut self) {
        self.finished = true;
        self.body = None;
    }

    fn event(&mut self, message: SseMessage) -> Result<Received, ClientError> {
        let mut event: Event = serde_json::from_str(&message.data)
            .map_err(|e| ClientError::Protocol(format!("an event is not valid JSON: {e}")))?;
        event.json = message.data;
        event.consumer_id = self.consumer_id.clone();
        self.last_delivered = Some(event.id.clone());
        Ok(Received::Event(event))
    }

    /// Where to resume: after the last event delivered, or, with manual acks, after the
    /// last one acknowledged (an unacknowledged event must come again).
    fn resume_after(&self) -> Option<&str> {
        match self.options.ack {
            AckMode::None => self.last_delivered.as_deref(),
            AckMode::Manual { .. } => self.last_acked.as_deref(),
        }
    }

    async fn reconnect(&mut self) -> Result<Received, ClientError> {
        let deadline = tokio::time::Instant::now() + self.options.reconnect_for;
        let mut backoff = Duration::from_millis(50);
        loop {
            let resume = self.resume_after().map(str::to_owned);
            match self
                .client
                .open_stream(&self.options, resume.as_deref())
                .await
            {
                Ok((consumer_id, body)) => {
                    self.consumer_id = consumer_id.clone();
                    self.body = Some(body);
                    return Ok(Received::Reconnected { consumer_id });
                }
                Err(e @ ClientError::Unreachable { .. }) => {
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
        for bad in ["", "https://x", "ftp://x", "http://"] {
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
}
