//! `PUT /?consumer_id=c_…&event_id=e_…`: acknowledge an event delivered under
//! `ack=manual`. Answers 202 whether or not anything was waiting for the ack (late acks
//! are normal); 400 if a parameter is missing or has the wrong prefix.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

pub async fn ack(
    State(app): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
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
    app.broker.ack(consumer_id, event_id);
    StatusCode::ACCEPTED.into_response()
}
