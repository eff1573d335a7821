//! Namespace information, for operators and the tools (`bus info`):
//!
//! - `GET /namespaces` — a JSON array with each namespace the server serves (with
//!   authentication: each one the token has the `admin` operation on; a 403 if none).
//! - `GET /namespaces/{namespace}` — one namespace: `404` if the server does not serve
//!   it; with authentication, the `admin` operation on it.
//!
//! Both answer [`NamespaceInfo`]s: the log's retained range and usage and the durable
//! consumers from the broker, the event streams open on this server from
//! [`super::subscribe::OpenStreams`].

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::auth::{Operation, Target, TokenId};
use super::error::ApiError;
use super::query::Params;
use super::AppState;
use crate::wire::NamespaceInfo;

pub async fn list(State(app): State<AppState>, params: Params, headers: HeaderMap) -> Response {
    let who = match app.authenticate(&headers, &params) {
        Ok(who) => who,
        Err(denied) => return denied.into_response(),
    };
    let shown = match administered(&app, who.as_ref()) {
        Ok(shown) => shown,
        Err(denied) => return denied.into_response(),
    };
    let mut infos = Vec::with_capacity(shown.len());
    for namespace in &shown {
        match describe(&app, namespace).await {
            Ok(info) => infos.push(info),
            Err(e) => return e.into_response(),
        }
    }
    super::json_answer(&infos, "describing the namespaces")
}

/// The namespaces `who` has the `admin` operation on (all of them without
/// authentication); the refusal when that is none.
pub(super) fn administered(app: &AppState, who: Option<&TokenId>) -> Result<Vec<String>, ApiError> {
    let mut shown = Vec::new();
    let mut refusal = None;
    for namespace in app.broker.namespaces() {
        match app.authorize(who, Operation::Admin, Target::Namespace(namespace)) {
            Ok(()) => shown.push(namespace.to_owned()),
            Err(denied) => refusal = refusal.or(Some(denied)),
        }
    }
    match (shown.is_empty(), refusal) {
        (true, Some(denied)) => Err(denied),
        _ => Ok(shown),
    }
}

pub async fn one(
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
    match describe(&app, &namespace).await {
        Ok(info) => super::json_answer(&info, "describing the namespaces"),
        Err(e) => e.into_response(),
    }
}

/// What `GET /namespaces/{namespace}` answers.
pub(super) async fn describe(app: &AppState, namespace: &str) -> Result<NamespaceInfo, ApiError> {
    let info = app.broker.namespace_info(namespace).await?;
    Ok(with_subscribers(app, info))
}

/// [`describe`] for a caller that listed the namespace's durable consumers already (there
/// are `consumers` of them).
pub(super) async fn describe_counting(
    app: &AppState,
    namespace: &str,
    consumers: u64,
) -> Result<NamespaceInfo, ApiError> {
    let info = app
        .broker
        .namespace_info_counting(namespace, consumers)
        .await?;
    Ok(with_subscribers(app, info))
}

/// `info` with the event streams open on this server that read its namespace.
fn with_subscribers(app: &AppState, mut info: NamespaceInfo) -> NamespaceInfo {
    info.subscribers = app.open_streams.of(&info.namespace);
    info
}
