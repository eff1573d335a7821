//! The HTTP front end: one path, `/`, four methods.
//!
//! - `POST /` publishes ([`publish`]), `GET /` subscribes with Server-Sent Events
//!   ([`subscribe`]), `PUT /` acknowledges ([`ack`]), `OPTIONS /` answers CORS preflights.
//! - `GET /health` answers `200 ok` while the server runs (for container health checks and
//!   load balancers; not in the reference).
//! - Every response carries the same CORS headers, so browsers on any origin can publish,
//!   subscribe and read the `X-BUS-*` headers.
//!
//! This layer parses and formats; the semantics live in [`crate::broker`].

pub mod ack;
pub mod error;
pub mod listener;
pub mod publish;
pub mod subscribe;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::broker::Broker;

pub const HEADER_EVENT_ID: &str = "x-bus-event-id";
pub const HEADER_EVENT_CREATED_AT: &str = "x-bus-event-created-at";
pub const HEADER_EVENT_INDEX: &str = "x-bus-event-index";
pub const HEADER_CONSUMER_ID: &str = "x-bus-consumer-id";

/// Largest request body accepted.
pub const MAX_BODY: usize = 8 << 20;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub broker: Arc<Broker>,
    pub ping_interval: Duration,
    /// Turns true when the server shuts down; open streams end.
    pub shutdown: watch::Receiver<bool>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/",
            get(subscribe::subscribe)
                .post(publish::publish)
                .put(ack::ack)
                .options(preflight),
        )
        .route("/health", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(add_cors_headers))
        .with_state(state)
}

async fn health() -> &'static str {
    "ok\n"
}

async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn not_found() -> Response {
    error::ApiError {
        status: StatusCode::NOT_FOUND,
        message: "not found: the bus API is served at / (POST publishes, GET subscribes, PUT acknowledges)".into(),
    }
    .into_response()
}

async fn add_cors_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(
            "Content-Type, X-BUS-EVENT-ID, X-BUS-EVENT-CREATED-AT, X-BUS-EVENT-INDEX, X-BUS-CONSUMER-ID",
        ),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "X-BUS-EVENT-ID, X-BUS-EVENT-CREATED-AT, X-BUS-EVENT-INDEX, X-BUS-CONSUMER-ID",
        ),
    );
    response
}
