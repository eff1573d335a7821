//! Admin endpoints for durable consumers, on a path the event API (all at `/`) never uses:
//!
//! - `GET /consumers/{namespace}` — JSON array of the namespace's durable consumers:
//!   `name`, `pattern`, `acked_floor`, `pending`, `lag`, `members`, `dead_letter_subject`.
//! - `DELETE /consumers/{namespace}/{name}` — ends its members' streams and forgets its
//!   progress: `204`, or `404` if there is no such consumer.
//!
//! With `--auth-file`, both need the `admin` operation on the namespace.

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::Operation;
use super::error::ApiError;
use super::AppState;

pub async fn list(
    State(app): State<AppState>,
    Path(namespace): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let allowed = app
        .authenticate(&headers, query.as_deref())
        .and_then(|who| app.authorize(who, Operation::Admin, Some(&namespace)));
    if let Err(denied) = allowed {
        return denied.into_response();
    }
    match app.broker.consumers(&namespace) {
        Ok(consumers) => match serde_json::to_string(&consumers) {
            Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
            Err(e) => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("listing consumers failed: {e}"),
            }
            .into_response(),
        },
        Err(message) => ApiError::bad_request(message).into_response(),
    }
}

pub async fn delete(
    State(app): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let allowed = app
        .authenticate(&headers, query.as_deref())
        .and_then(|who| app.authorize(who, Operation::Admin, Some(&namespace)));
    if let Err(denied) = allowed {
        return denied.into_response();
    }
    match app.broker.delete_consumer(&namespace, &name).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("namespace {namespace} has no consumer {name:?}"),
        }
        .into_response(),
        Err(message) => ApiError::bad_request(message).into_response(),
    }
}
