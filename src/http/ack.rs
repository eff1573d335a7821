//! `PUT /?consumer_id=c_…&event_id=e_…`: acknowledge an event delivered under
//! `ack=manual` (or several: `event_id=e_1,e_2,…`); with `nak=1[&delay=5s]`, ask for it
//! again (now, or after the delay) instead.
//!
//! A JSON body is a reply, published to the event's `response_subject` before the ack
//! (request/reply in one call). A reply is taken once, and only for an event that was
//! delivered to that connection and is not acknowledged yet (409 otherwise); with
//! authentication the acking token also needs `publish` on the reply's subject (an inbox
//! `_bus_.…` for request/reply).
//!
//! On a shared backend (JetStream, several nodes) an ack for a connection another node
//! holds is handed to that node; a reply is claimed there and published from here.
//!
//! Answers 202 whether or not anything was waiting for a plain ack (late acks are normal);
//! 400 if a parameter is missing, malformed or repeated. With authentication, the token
//! needs the `ack` grant (on the consumer's namespace when it is connected, on some
//! namespace when it is not), and only the token that opened the consumer may ack its
//! events (403).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::{Operation, Target, TokenId};
use super::error::ApiError;
use super::publish::read_body;
use super::query::Params;
use super::AppState;
use crate::broker::MAX_NAK_DELAY;
use crate::duration::{format_go_duration, parse_go_duration};
use crate::event::{compact_payload, MAX_PAYLOAD_DEPTH};
use crate::subject::Subject;
use crate::wire::param::{self, CONSUMER_ID, DELAY, EVENT_ID, NAK};

pub async fn ack(
    State(app): State<AppState>,
    params: Params,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match acknowledge(&app, &params, &headers, body).await {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(e) => e.into_response(),
    }
}

/// What a `PUT /` asks for.
struct AckRequest {
    consumer_id: String,
    event_ids: Vec<String>,
    /// `Some(delay)`: a negative ack.
    nak: Option<Duration>,
}

impl AckRequest {
    fn parse(params: &Params) -> Result<AckRequest, ApiError> {
        let consumer_id = params.text(CONSUMER_ID)?;
        if !consumer_id.starts_with("c_") {
            return Err(ApiError::bad_request(format!(
                "{CONSUMER_ID}: expected the X-BUS-CONSUMER-ID of the subscription (c_…), got {consumer_id:?}"
            )));
        }
        let event_ids: Vec<String> = params
            .text(EVENT_ID)?
            .split(',')
            .map(|id| id.trim().to_owned())
            .collect();
        if let Some(bad) = event_ids.iter().find(|id| !id.starts_with("e_")) {
            return Err(ApiError::bad_request(format!(
                "{EVENT_ID}: expected the id of a delivered event (e_…), or several separated by commas, got {bad:?}"
            )));
        }
        let nak = match param::parse_flag(NAK, params.text(NAK)?)? {
            false => None,
            true => match params.text(DELAY)? {
                "" => Some(Duration::ZERO),
                text => match parse_go_duration(text) {
                    Ok(delay) if delay <= MAX_NAK_DELAY => Some(delay),
                    Ok(_) => {
                        return Err(ApiError::bad_request(format!(
                            "{DELAY}: {text:?} is longer than the longest allowed, {}",
                            format_go_duration(MAX_NAK_DELAY)
                        )))
                    }
                    Err(e) => return Err(ApiError::bad_request(format!("{DELAY}: {e}"))),
                },
            },
        };
        Ok(AckRequest {
            consumer_id: consumer_id.to_owned(),
            event_ids,
            nak,
        })
    }
}

async fn acknowledge(
    app: &AppState,
    params: &Params,
    headers: &HeaderMap,
    body: Body,
) -> Result<(), ApiError> {
    let who = app.authenticate(headers, params)?;
    let request = AckRequest::parse(params)?;
    // A connection another node holds (on a shared backend): its acks are handed over.
    let held_here = app.broker.consumer(&request.consumer_id);
    let elsewhere = held_here.is_none() && app.broker.relays_acks();
    if app.auth.is_some() {
        let held = match &held_here {
            Some(held) => Some(held.clone()),
            None if elsewhere => app.broker.remote_consumer(&request.consumer_id).await?,
            None => None,
        };
        match held {
            Some((namespace, owner)) => {
                app.authorize(who.as_ref(), Operation::Ack, Target::Namespace(&namespace))?;
                if owner.as_ref() != who.as_ref().map(TokenId::owner) {
                    return Err(ApiError::forbidden(
                        "this consumer was opened with another token; only its own token may ack its events",
                    ));
                }
            }
            // Nothing waits for this ack, but only a token that may ack learns that.
            None => app.authorize(who.as_ref(), Operation::Ack, Target::Any)?,
        }
    }
    let limits = &app.limits;
    let body = read_body(body, limits.max_body, limits.body_timeout).await?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        reply(app, who.as_ref(), &request, &body).await?;
    }
    if elsewhere {
        app.broker
            .relay_ack(&request.consumer_id, request.event_ids, request.nak)
            .await?;
        return Ok(());
    }
    match request.nak {
        None => {
            app.broker.ack(&request.consumer_id, request.event_ids);
        }
        Some(delay) => {
            for id in request.event_ids {
                app.broker.nak(&request.consumer_id, id, delay);
            }
        }
    }
    Ok(())
}

/// Reply and ack in one call: the body is the reply's payload.
async fn reply(
    app: &AppState,
    who: Option<&TokenId>,
    request: &AckRequest,
    body: &Bytes,
) -> Result<(), ApiError> {
    let [event_id] = request.event_ids.as_slice() else {
        return Err(ApiError::bad_request(
            "a reply body goes with the ack of exactly one event (no nak)",
        ));
    };
    if request.nak.is_some() {
        return Err(ApiError::bad_request(
            "a reply body goes with the ack of exactly one event (no nak)",
        ));
    }
    let payload = match serde_json::from_slice::<&serde_json::value::RawValue>(body)
        .map(|raw| compact_payload(raw.get().as_bytes()))
    {
        Ok(Some(compact)) => compact,
        Ok(None) => {
            return Err(ApiError::bad_request(format!(
                "the reply nests arrays and objects more than {MAX_PAYLOAD_DEPTH} levels deep"
            )))
        }
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "the reply body is not JSON: {e}"
            )))
        }
    };
    let claim = app
        .broker
        .claim_reply(&request.consumer_id, event_id)
        .await?;
    // The reply is a publish to the event's response_subject: the acking token needs that
    // grant (inboxes are the namespace `_bus_`). Dropping the claim gives it back.
    let subject = Subject::parse(&claim.subject)
        .map_err(|e| ApiError::bad_request(format!("response_subject: {e}")))?;
    app.authorize(who, Operation::Publish, Target::Subject(subject.as_str()))?;
    app.broker.publish_reply(claim, &payload).await?;
    Ok(())
}
