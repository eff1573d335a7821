//! `POST /`: publish one event (a JSON object) or an atomic batch (a JSON array).
//!
//! The body must be exactly one JSON value in valid UTF-8. Each event's `payload`, if
//! present, is any JSON value; it is stored compacted (insignificant whitespace removed),
//! so that it streams back as one SSE `data:` line. Answers `202 Accepted` with the
//! assigned id, creation time and index in `X-BUS-EVENT-*` headers (for a batch, those of
//! its last event).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::ApiError;
use super::{AppState, HEADER_EVENT_CREATED_AT, HEADER_EVENT_ID, HEADER_EVENT_INDEX, MAX_BODY};
use crate::broker::{NewEvent, Publication};
use crate::event::compact_json;
use crate::timestamp::Timestamp;

/// An event as clients send it. Fields the server assigns (`index`) and unknown fields
/// are ignored, as the reference server does.
#[derive(Deserialize)]
struct WireEvent {
    #[serde(default)]
    id: String,
    #[serde(default)]
    trace_id: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    response_subject: String,
    #[serde(default)]
    created_at: Option<String>,
    /// `null` is a payload like any other; only an absent member means "no payload".
    #[serde(default, deserialize_with = "crate::event::present_payload")]
    payload: Option<Box<RawValue>>,
}

/// Go's zero `time.Time`, which Go clients send when they leave `created_at` unset.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

impl WireEvent {
    fn into_new_event(self, position_in_batch: Option<usize>) -> Result<NewEvent, ApiError> {
        let which = || match position_in_batch {
            Some(i) => format!("event {i} of the batch: "),
            None => String::new(),
        };
        if self.subject.is_empty() {
            return Err(ApiError::bad_request(format!(
                "{}missing subject: every event needs one, like \"orders.created\"",
                which()
            )));
        }
        let created_at = match self.created_at.as_deref() {
            None | Some("") | Some(GO_ZERO_TIME) => None,
            Some(text) => Some(
                Timestamp::parse(text)
                    .map_err(|e| ApiError::bad_request(format!("{}created_at: {e}", which())))?,
            ),
        };
        Ok(NewEvent {
            id: (!self.id.is_empty()).then_some(self.id),
            trace_id: self.trace_id,
            key: self.key,
            subject: self.subject,
            response_subject: self.response_subject,
            created_at,
            payload: self.payload.map(|raw| compact_json(raw.get().as_bytes())),
        })
    }
}

/// Parses a publish body: one event object or an array of them.
pub fn parse_body(body: &[u8]) -> Result<Publication, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::bad_request("the body is not valid UTF-8"));
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let bad_json = |e: serde_json::Error| ApiError::bad_request(format!("invalid JSON body: {e}"));
    match first {
        Some(b'{') => {
            let event: WireEvent = serde_json::from_slice(body).map_err(bad_json)?;
            Ok(Publication::One(event.into_new_event(None)?))
        }
        Some(b'[') => {
            let events: Vec<WireEvent> = serde_json::from_slice(body).map_err(bad_json)?;
            if events.is_empty() {
                return Err(ApiError::bad_request(
                    "empty batch: send at least one event",
                ));
            }
            events
                .into_iter()
                .enumerate()
                .map(|(i, e)| e.into_new_event(Some(i)))
                .collect::<Result<_, _>>()
                .map(Publication::Batch)
        }
        None => Err(ApiError::bad_request(
            "empty body: send an event as a JSON object, or a batch as a JSON array",
        )),
        Some(_) => Err(ApiError::bad_request(
            "the body must be an event (a JSON object) or a batch (a JSON array)",
        )),
    }
}

pub async fn publish(State(app): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!(
                    "the body is larger than {} MiB; publish smaller events or split the batch",
                    MAX_BODY >> 20
                ),
            }
            .into_response()
        }
        Err(rejection) => {
            return ApiError {
                status: rejection.status(),
                message: format!("reading the body failed: {}", rejection.body_text()),
            }
            .into_response()
        }
    };
    let events = match parse_body(&body) {
        Ok(events) => events,
        Err(e) => return e.into_response(),
    };
    let published = match app.broker.publish(events).await {
        Ok(published) => published,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let mut headers = HeaderMap::new();
    if let Some(last) = published.last() {
        let values = [
            (HEADER_EVENT_ID, last.id.clone()),
            (HEADER_EVENT_CREATED_AT, last.created_at.to_string()),
            (HEADER_EVENT_INDEX, last.index.to_string()),
        ];
        for (name, value) in values {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
    }
    (StatusCode::ACCEPTED, headers).into_response()
}
