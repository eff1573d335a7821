//! Subscriptions: [`Subscription`], the [`Stream`] of what an open subscription
//! [`Received`] (events, and the connection's drops and recoveries), and the reader under
//! it that parses the event stream and reconnects when it drops.
//!
//! What it promises: a dropped connection is reopened (for up to the options'
//! `reconnect_for`) with `Last-Event-ID` set to where `Delivery` says to resume, so that
//! nothing is skipped and, but for unacknowledged events under manual acks, nothing
//! repeated; each drop and reconnection is reported to the reader. An event larger than
//! the client's limit ends the subscription instead of being buffered.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use serde::Serialize;

use super::delivery::Delivery;
use super::error::ClientError;
use super::events::{to_json, Event};
use super::options::{AckMode, SubscribeOptions};
use super::sse::{SseMessage, SseParser, TooLarge};
use super::transport::{ByteStream, Transport};
use crate::wire::EventOut;

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
        self.delivery.ack(&event.consumer_id, &event.id, None).await
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
        let payload = to_json(payload)?;
        self.delivery
            .ack(&event.consumer_id, &event.id, Some(&payload))
            .await
    }
}

impl Stream for Subscription {
    type Item = Result<Received, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let events = self.events.get_mut().unwrap_or_else(|p| p.into_inner());
        events.as_mut().poll_next(cx)
    }
}

/// Opens a subscription through `transport`: returns once the server has accepted it.
pub(super) async fn open(
    transport: &Transport,
    options: SubscribeOptions,
) -> Result<Subscription, ClientError> {
    let (consumer_id, body) = transport.open_stream(&options, None).await?;
    let manual = options.ack != AckMode::None;
    let delivery = Arc::new(Delivery::new(transport.clone(), manual, consumer_id));
    let reader = Reader {
        options,
        delivery: Arc::clone(&delivery),
        body: Some(body),
        parser: SseParser::new(transport.max_event_size),
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

type ReceivedStream = Pin<Box<dyn Stream<Item = Result<Received, ClientError>> + Send>>;

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
            let transport = self.delivery.transport();
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
                Some(Err(e)) => transport.unreachable(&e),
                None => ClientError::Unreachable {
                    host: transport.host().to_owned(),
                    reason: "the server closed the event stream".into(),
                },
            };
            self.body = None;
            self.parser = SseParser::new(transport.max_event_size);
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
        let wire: EventOut = serde_json::from_str(&message.data)
            .map_err(|e| ClientError::Protocol(format!("an event is not valid JSON: {e}")))?;
        let consumer_id = self.delivery.progress().consumer_id.clone();
        self.delivery.delivered(&wire.id);
        let delivery = Some(Arc::clone(&self.delivery));
        Ok(Received::Event(Event::from_wire(
            wire,
            message.data,
            consumer_id,
            delivery,
        )))
    }

    async fn reconnect(&mut self) -> Result<Received, ClientError> {
        let deadline = tokio::time::Instant::now() + self.options.reconnect_for;
        let mut backoff = Duration::from_millis(50);
        loop {
            let resume = self.delivery.progress().resume_after.clone();
            match self
                .delivery
                .transport()
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
