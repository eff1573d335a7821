//! `POST /`: publish one event (a JSON object) or an atomic batch (a JSON array).
//!
//! The body must be exactly one JSON value in valid UTF-8. Each event's `payload`, if
//! present, is any JSON value; it is stored compacted (insignificant whitespace removed),
//! so that it streams back as one SSE `data:` line. Answers `202 Accepted` with the
//! assigned id, creation time and index in `X-BUS-EVENT-*` headers (for a batch, those of
//! its last event).

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::StreamExt;
use serde_json::value::RawValue;

use super::access_log::LoggedNamespace;
use super::auth::{Operation, Target};
use super::error::ApiError;
use super::query::Params;
use super::AppState;
use crate::broker::{NewEvent, Publication, INBOX_NAMESPACE};
use crate::event::{compact_payload, MAX_PAYLOAD_DEPTH};
use crate::memory::Work;
use crate::timestamp::Timestamp;
use crate::wire::param::{CONFIRM, CONFIRM_ZONES, REPLY, TIMEOUT};
use crate::wire::{
    param, EventIn, HEADER_CONFIRMED, HEADER_CONFIRMED_ZONES, HEADER_EVENT_CREATED_AT,
    HEADER_EVENT_ID, HEADER_EVENT_INDEX,
};

/// What a publish body may hold (from the server's limits).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Longest subject or response_subject, in bytes.
    pub max_subject_len: usize,
    /// Longest deduplication key, in bytes.
    pub max_key_len: usize,
    /// Most events in a batch.
    pub max_batch: usize,
}

/// Checks an event as a client sent it (the wire's [`EventIn`]) against the server's
/// limits and turns it into what the broker publishes; `position_in_batch` names it in
/// messages.
///
/// The payload is borrowed from the body (a `&RawValue`, not a boxed copy): it is copied
/// once, compacted, into the event.
fn new_event(
    event: EventIn<String, &RawValue>,
    position_in_batch: Option<usize>,
    limits: &BodyLimits,
) -> Result<NewEvent, ApiError> {
    let which = || match position_in_batch {
        Some(i) => format!("event {i} of the batch: "),
        None => String::new(),
    };
    if event.subject.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{}missing subject: every event needs one, like \"orders.created\"",
            which()
        )));
    }
    for (name, subject) in [
        ("subject", &event.subject),
        ("response_subject", &event.response_subject),
    ] {
        super::check_subject_len(name, subject, limits.max_subject_len)
            .map_err(|e| ApiError::bad_request(format!("{}{}", which(), e.message)))?;
    }
    if event.key.len() > limits.max_key_len {
        return Err(ApiError::bad_request(format!(
            "{}key is {} bytes long; this server accepts at most {} (--max-key-len)",
            which(),
            event.key.len(),
            limits.max_key_len
        )));
    }
    let created_at = match event.given_created_at() {
        None => None,
        Some(text) => Some(
            Timestamp::parse(text)
                .map_err(|e| ApiError::bad_request(format!("{}created_at: {e}", which())))?,
        ),
    };
    let payload = match event.payload {
        Some(raw) => Some(compact_payload(raw.get().as_bytes()).ok_or_else(|| {
            ApiError::bad_request(format!(
                "{}payload nests arrays and objects more than {MAX_PAYLOAD_DEPTH} levels deep",
                which()
            ))
        })?),
        None => None,
    };
    Ok(NewEvent {
        id: (!event.id.is_empty()).then_some(event.id),
        trace_id: event.trace_id,
        key: event.key,
        subject: event.subject,
        response_subject: event.response_subject,
        created_at,
        payload,
    })
}

/// Parses a publish body: one event object or an array of them.
pub fn parse_body(body: &[u8], limits: &BodyLimits) -> Result<Publication, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::bad_request("the body is not valid UTF-8"));
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let bad_json = |e: serde_json::Error| ApiError::bad_request(format!("invalid JSON body: {e}"));
    match first {
        Some(b'{') => {
            let event: EventIn<String, &RawValue> =
                serde_json::from_slice(body).map_err(bad_json)?;
            Ok(Publication::One(new_event(event, None, limits)?))
        }
        Some(b'[') => {
            let refusal = std::cell::RefCell::new(None);
            let mut parser = serde_json::Deserializer::from_slice(body);
            let batch = BatchSeed {
                limits,
                refusal: &refusal,
            };
            let parsed = serde::de::DeserializeSeed::deserialize(batch, &mut parser)
                .and_then(|events| parser.end().map(|()| events));
            if let Some(refusal) = refusal.into_inner() {
                return Err(refusal);
            }
            let events = parsed.map_err(bad_json)?;
            if events.is_empty() {
                return Err(ApiError::bad_request(
                    "empty batch: send at least one event",
                ));
            }
            Ok(Publication::Batch(events))
        }
        None => Err(ApiError::bad_request(
            "empty body: send an event as a JSON object, or a batch as a JSON array",
        )),
        Some(_) => Err(ApiError::bad_request(
            "the body must be an event (a JSON object) or a batch (a JSON array)",
        )),
    }
}

/// Reads a batch's events one by one, each checked and converted as it comes: a refused
/// event or one event too many stops the parse at once, and the batch never exists in
/// two forms at the same time (what one publish costs in memory stays a small multiple
/// of its body, however many tiny events it holds).
struct BatchSeed<'a> {
    limits: &'a BodyLimits,
    /// Why the batch was refused, when that is not a JSON syntax error.
    refusal: &'a std::cell::RefCell<Option<ApiError>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for BatchSeed<'_> {
    type Value = Vec<NewEvent>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BatchSeed<'_> {
    type Value = Vec<NewEvent>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let mut events = Vec::new();
        while let Some(event) = seq.next_element::<EventIn<String, &'de RawValue>>()? {
            let refuse = |refusal: ApiError| {
                *self.refusal.borrow_mut() = Some(refusal);
                A::Error::custom("refused")
            };
            if events.len() == self.limits.max_batch {
                return Err(refuse(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the batch has more than {} events (--max-batch); split it",
                        self.limits.max_batch
                    ),
                )));
            }
            let event = new_event(event, Some(events.len()), self.limits).map_err(refuse)?;
            events.push(event);
        }
        Ok(events)
    }
}

/// What one publish costs in memory at most, per byte of its body: the body, its events
/// parsed, encoded for the log and as stream frames (measured: 3.0 with glibc, release
/// build; see HTTP_API.md's limits).
pub const PUBLISH_BYTES_PER_BODY_BYTE: usize = 4;
/// What one publish costs in memory at most per event, beyond its share of the body: the
/// structures that carry each event from the request to the log and its answer
/// (measured: about 580 bytes).
pub const PUBLISH_BYTES_PER_EVENT: usize = 640;
/// The fewest bytes an event takes in a batch body (`{"subject":"a.b"},`, rounded down).
const MIN_EVENT_BYTES: usize = 16;

/// The most memory a publish with a body of `body_len` bytes may use, for the memory
/// budget: [`PUBLISH_BYTES_PER_BODY_BYTE`] times the body plus
/// [`PUBLISH_BYTES_PER_EVENT`] for each event it can hold (no more than `max_batch`).
pub fn publish_cost(body_len: usize, max_batch: usize) -> u64 {
    let events = (body_len / MIN_EVENT_BYTES + 1).min(max_batch);
    (body_len.saturating_mul(PUBLISH_BYTES_PER_BODY_BYTE) as u64)
        .saturating_add((events * PUBLISH_BYTES_PER_EVENT) as u64)
}

/// Reads and drops a body of at most `max` bytes, within `timeout`, holding no more
/// than one chunk of it at a time.
async fn discard_body(body: Body, max: usize, timeout: Duration) {
    let drain = async {
        let mut chunks = body.into_data_stream();
        let mut read = 0usize;
        while let Some(Ok(chunk)) = chunks.next().await {
            read = read.saturating_add(chunk.len());
            if read > max {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(timeout, drain).await;
}

/// Reads a request body of at most `max` bytes, within `timeout`.
///
/// A body over the limit is read up to the limit before the 413, not refused on its
/// `Content-Length` alone: a client still writing when the connection closes would see
/// a broken pipe instead of the answer.
pub async fn read_body(body: Body, max: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!(
            "the body is larger than {} (--max-body); publish smaller events or split the batch",
            crate::units::format_size(max as u64)
        ),
    };
    // A body that arrives in pieces is joined into one buffer of its announced length
    // (`Content-Length`, no more than `max`), not grown piece by piece.
    let announced = axum::body::HttpBody::size_hint(&body)
        .exact()
        .map_or(0, |len| usize::try_from(len).unwrap_or(usize::MAX).min(max));
    let read = async {
        let mut chunks = body.into_data_stream();
        // Most bodies arrive as one chunk, which is kept as it is.
        let mut first: Option<Bytes> = None;
        let mut joined = BytesMut::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::bad_request(format!("reading the body failed: {e}")))?;
            let len = first.as_ref().map_or(0, Bytes::len) + joined.len() + chunk.len();
            if len > max {
                return Err(too_large());
            }
            match first.take() {
                None if joined.is_empty() => first = Some(chunk),
                earlier => {
                    if let Some(earlier) = earlier {
                        joined.reserve(announced.max(len));
                        joined.extend_from_slice(&earlier);
                    }
                    joined.extend_from_slice(&chunk);
                }
            }
        }
        Ok(first.unwrap_or_else(|| joined.freeze()))
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(read) => read,
        Err(_) => Err(ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the body did not arrive within {timeout:?} (--body-timeout); send it at once"
            ),
        }),
    }
}

/// The request is taken whole (not as `HeaderMap` and `Params` extractors) so that its
/// headers are read where they are rather than cloned.
pub async fn publish(State(app): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let params = match Params::parse(parts.uri.query()) {
        Ok(params) => params,
        Err(e) => return e.into_response(),
    };
    let started = Instant::now();
    let mut namespace = None;
    let mut response = publish_body(&app, &parts.headers, &params, body, &mut namespace).await;
    app.publish_micros.observe_duration(started.elapsed());
    if let Some(namespace) = namespace {
        response.extensions_mut().insert(LoggedNamespace(namespace));
    }
    response
}

/// Publishes; with `--access-log`, sets `namespace` to the events' once they are read.
async fn publish_body(
    app: &AppState,
    request_headers: &HeaderMap,
    params: &Params,
    body: Body,
    namespace: &mut Option<String>,
) -> Response {
    // Who asks is checked before the body is read; what they may publish, after.
    let who = match app.authenticate(request_headers, params) {
        Ok(who) => who,
        Err(denied) => return denied.into_response(),
    };
    let limits = &app.limits;
    // Memory is checked before the body is read, and the publish is charged what it may
    // cost at most until its events are stored (see `crate::memory`).
    let declared = request_headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .map_or(limits.max_body, |len| len.min(limits.max_body));
    let cost = publish_cost(declared, limits.max_batch);
    let charge = match app.memory.admit(Work::Publish, cost) {
        Ok(charge) => charge,
        Err(refused) => {
            // Read (and drop) what the client is still sending, so that it sees the
            // answer rather than a reset connection.
            discard_body(body, limits.max_body, limits.body_timeout).await;
            return super::over_memory_budget(refused, "publishes").into_response();
        }
    };
    let body = match read_body(body, limits.max_body, limits.body_timeout).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let body_limits = BodyLimits {
        max_subject_len: limits.max_subject_len,
        max_key_len: limits.max_key_len,
        max_batch: limits.max_batch,
    };
    let events = match parse_body(&body, &body_limits) {
        Ok(events) => events,
        Err(e) => return e.into_response(),
    };
    // The events own their fields: the body is not needed while they are stored.
    drop(body);
    // Every subject the publication writes to needs the grant: its events', and where
    // replies to them will be published (a response_subject, an inbox `_bus_.…` or not).
    let written = match &events {
        Publication::One(event) => std::slice::from_ref(event),
        Publication::Batch(events) => events.as_slice(),
    };
    if app.traffic.access_log() {
        // A batch stays in one namespace (the broker refuses it otherwise).
        *namespace = written
            .first()
            .and_then(|event| event.subject.split('.').next())
            .filter(|name| {
                *name == INBOX_NAMESPACE || app.broker.namespaces().any(|served| served == *name)
            })
            .map(str::to_owned);
    }
    if who.is_some() {
        let subjects = written
            .iter()
            .flat_map(|e| [&e.subject, &e.response_subject])
            .filter(|subject| !subject.is_empty());
        for subject in subjects {
            if let Err(denied) =
                app.authorize(who.as_ref(), Operation::Publish, Target::Subject(subject))
            {
                return denied.into_response();
            }
        }
    }
    let wait = match Wait::parse(params) {
        Ok(wait) => wait,
        Err(e) => return e.into_response(),
    };
    let mut events = events;
    let mut confirm_wait = None;
    let mut reply_inbox = None;
    if let Some(wait) = &wait {
        let Publication::One(event) = &mut events else {
            return ApiError::bad_request(
                "confirm, confirm_zones and reply take one event, not a batch",
            )
            .into_response();
        };
        // The id is fixed before the event is stored, so that no ack or reply can come
        // before the server listens for it.
        let id = event
            .id
            .get_or_insert_with(crate::broker::new_event_id)
            .clone();
        if wait.reply {
            if !event.response_subject.is_empty() {
                return ApiError::bad_request(
                    "reply=1 makes its own response_subject; leave it out of the event",
                )
                .into_response();
            }
            let (subject, inbox) = app.broker.reply_inbox().await;
            event.response_subject = subject;
            reply_inbox = Some(inbox);
        } else {
            confirm_wait = Some(app.broker.expect_confirmations(&id).await);
        }
    }
    let published = match app.broker.publish(events).await {
        Ok(published) => published,
        Err(e) => return ApiError::from(e).into_response(),
    };
    // Stored: what the publish held is free again (a wait for confirmations or a reply
    // holds next to nothing).
    drop(charge);
    // Room for these and the CORS layer's headers: a map that starts empty is grown (its
    // entries reallocated) by the CORS layer's fourth header, which costs more (measured
    // with callgrind) than making it this size at once. Names are constants (never
    // copied), values are made without a `String`.
    let mut headers = HeaderMap::with_capacity(8);
    if let Some(last) = published.last() {
        if let Ok(value) = HeaderValue::from_str(&last.id) {
            headers.insert(EVENT_ID, value);
        }
        if let Ok(value) = HeaderValue::from_bytes(&last.created_at.format()) {
            headers.insert(EVENT_CREATED_AT, value);
        }
        headers.insert(EVENT_INDEX, HeaderValue::from(last.index));
    }
    let Some(wait) = wait else {
        // The headers become the response's own (a tuple with a `HeaderMap` would copy
        // them into another map).
        let mut response = StatusCode::ACCEPTED.into_response();
        *response.headers_mut() = headers;
        return response;
    };
    if let Some(mut inbox) = reply_inbox {
        return match tokio::time::timeout(wait.timeout, inbox.recv()).await {
            Ok(Some(reply)) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                (StatusCode::OK, headers, reply.payload_json()).into_response()
            }
            _ => (
                StatusCode::GATEWAY_TIMEOUT,
                headers,
                format!(
                    "no reply within {:?}; the request was published and may still be handled\n",
                    wait.timeout
                ),
            )
                .into_response(),
        };
    }
    let Some(confirm_wait) = confirm_wait else {
        return (StatusCode::ACCEPTED, headers).into_response();
    };
    let (confirmed, enough) = confirm_wait
        .wait(wait.consumers, wait.zones, wait.timeout)
        .await;
    headers.insert(HEADER_CONFIRMED, HeaderValue::from(confirmed.consumers));
    headers.insert(HEADER_CONFIRMED_ZONES, HeaderValue::from(confirmed.zones));
    if enough {
        return (StatusCode::ACCEPTED, headers).into_response();
    }
    let message = format!(
        "confirmed by {} of {} consumers and {} of {} zones within {:?}; the event is stored\n",
        confirmed.consumers, wait.consumers, confirmed.zones, wait.zones, wait.timeout
    );
    (StatusCode::GATEWAY_TIMEOUT, headers, message).into_response()
}

// The answer's header names as constants: inserting a `&str` name copies it every time.
const EVENT_ID: HeaderName = HeaderName::from_static(HEADER_EVENT_ID);
const EVENT_CREATED_AT: HeaderName = HeaderName::from_static(HEADER_EVENT_CREATED_AT);
const EVENT_INDEX: HeaderName = HeaderName::from_static(HEADER_EVENT_INDEX);

/// How long a publish waits for confirmations or a reply unless `timeout` says.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// The longest a publish may wait.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// What a publish waits for after storing its event: `confirm=N` consumers and/or
/// `confirm_zones=K` zones to ack it, or `reply=1` the first reply; within `timeout`.
struct Wait {
    consumers: usize,
    zones: usize,
    reply: bool,
    timeout: Duration,
}

impl Wait {
    fn parse(params: &Params) -> Result<Option<Wait>, ApiError> {
        let count = |name: &str| -> Result<usize, ApiError> {
            match params.text(name)? {
                "" => Ok(0),
                text => text.parse::<usize>().map_err(|_| {
                    ApiError::bad_request(format!("{name}: {text:?} is not a number of consumers"))
                }),
            }
        };
        let consumers = count(CONFIRM)?;
        let zones = count(CONFIRM_ZONES)?;
        let reply = param::parse_flag(REPLY, params.text(REPLY)?)?;
        let timeout = match params.text(TIMEOUT)? {
            "" => DEFAULT_WAIT,
            text => match crate::duration::parse_go_duration(text) {
                Ok(d) if !d.is_zero() && d <= MAX_WAIT => d,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "{TIMEOUT}: {text:?} is not a duration from 1ms to 1h, like 5s"
                    )))
                }
            },
        };
        if reply && consumers + zones > 0 {
            return Err(ApiError::bad_request(
                "reply=1 cannot be combined with confirm or confirm_zones",
            ));
        }
        Ok((reply || consumers + zones > 0).then_some(Wait {
            consumers,
            zones,
            reply,
            timeout,
        }))
    }
}
