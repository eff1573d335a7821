//! `PUT /?consumer_id=c_…&event_id=e_…`: acknowledge an event delivered under
//! `ack=manual` (or several: `event_id=e_1,e_2,…`); with `nak=1[&delay=5s]`, ask for it
//! again (now, or after the delay) instead. A JSON body is a reply: it is published to
//! the event's `response_subject` before the ack (request/reply in one call). Answers 202 whether or not anything was waiting for the ack (late acks
//! are normal); 400 if a parameter is missing or has the wrong prefix. With
//! `--auth-file`, only the token that opened the consumer may ack its events (403).

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::Operation;
use super::error::ApiError;
use super::publish::read_body;
use super::AppState;
use crate::duration::parse_go_duration;
use crate::event::{compact_payload, MAX_PAYLOAD_DEPTH};

pub async fn ack(
    State(app): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let who = match app.authenticate(&headers, raw_query.as_deref()) {
        Ok(who) => who,
        Err(denied) => return denied.into_response(),
    };
    let param = |name: &str| query.get(name).map(|v| v.trim()).unwrap_or("");
    let consumer_id = param("consumer_id");
    let event_id = param("event_id");
    if !consumer_id.starts_with("c_") {
        return ApiError::bad_request(format!(
            "consumer_id: expected the X-BUS-CONSUMER-ID of the subscription (c_…), got {consumer_id:?}"
        ))
        .into_response();
    }
    let event_ids: Vec<String> = event_id.split(',').map(|id| id.trim().to_owned()).collect();
    if let Some(bad) = event_ids.iter().find(|id| !id.starts_with("e_")) {
        return ApiError::bad_request(format!(
            "event_id: expected the id of a delivered event (e_…), or several separated by commas, got {bad:?}"
        ))
        .into_response();
    }
    let nak = match param("nak") {
        "" | "0" | "false" => None,
        "1" | "true" => match param("delay") {
            "" => Some(Duration::ZERO),
            text => match parse_go_duration(text) {
                Ok(delay) => Some(delay),
                Err(e) => return ApiError::bad_request(format!("delay: {e}")).into_response(),
            },
        },
        other => {
            return ApiError::bad_request(format!("nak: {other:?} is not 1 or 0")).into_response()
        }
    };
    if app.auth.is_some() {
        // A consumer that is not connected has nothing to ack; only a connected one's
        // owner may ack for it.
        if let Some((namespace, owner)) = app.broker.consumer(consumer_id) {
            if let Err(denied) = app.authorize(who, Operation::Ack, Some(&namespace)) {
                return denied.into_response();
            }
            if owner != who {
                return ApiError {
                    status: StatusCode::FORBIDDEN,
                    message: "this consumer was opened with another token; only its own token may ack its events".into(),
                }
                .into_response();
            }
        }
    }
    let limits = &app.limits;
    let reply = match read_body(body, limits.max_body, limits.body_timeout).await {
        Ok(reply) => reply,
        Err(e) => return e.into_response(),
    };
    if !reply.iter().all(u8::is_ascii_whitespace) {
        // Reply and ack in one call: the body is the reply's payload.
        if nak.is_some() || event_ids.len() != 1 {
            return ApiError::bad_request(
                "a reply body goes with the ack of exactly one event (no nak)",
            )
            .into_response();
        }
        let payload = match serde_json::from_slice::<&serde_json::value::RawValue>(&reply)
            .map(|raw| compact_payload(raw.get().as_bytes()))
        {
            Ok(Some(compact)) => compact,
            Ok(None) => {
                return ApiError::bad_request(format!(
                    "the reply nests arrays and objects more than {MAX_PAYLOAD_DEPTH} levels deep"
                ))
                .into_response()
            }
            Err(e) => {
                return ApiError::bad_request(format!("the reply body is not JSON: {e}"))
                    .into_response()
            }
        };
        if let Err(message) = app
            .broker
            .reply_to(consumer_id, &event_ids[0], &payload)
            .await
        {
            return ApiError::bad_request(message).into_response();
        }
    }
    match nak {
        None => {
            app.broker.ack(consumer_id, event_ids);
        }
        Some(delay) => {
            for id in event_ids {
                app.broker.nak(consumer_id, id, delay);
            }
        }
    }
    StatusCode::ACCEPTED.into_response()
}
