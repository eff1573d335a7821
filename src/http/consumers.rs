//! Admin endpoints for durable consumers, on a path the event API (all at `/`) never uses:
//!
//! - `GET /consumers/{namespace}` — JSON array of the namespace's durable consumers:
//!   `name`, `pattern`, `acked_floor`, `pending`, `lag`, `members`, `dead_letter_subject`
//!   (on a shared backend, `members` counts the members on every node).
//! - `DELETE /consumers/{namespace}/{name}` — ends its members' streams and forgets its
//!   progress: `204`, or `404` if there is no such consumer.
//!
//! The name goes through the same validation as `consumer=` when subscribing (a 400
//! otherwise), so it can only ever name a consumer of the namespace in the path, the one
//! the caller is authorized on. With `--auth-file`, both need the `admin` operation on the
//! namespace.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::{Operation, Target};
use super::error::ApiError;
use super::query::Params;
use super::AppState;
use crate::broker::ConsumerName;
use crate::wire::ConsumerInfo;

pub async fn list(
    State(app): State<AppState>,
    Path(namespace): Path<String>,
    params: Params,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = app.admit(
        &headers,
        &params,
        Operation::Admin,
        Target::Namespace(&namespace),
    ) {
        return denied.into_response();
    }
    match of(&app, &namespace).await {
        Ok(consumers) => super::json_answer(&consumers, "listing consumers"),
        Err(e) => e.into_response(),
    }
}

/// The durable consumers of `namespace` as `GET /consumers/{namespace}` lists them (the
/// caller checked the grant).
pub(super) async fn of(app: &AppState, namespace: &str) -> Result<Vec<ConsumerInfo>, ApiError> {
    // Stored consumers are read from the namespace's directory: off the async workers.
    let broker = std::sync::Arc::clone(&app.broker);
    let name = namespace.to_owned();
    let listed = tokio::task::spawn_blocking(move || broker.consumers(&name))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("listing consumers failed: {e}"),
            )
        })?;
    let mut consumers = listed?;
    app.broker
        .add_members_elsewhere(namespace, &mut consumers)
        .await;
    Ok(consumers)
}

pub async fn delete(
    State(app): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
    params: Params,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = app.admit(
        &headers,
        &params,
        Operation::Admin,
        Target::Namespace(&namespace),
    ) {
        return denied.into_response();
    }
    let name = match ConsumerName::parse(&name) {
        Ok(name) => name,
        Err(message) => return ApiError::bad_request(message).into_response(),
    };
    match app.broker.delete_consumer(&namespace, &name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
