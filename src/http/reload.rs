//! `POST /admin/reload`: re-read the server's files (its credentials, its TLS certificate)
//! without a restart, as SIGHUP does (see [`crate::reload`]).
//!
//! With authentication on, it needs the `admin` grant in some namespace, any: reloading
//! grants nothing by itself (it re-reads files the operator wrote), and whoever may
//! administer consumers may need their new tokens to take effect. Without authentication
//! it is open, as every endpoint is. The answer is JSON, one entry per thing reloaded:
//! `{"ok":true,"steps":[{"name":"credentials","ok":true,"message":"auth file: 3 grants"}]}`,
//! `200` when every step took its new files, `500` when one kept its old ones (its
//! `message` says which file and why; the server's log has it too).

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::{Operation, Target};
use super::query::Params;
use super::AppState;

pub async fn reload(State(app): State<AppState>, params: Params, headers: HeaderMap) -> Response {
    if let Err(denied) = app.admit(&headers, &params, Operation::Admin, Target::Any) {
        return denied.into_response();
    }
    let report = app.reloader.reload("POST /admin/reload").await;
    let status = if report.ok() {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    let body = serde_json::json!({"ok": report.ok(), "steps": report.steps});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
