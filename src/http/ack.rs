//! `PUT /?consumer_id=c_…&event_id=e_…`: acknowledge an event delivered under
//! `ack=manual`. Answers 202 whether or not anything was waiting for the ack (late acks
//! are normal); 400 if a parameter is missing or has the wrong prefix. With
//! `--auth-file`, only the token that opened the consumer may ack its events (403).

use std::collections::HashMap;

use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::Operation;
use super::error::ApiError;
use super::AppState;

pub async fn ack(
    State(app): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
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
    if !event_id.starts_with("e_") {
        return ApiError::bad_request(format!(
            "event_id: expected the id of the delivered event (e_…), got {event_id:?}"
        ))
        .into_response();
    }
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
    app.broker.ack(consumer_id, event_id);
    StatusCode::ACCEPTED.into_response()
}
