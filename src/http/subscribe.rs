//! `GET /`: subscribe with Server-Sent Events.
//!
//! Parameters (`subject`, `start`, `ack`, `redelivery`, `redelivery_count`) follow the
//! reference server, plus `max_inflight` (the ack window), `consumer` (a durable
//! consumer's name), `zone` (for `confirm_zones`), `start_index` and `start_time` (replay
//! from a position or a time) and `until=now` (end the stream with an `event: done` frame once
//! the events stored when it opened have been sent); an empty value, and `0`/`0s` for `redelivery`, mean the default, as
//! the Go SDK sends every parameter whether set or not. A value that cannot be parsed is a
//! 400 that names it. A `Last-Event-ID` header (browsers send it when they reconnect)
//! overrides `start`.
//!
//! Several `subject` parameters open one stream of all their events, each namespace's in
//! order, whose `id:`s are cursors over every namespace (`cursor:orders=1042,chat=77`) so
//! that `Last-Event-ID` resumes each exactly; what only means something for one log
//! (manual acks, consumers, a start id or position) is refused for them.
//!
//! The response head (with `X-BUS-CONSUMER-ID`) is sent at once; then events as
//! `id:`/`event: msg`/`data:` frames, a `: ping` comment every ping interval, and, if the
//! subscription cannot go on (an unknown start id, or a token that expired or that a
//! reload of the credentials revoked), one `event: error` frame before the stream ends.
//! Shutting the server down ends every stream cleanly.
//!
//! The stream machinery (a place under `--max-subscriptions` and in the memory budget,
//! pings, the end at shutdown, the token's re-checks) also carries `/console/live`, the
//! web console's live figures.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::{stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;

use super::auth::{Operation, StreamAuth, Target, TokenId};
use super::error::{unavailable, ApiError};
use super::query::Params;
use super::AppState;
use crate::broker::{
    AckMode, ConsumerName, Delivery, Skipped, Start, SubscribeRequest, DEFAULT_MAX_DELIVERIES,
    DEFAULT_REDELIVERY, MAX_INFLIGHT, MAX_REDELIVERY,
};
use crate::duration::parse_go_duration;
use crate::event::validate_client_id;
use crate::memory::{MemoryBudget, Work};
use crate::subject::Pattern;
use crate::wire;
use crate::wire::param::{
    ACK, CONSUMER, MAX_INFLIGHT as MAX_INFLIGHT_PARAM, REDELIVERY, REDELIVERY_COUNT, START,
    SUBJECT, UNTIL, UNTIL_NOW, ZONE,
};
use crate::wire::{AckParam, MaxDeliveries, StartParam, HEADER_CONSUMER_ID, HEADER_LAST_EVENT_ID};

const PING: &[u8] = b": ping\n\n";
/// What one event stream holds at most while its subscriber does not read: the delivery
/// waiting to go out (from one read of the log: at most 256 KiB, or one larger event),
/// the next read, the stream's own state and what the allocator keeps around them
/// (measured: 290 to 425 KiB with reads of 256 KiB when connections also buffered 64 KiB;
/// see HTTP_API.md's limits). What a new subscription is
/// charged against the memory budget, and what a closed one reports freed.
pub const STREAM_MEMORY: usize = 512 << 10;
/// A delivery of one event this large is streamed from its buffer as it is; smaller
/// ones are copied (see `subscribe`).
const SHARE_FRAMES_FROM: usize = 64 << 10;
/// Ends a stream opened with `until=now`. Browsers drop events without data, so it has
/// some.
const DONE: &[u8] = b"event: done\ndata: end\n\n";

/// Reads the subscription request from the query string and headers.
pub fn parse_request(params: &Params, headers: &HeaderMap) -> Result<SubscribeRequest, ApiError> {
    let param = |name: &str| params.text(name);
    // Not trimmed: a pattern follows the grammar of subjects, in which a space is invalid
    // (publishing to " a.b" is refused, so subscribing to it is too).
    let subject = params.get(SUBJECT)?.unwrap_or("");
    if subject.is_empty() {
        return Err(ApiError::bad_request(
            "missing subject: subscribe with ?subject=<pattern>, e.g. ?subject=orders.>",
        ));
    }
    let pattern = Pattern::parse(subject).map_err(|e| ApiError::bad_request(e.to_string()))?;

    let last_event_id = headers
        .get(HEADER_LAST_EVENT_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let start = StartParam::from_query(|name| params.text(name))?;
    let start = match (last_event_id, start) {
        (Some(id), _) => Start::After(event_id(id, "Last-Event-ID")?),
        (None, StartParam::Oldest) => Start::Oldest,
        (None, StartParam::Newest) => Start::Newest,
        (None, StartParam::After(id)) => Start::After(event_id(&id, START)?),
        (None, StartParam::Index(position)) => Start::Position(position),
        (None, StartParam::Time(time)) => Start::Time(time),
    };

    // Parsed whatever the ack mode, so that a typo never goes unnoticed.
    let redelivery = match param(REDELIVERY)? {
        "" => DEFAULT_REDELIVERY,
        text => match parse_go_duration(text) {
            Ok(d) if d.is_zero() => DEFAULT_REDELIVERY,
            Ok(d) if d <= MAX_REDELIVERY => d,
            Ok(_) => {
                return Err(ApiError::bad_request(format!(
                    "{REDELIVERY}: {text:?} is longer than the longest allowed, {}",
                    crate::duration::format_go_duration(MAX_REDELIVERY)
                )))
            }
            Err(e) => return Err(ApiError::bad_request(format!("{REDELIVERY}: {e}"))),
        },
    };
    let max_deliveries = match param(REDELIVERY_COUNT)? {
        "" => MaxDeliveries(DEFAULT_MAX_DELIVERIES),
        text => MaxDeliveries::parse(text)?,
    };
    let max_inflight = match param(MAX_INFLIGHT_PARAM)? {
        "" => 1,
        text => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_INFLIGHT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{MAX_INFLIGHT_PARAM}: {text:?} is not a number from 1 to {MAX_INFLIGHT}"
                )))
            }
        },
    };
    let ack = match AckParam::parse(param(ACK)?)? {
        AckParam::None => AckMode::None,
        AckParam::Manual => AckMode::Manual {
            redelivery,
            max_deliveries: max_deliveries.limit(),
            max_inflight,
        },
    };
    let until_now = until_now(params)?;
    let zone = match param(ZONE)? {
        "" => None,
        zone => {
            if ack == AckMode::None {
                return Err(ApiError::bad_request(
                    "zone: only consumers with ack=manual confirm, so only they declare a zone",
                ));
            }
            Some(zone.to_owned())
        }
    };
    let consumer = match param(CONSUMER)? {
        "" => None,
        name => {
            if ack == AckMode::None {
                return Err(ApiError::bad_request(
                    "consumer: a durable consumer needs ack=manual",
                ));
            }
            Some(ConsumerName::parse(name).map_err(ApiError::bad_request)?)
        }
    };
    Ok(SubscribeRequest {
        pattern,
        start,
        ack,
        until_now,
        owner: None,
        admin: false,
        consumer,
        zone,
    })
}

fn event_id(text: &str, what: &str) -> Result<String, ApiError> {
    validate_client_id(text)
        .map(|()| text.to_owned())
        .map_err(|_| {
            ApiError::bad_request(format!(
                "{what}: {text:?} is neither oldest, newest nor an event id (e_…)"
            ))
        })
}

/// What a subscription request is checked for before it opens: who asks, whether the
/// request is well-formed, and whether they may. With authentication, also what the
/// stream re-checks while it runs.
fn admit(
    app: &AppState,
    params: &Params,
    headers: &HeaderMap,
) -> Result<(SubscribeRequest, Option<StreamAuth>), ApiError> {
    // Read before the token is checked: a reload in between is seen by the stream.
    let generation = app.auth.as_ref().map(|auth| auth.generation());
    let who = app.authenticate(headers, params)?;
    app.check_subject_len("the subject pattern", params.get(SUBJECT)?.unwrap_or(""))?;
    let mut request = parse_request(params, headers)?;
    let pattern = request.pattern.as_str();
    let namespace = request.pattern.namespace();
    app.authorize(who.as_ref(), Operation::Subscribe, Target::Pattern(pattern))?;
    let mut guard = stream_auth(app, who.as_ref(), generation);
    if let Some(guard) = &mut guard {
        guard.needs_pattern(Operation::Subscribe, pattern);
    }
    if request.ack != AckMode::None {
        // Manual acks are sent with the same token (see `PUT /`).
        app.authorize(who.as_ref(), Operation::Ack, Target::Namespace(namespace))?;
        if let Some(guard) = &mut guard {
            guard.needs_namespace(Operation::Ack, namespace);
        }
    }
    request.admin = request.consumer.is_some()
        && app
            .authorize(who.as_ref(), Operation::Admin, Target::Namespace(namespace))
            .is_ok();
    request.owner = who.map(|who| who.owner().clone());
    Ok((request, guard))
}

/// What a stream opened by `who` re-checks (see [`StreamAuth`]); `None` without
/// authentication.
pub(super) fn stream_auth(
    app: &AppState,
    who: Option<&TokenId>,
    generation: Option<u64>,
) -> Option<StreamAuth> {
    match (&app.auth, who, generation) {
        (Some(auth), Some(who), Some(generation)) => {
            Some(StreamAuth::new(Arc::clone(auth), who.clone(), generation))
        }
        _ => None,
    }
}

pub async fn subscribe(
    State(app): State<AppState>,
    method: Method,
    params: Params,
    headers: HeaderMap,
) -> Response {
    let subjects = params.all(SUBJECT);
    if subjects.len() > 1 {
        return subscribe_many(&app, method, &params, &headers, &subjects).await;
    }
    let (request, guard) = match admit(&app, &params, &headers) {
        Ok(admitted) => admitted,
        Err(e) => return e.into_response(),
    };
    if method == Method::HEAD {
        // The head a subscription would get, without subscribing: HEAD changes nothing
        // (no consumer is created, no stream held open).
        return event_stream_response(Body::empty(), None);
    }
    let permit = match stream_slot(&app) {
        Ok(permit) => permit,
        Err(refused) => return refused.into_response(),
    };
    let pattern = request.pattern.to_string();
    let namespace = request.pattern.namespace().to_owned();
    let subscription = match app.broker.subscribe(request).await {
        Ok(subscription) => subscription,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let lifetime = StreamLifetime::new(
        Some(&subscription.consumer_id),
        &pattern,
        permit,
        app.open_streams.opened(&[namespace]),
        Arc::clone(&app.memory),
    );

    // A delivery's frames become one buffer of their own, so that what the connection
    // holds for a subscriber that stopped reading is its bytes, not the whole read they
    // were cut from (a read of the log, a group of the writer). A large event is shared
    // as it is: its frame is most of its buffer.
    let frames = subscription.deliveries.map(|delivery| match delivery {
        Delivery::Events(events) => {
            let len = events.iter().map(|e| e.sse_frame().len()).sum();
            if let [one] = events.as_slice() {
                if len >= SHARE_FRAMES_FROM {
                    return one.sse_frame().clone();
                }
            }
            let mut buf = BytesMut::with_capacity(len);
            for event in &events {
                buf.extend_from_slice(event.sse_frame());
            }
            buf.freeze()
        }
        Delivery::Error(message) => error_frame(&message),
        Delivery::End => Bytes::from_static(DONE),
        Delivery::Skipped(skipped) => skipped_frames(skipped),
    });
    event_stream(
        &app,
        frames,
        Some(&subscription.consumer_id),
        lifetime,
        guard,
    )
}

/// What prefixes the `id:` of a stream of several subjects, and so its `Last-Event-ID`.
const CURSOR_PREFIX: &str = "cursor:";

/// A stream of several subject patterns, as asked for.
#[derive(Debug, PartialEq, Eq)]
struct ManyRequest {
    /// Each namespace with its patterns, in the order the request first names them.
    namespaces: Vec<(String, Vec<Pattern>)>,
    /// Where a namespace starts that the resumed cursor does not name (all of them when
    /// not resuming).
    start: Start,
    /// From `Last-Event-ID`: the next position to read in each namespace.
    resume: Vec<(String, u64)>,
    until_now: bool,
}

/// Reads a request with several `subject` parameters: one stream of all their events,
/// each namespace's in order. What only means something for one log (manual acks, a
/// durable consumer, a start id or position) is refused with a 400 that says so.
fn parse_many(
    params: &Params,
    headers: &HeaderMap,
    subjects: &[&str],
) -> Result<ManyRequest, ApiError> {
    let one_subject = |what: &str| {
        ApiError::bad_request(format!(
            "{what} needs a stream of one subject; open one stream per subject pattern for it"
        ))
    };
    if AckParam::parse(params.text(ACK)?)? == AckParam::Manual {
        return Err(one_subject("ack=manual"));
    }
    for name in [CONSUMER, ZONE, MAX_INFLIGHT_PARAM] {
        if !params.text(name)?.is_empty() {
            return Err(one_subject(name));
        }
    }
    let mut namespaces: Vec<(String, Vec<Pattern>)> = Vec::new();
    for &subject in subjects {
        if subject.is_empty() {
            return Err(ApiError::bad_request(
                "missing subject: every subject parameter needs a pattern, e.g. ?subject=orders.>&subject=chat.room1",
            ));
        }
        let pattern = Pattern::parse(subject).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if pattern.is_inbox() {
            return Err(one_subject("an inbox subject (_bus_.…)"));
        }
        let namespace = pattern.namespace().to_owned();
        match namespaces.iter_mut().find(|(ns, _)| *ns == namespace) {
            Some((_, patterns)) if !patterns.contains(&pattern) => patterns.push(pattern),
            Some(_) => {}
            None => namespaces.push((namespace, vec![pattern])),
        }
    }
    let start = match StartParam::from_query(|name| params.text(name))? {
        StartParam::Oldest => Start::Oldest,
        StartParam::Newest => Start::Newest,
        StartParam::Time(time) => Start::Time(time),
        StartParam::After(_) => return Err(one_subject("start=<event id>")),
        StartParam::Index(_) => return Err(one_subject("start_index")),
    };
    let resume = match headers
        .get(HEADER_LAST_EVENT_ID)
        .map(|v| v.to_str().map(str::trim))
    {
        None => Vec::new(),
        Some(Ok("")) => Vec::new(),
        Some(Ok(text)) => parse_cursor(text)?,
        Some(Err(_)) => return Err(bad_cursor("(not text)")),
    };
    let until_now = until_now(params)?;
    Ok(ManyRequest {
        namespaces,
        start,
        resume,
        until_now,
    })
}

/// `until=now`: end the stream once it has passed what was stored when it opened.
fn until_now(params: &Params) -> Result<bool, ApiError> {
    Ok(match params.text(UNTIL)? {
        "" => false,
        UNTIL_NOW => true,
        other => {
            return Err(ApiError::bad_request(format!(
                "{UNTIL}: {other:?} is not supported; use until=now to end the stream after the events already stored"
            )))
        }
    })
}

fn bad_cursor(text: &str) -> ApiError {
    ApiError::bad_request(format!(
        "Last-Event-ID: {text:?} is not the id of a stream of several subjects \
         ({CURSOR_PREFIX}<namespace>=<position>,…); resume with the last id the stream sent"
    ))
}

/// `cursor:orders=1042,chat=77`: the next position to read in each namespace.
fn parse_cursor(text: &str) -> Result<Vec<(String, u64)>, ApiError> {
    let pairs = text
        .strip_prefix(CURSOR_PREFIX)
        .ok_or_else(|| bad_cursor(text))?;
    pairs
        .split(',')
        .map(|pair| {
            let (namespace, position) = pair.split_once('=').ok_or_else(|| bad_cursor(text))?;
            let position = position.parse().map_err(|_| bad_cursor(text))?;
            if namespace.is_empty() {
                return Err(bad_cursor(text));
            }
            Ok((namespace.to_owned(), position))
        })
        .collect()
}

/// Appends one event's frame with the stream's cursor as its `id:` (every namespace's
/// next position, this event counted) instead of the event's own id, which its data
/// carries anyway.
fn push_cursor_frame(out: &mut BytesMut, namespaces: &[String], next: &[u64], frame: &[u8]) {
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(CURSOR_PREFIX.as_bytes());
    for (i, (namespace, position)) in namespaces.iter().zip(next).enumerate() {
        if i > 0 {
            out.extend_from_slice(b",");
        }
        out.extend_from_slice(namespace.as_bytes());
        out.extend_from_slice(b"=");
        out.extend_from_slice(position.to_string().as_bytes());
    }
    // The shared frame without its own `id:` line.
    let rest = frame
        .iter()
        .position(|&b| b == b'\n')
        .map_or(frame, |i| &frame[i..]);
    out.extend_from_slice(rest);
}

/// `GET /` with several `subject` parameters: one stream of the events of every pattern,
/// each namespace's in log order (one cursor per namespace, so an event two patterns
/// match comes once). Its `id:`s are cursors that name the next position in every
/// namespace, so a browser's `Last-Event-ID` resumes each exactly where it stopped.
async fn subscribe_many(
    app: &AppState,
    method: Method,
    params: &Params,
    headers: &HeaderMap,
    subjects: &[&str],
) -> Response {
    let admitted = (|| {
        let generation = app.auth.as_ref().map(|auth| auth.generation());
        let who = app.authenticate(headers, params)?;
        for subject in subjects {
            app.check_subject_len("the subject pattern", subject)?;
        }
        let request = parse_many(params, headers, subjects)?;
        let mut guard = stream_auth(app, who.as_ref(), generation);
        for pattern in request.namespaces.iter().flat_map(|(_, patterns)| patterns) {
            let pattern = pattern.as_str();
            app.authorize(who.as_ref(), Operation::Subscribe, Target::Pattern(pattern))?;
            if let Some(guard) = &mut guard {
                guard.needs_pattern(Operation::Subscribe, pattern);
            }
        }
        Ok::<_, ApiError>((request, guard))
    })();
    let (request, guard) = match admitted {
        Ok(admitted) => admitted,
        Err(e) => return e.into_response(),
    };
    if method == Method::HEAD {
        return event_stream_response(Body::empty(), None);
    }
    let permit = match stream_slot(app) {
        Ok(permit) => permit,
        Err(refused) => return refused.into_response(),
    };
    let mut names = Vec::new();
    let mut next = Vec::new();
    let mut streams = Vec::new();
    let mut consumer_id = None;
    for (namespace, patterns) in request.namespaces {
        let start = match request.resume.iter().find(|(ns, _)| *ns == namespace) {
            Some((_, position)) => Start::Position(*position),
            None => request.start.clone(),
        };
        let (subscription, position) = match app
            .broker
            .follow_patterns(patterns, start, request.until_now)
            .await
        {
            Ok(opened) => opened,
            Err(e) => return ApiError::from(e).into_response(),
        };
        let index = names.len();
        consumer_id.get_or_insert(subscription.consumer_id);
        streams.push(
            subscription
                .deliveries
                .map(move |delivery| (index, delivery)),
        );
        names.push(namespace);
        next.push(position);
    }
    let consumer_id = consumer_id.unwrap_or_default();
    let lifetime = StreamLifetime::new(
        Some(&consumer_id),
        &subjects.join(" "),
        permit,
        app.open_streams.opened(&names),
        Arc::clone(&app.memory),
    );
    let frames = async_stream::stream! {
        let mut merged = stream::select_all(streams);
        let mut ended = 0;
        while let Some((index, delivery)) = merged.next().await {
            match delivery {
                Delivery::Events(events) => {
                    let mut buf = BytesMut::new();
                    for event in &events {
                        next[index] = event.position() + 1;
                        push_cursor_frame(&mut buf, &names, &next, event.sse_frame());
                    }
                    yield buf.freeze();
                }
                Delivery::Skipped(skipped) => {
                    next[index] = next[index].max(skipped.next);
                    yield skipped_frames(skipped);
                }
                Delivery::Error(message) => {
                    yield error_frame(&message);
                    return;
                }
                Delivery::End => {
                    ended += 1;
                    if ended == names.len() {
                        yield Bytes::from_static(DONE);
                        return;
                    }
                }
            }
        }
    };
    event_stream(app, frames, Some(&consumer_id), lifetime, guard)
}

/// A place for one more event stream: within the memory budget and
/// `--max-subscriptions`, or the 503 that says which is spent.
pub(super) fn stream_slot(app: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    if let Err(refused) = app.memory.admit(Work::Subscribe, STREAM_MEMORY as u64) {
        return Err(super::over_memory_budget(refused, "subscriptions"));
    }
    Arc::clone(&app.subscriptions)
        .try_acquire_owned()
        .map_err(|_| {
            unavailable(format!(
                "the server is at its limit of {} open event streams (--max-subscriptions); retry shortly",
                app.limits.max_subscriptions
            ))
        })
}

/// The answer that streams `frames`, with pings between them, until they end, the client
/// leaves or the server shuts down; `lifetime` lives as long as the stream; `consumer_id`
/// is sent in `X-BUS-CONSUMER-ID` (streams that are no subscription have none). With `guard`,
/// before each event and ping the stream checks that its token is still accepted, and
/// ends with an `event: error` frame saying why once it is not (expired, or revoked by a
/// reload of the credentials).
pub(super) fn event_stream(
    app: &AppState,
    frames: impl futures_util::Stream<Item = Bytes> + Send + 'static,
    consumer_id: Option<&str>,
    lifetime: StreamLifetime,
    guard: Option<StreamAuth>,
) -> Response {
    // The subscription's end (an error, or the broker shutting down) ends the body; the
    // endless pings must not keep it open. Hence the `None` after the last frame.
    let frames = frames.map(Some).chain(stream::once(async { None }));
    let pings = ping_stream(app.ping_interval).map(Some);
    let mut shutdown = app.shutdown.clone();
    let body = stream::select(frames, pings)
        .scan((guard, false), |(guard, ended), frame| {
            if *ended {
                return std::future::ready(None);
            }
            let frame = match (frame, guard.as_mut().map(StreamAuth::check)) {
                (Some(_), Some(Err(reason))) => {
                    *ended = true;
                    tracing::debug!("ending an event stream: {reason}");
                    Some(error_frame(&reason))
                }
                (frame, _) => frame,
            };
            std::future::ready(frame)
        })
        .take_until(async move {
            let _ = shutdown.wait_for(|down| *down).await;
        })
        .map(move |frame| {
            let _ = &lifetime; // lives as long as the stream
            Ok::<Bytes, std::convert::Infallible>(frame)
        });
    event_stream_response(Body::from_stream(body), consumer_id)
}

/// `200` with the head of an event stream.
fn event_stream_response(body: Body, consumer_id: Option<&str>) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    if let Some(id) = consumer_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert(HEADER_CONSUMER_ID, id);
    }
    response
}

/// Event streams open now, by namespace (a stream of several namespaces counts in each):
/// the `subscribers` of `GET /namespaces`.
pub struct OpenStreams(BTreeMap<String, Arc<AtomicU64>>);

impl OpenStreams {
    /// No stream open yet in any of `namespaces` (the ones the server serves).
    pub fn new<'a>(namespaces: impl IntoIterator<Item = &'a str>) -> OpenStreams {
        OpenStreams(
            namespaces
                .into_iter()
                .map(|namespace| (namespace.to_owned(), Arc::default()))
                .collect(),
        )
    }

    /// Streams open now that read `namespace`.
    pub fn of(&self, namespace: &str) -> u64 {
        self.0
            .get(namespace)
            .map_or(0, |open| open.load(Ordering::Relaxed))
    }

    /// Counts one more stream in each of `namespaces` (inboxes are not counted); the
    /// counters to take it off again.
    fn opened(&self, namespaces: &[String]) -> Vec<Arc<AtomicU64>> {
        namespaces
            .iter()
            .filter_map(|namespace| self.0.get(namespace))
            .map(|open| {
                open.fetch_add(1, Ordering::Relaxed);
                Arc::clone(open)
            })
            .collect()
    }
}

/// Holds a stream's place under `--max-subscriptions` and in [`OpenStreams`], and logs
/// when the stream opens and when it is dropped (the client left, or the server shut
/// down), with the consumer id; tells the memory budget what a closed stream freed.
pub(super) struct StreamLifetime {
    span: tracing::Span,
    _permit: OwnedSemaphorePermit,
    counted_in: Vec<Arc<AtomicU64>>,
    memory: Arc<MemoryBudget>,
}

impl StreamLifetime {
    /// For a stream of `pattern` (or what else it streams), of the subscription
    /// `consumer_id` if it is one, counted in the namespaces of `counted_in`.
    pub(super) fn new(
        consumer_id: Option<&str>,
        pattern: &str,
        permit: OwnedSemaphorePermit,
        counted_in: Vec<Arc<AtomicU64>>,
        memory: Arc<MemoryBudget>,
    ) -> StreamLifetime {
        // Without authentication a consumer id is enough to ack its events, so the log
        // shows a digest that tells streams apart and acks nothing.
        let consumer = consumer_id.map(super::digest);
        let span = tracing::debug_span!("subscription", consumer, subject = pattern);
        tracing::debug!(parent: &span, "stream opened");
        StreamLifetime {
            span,
            _permit: permit,
            counted_in,
            memory,
        }
    }
}

impl Drop for StreamLifetime {
    fn drop(&mut self) {
        // Its buffers are free now; many streams closing make a trim worthwhile.
        self.memory.released(STREAM_MEMORY as u64);
        for open in &self.counted_in {
            open.fetch_sub(1, Ordering::Relaxed);
        }
        tracing::debug!(parent: &self.span, "stream closed");
    }
}

/// What a subscriber is told when retention removed events it was to read: a comment in
/// the reference's words (which its clients log), and an `event: skipped` a page can
/// listen to (EventSource hides comments) with the range as JSON ([`wire::Skipped`]).
fn skipped_frames(skipped: Skipped) -> Bytes {
    let range = wire::Skipped {
        first_index: skipped.first,
        last_index: skipped.last,
        next_index: skipped.next,
    };
    let data = serde_json::to_string(&range).unwrap_or_default();
    Bytes::from(format!(": {skipped}\n\nevent: skipped\ndata: {data}\n\n"))
}

/// `event: error` with the message on one `data:` line.
fn error_frame(message: &str) -> Bytes {
    Bytes::from(format!("event: error\ndata: {}\n\n", one_line(message)))
}

/// Text without line breaks, to fit one SSE line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect()
}

/// A `: ping` comment every `every` (the first after one interval).
fn ping_stream(every: Duration) -> impl futures_util::Stream<Item = Bytes> {
    stream::unfold(
        tokio::time::interval_at(tokio::time::Instant::now() + every, every),
        |mut interval| async move {
            interval.tick().await;
            Some((Bytes::from_static(PING), interval))
        },
    )
}
