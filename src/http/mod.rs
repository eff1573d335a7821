//! The HTTP front end: one path, `/`, four methods.
//!
//! - `POST /` publishes ([`publish`]), `GET /` subscribes with Server-Sent Events
//!   ([`subscribe`]), `PUT /` acknowledges ([`ack`]); `OPTIONS` on any path answers CORS
//!   preflights.
//! - `/console` is the web console, a page for people over the same endpoints
//!   ([`console`]; off with `--no-console`).
//! - `GET /healthz` (and `/health`), `GET /readyz` and `GET /metrics` are for operators
//!   ([`ops`]; not in the reference), as are `/consumers` ([`consumers`]),
//!   `/namespaces` ([`namespaces`]) and `POST /admin/reload` ([`reload`]).
//! - Every response carries the same CORS headers, so browsers on any origin can publish,
//!   subscribe and read the `X-BUS-*` headers.
//! - Every answer is counted by route and status ([`traffic`]) and, with `--access-log`,
//!   logged ([`access_log`]), in one place: [`front`], the router's outermost layer.
//!
//! This layer parses and formats; the semantics live in [`crate::broker`].

pub mod access_log;
pub mod ack;
pub mod auth;
pub mod connection;
pub mod console;
pub mod consumers;
pub mod error;
pub mod http2;
pub mod namespaces;
pub mod ops;
pub mod publish;
pub mod query;
pub mod reload;
pub mod serve;
pub mod subscribe;
pub mod tls;
pub mod traffic;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::{watch, Semaphore};

use self::access_log::Entry;
use self::auth::{Authenticator, Operation, Target, TokenId};
use self::error::ApiError;
use self::query::Params;
use self::traffic::{AuthFailure, Route, Traffic};
use crate::broker::{Broker, INBOX_NAMESPACE};
use crate::memory::{MemoryBudget, Refused};
use crate::metrics::{self, Histogram, RetentionCounts};
use crate::reload::Reloader;
use crate::wire::{CORS_REQUEST_HEADERS, CORS_RESPONSE_HEADERS};

/// What a client may ask of the server (set by the server's flags).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Longest subject or pattern, in bytes.
    pub max_subject_len: usize,
    /// Connections served at once.
    pub max_connections: usize,
    /// Event streams open at once.
    pub max_subscriptions: usize,
    /// Longest deduplication key, in bytes.
    pub max_key_len: usize,
    /// Most events in one batch.
    pub max_batch: usize,
    /// How long a connection may go without sending a whole request head.
    pub idle_timeout: Duration,
    /// How long a request's body may take to arrive.
    pub body_timeout: Duration,
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub broker: Arc<Broker>,
    pub ping_interval: Duration,
    /// Turns true when the server shuts down; open streams end.
    pub shutdown: watch::Receiver<bool>,
    pub limits: Arc<Limits>,
    /// One permit per open event stream.
    pub subscriptions: Arc<Semaphore>,
    /// One permit per connection being served.
    pub connections: Arc<Semaphore>,
    /// Durations of publish requests, in µs.
    pub publish_micros: Arc<Histogram>,
    /// Who may do what, when requests are authenticated (`--auth-file`, `--jwt-…`).
    pub auth: Option<Arc<Authenticator>>,
    /// What `POST /admin/reload` re-reads (the server's reload steps).
    pub reloader: Arc<Reloader>,
    /// Origins allowed to read responses in browsers; `None`: any (`*`).
    pub cors_origins: Option<Arc<Vec<HeaderValue>>>,
    /// `--auth-cookie`: the cookie a browser's token may come in.
    pub auth_cookie: Option<Arc<str>>,
    /// The server's memory budget: new publishes and subscriptions wait while it is
    /// spent (`--max-memory`).
    pub memory: Arc<MemoryBudget>,
    /// The server's name (`--node-name`): the `node` label of its metrics.
    pub node: Arc<str>,
    /// Answers counted by route and status; whether they are logged (`--access-log`).
    pub traffic: Arc<Traffic>,
    /// What retention deleted, by namespace.
    pub retention: Arc<RetentionCounts>,
    /// Event streams open, by namespace.
    pub open_streams: Arc<subscribe::OpenStreams>,
    /// Whether `/console` is served (`--no-console` turns it off).
    pub console: bool,
    /// When the server started: its uptime, shown by the console.
    pub started: Instant,
}

impl AppState {
    pub fn new(
        broker: Arc<Broker>,
        ping_interval: Duration,
        shutdown: watch::Receiver<bool>,
        limits: Limits,
        memory: Arc<MemoryBudget>,
    ) -> AppState {
        let retention = RetentionCounts::new(broker.namespaces());
        AppState {
            retention: Arc::new(retention),
            open_streams: Arc::new(subscribe::OpenStreams::new(broker.namespaces())),
            broker,
            memory,
            ping_interval,
            shutdown,
            auth: None,
            reloader: Arc::new(Reloader::new()),
            cors_origins: None,
            auth_cookie: None,
            subscriptions: Arc::new(Semaphore::new(limits.max_subscriptions)),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            publish_micros: Arc::new(Histogram::new(metrics::DURATION_BOUNDS_MICROS)),
            limits: Arc::new(limits),
            node: Arc::from("bus"),
            traffic: Arc::new(Traffic::new(false)),
            console: true,
            started: Instant::now(),
        }
    }

    /// Who makes a request: `None` when requests are not authenticated, else the token's
    /// identity, or a 401.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        params: &Params,
    ) -> Result<Option<TokenId>, ApiError> {
        match &self.auth {
            None => Ok(None),
            Some(auth) => {
                let token = auth::presented_token(headers, params, self.auth_cookie.as_deref())?;
                auth.authenticate(token.as_deref()).map(Some)
            }
        }
    }

    /// A 403 unless `who` may do `operation` on `target` (always allowed without auth,
    /// when there is no `who`).
    pub fn authorize(
        &self,
        who: Option<&TokenId>,
        operation: Operation,
        target: Target<'_>,
    ) -> Result<(), ApiError> {
        match who {
            Some(who) => who.authorize(operation, target),
            None => Ok(()),
        }
    }

    /// Authenticates the request and checks that it may do `operation` on `target`.
    pub fn admit(
        &self,
        headers: &HeaderMap,
        params: &Params,
        operation: Operation,
        target: Target<'_>,
    ) -> Result<Option<TokenId>, ApiError> {
        let who = self.authenticate(headers, params)?;
        self.authorize(who.as_ref(), operation, target)?;
        Ok(who)
    }

    /// A 400 if `subject` (a subject or pattern) is longer than allowed.
    pub fn check_subject_len(&self, what: &str, subject: &str) -> Result<(), ApiError> {
        check_subject_len(what, subject, self.limits.max_subject_len)
    }
}

/// A 400 if `subject` (named `what` in the message) is longer than `max` bytes.
pub fn check_subject_len(what: &str, subject: &str, max: usize) -> Result<(), ApiError> {
    if subject.len() > max {
        return Err(ApiError::bad_request(format!(
            "{what} is {} bytes long; this server accepts at most {max} (--max-subject-len)",
            subject.len()
        )));
    }
    Ok(())
}

/// 503: the memory budget is spent (`--max-memory`); `what` are the requests that wait.
pub(crate) fn over_memory_budget(refused: Refused, what: &str) -> ApiError {
    // Rounded up to whole MiB.
    let mib = |bytes: u64| {
        let rounded = bytes.checked_next_multiple_of(1 << 20).unwrap_or(bytes);
        crate::units::format_size(rounded.max(1 << 20))
    };
    error::unavailable(format!(
        "the server is at its memory budget ({} of {} in use, --max-memory); new {what} wait until memory is freed, retry shortly",
        mib(refused.used),
        mib(refused.budget),
    ))
}

/// A short digest of a secret-like value (a consumer id) for logs: it tells values apart
/// and cannot be used in their place.
pub(crate) fn digest(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route(
            "/",
            get(subscribe::subscribe)
                .post(publish::publish)
                .put(ack::ack),
        )
        .route("/health", get(ops::healthz))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/admin/reload", axum::routing::post(reload::reload))
        .route("/consumers/{namespace}", get(consumers::list))
        .route(
            "/consumers/{namespace}/{name}",
            axum::routing::delete(consumers::delete),
        )
        .route("/namespaces", get(namespaces::list))
        .route("/namespaces/{namespace}", get(namespaces::one));
    // Without the console its paths fall through to the 404 of any unknown path.
    let routes = if state.console {
        routes.merge(console::routes())
    } else {
        routes
    };
    routes
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), front))
        .with_state(state)
}

/// `200` with `value` as JSON, or a `500` saying that `what` failed (`listing consumers`)
/// if it cannot be written.
fn json_answer(value: &impl serde::Serialize, what: &str) -> Response {
    match serde_json::to_string(value) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what} failed: {e}"),
        )
        .into_response(),
    }
}

async fn not_found() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "not found: the bus API is served at / (POST publishes, GET subscribes, PUT acknowledges)".into(),
    }
    .into_response()
}

/// Every answer passes here, the router's outermost layer: it is counted by route and
/// status, a 401 or 403 of authentication counted as such, and with `--access-log` its
/// body is wrapped so that its line is written when it is done. One function with CORS,
/// so that an answer goes through one middleware only (each costs an allocation).
async fn front(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let route = Route::of(request.method(), request.uri().path());
    let entry = app.traffic.access_log().then(|| {
        Entry::start(&request, route, |namespace| {
            namespace == INBOX_NAMESPACE || app.broker.namespaces().any(|n| n == namespace)
        })
    });
    let (response, origin_refused) = cors(&app, request, next).await;
    let status = response.status();
    app.traffic.answered(route, status);
    // Only authentication answers 401, and 403 but for a refused origin.
    match status {
        StatusCode::UNAUTHORIZED => app.traffic.auth_failed(AuthFailure::Unauthenticated),
        StatusCode::FORBIDDEN if !origin_refused => app.traffic.auth_failed(AuthFailure::Forbidden),
        _ => {}
    }
    match entry {
        Some(entry) => entry.finish(response),
        None => response,
    }
}

/// CORS: with `--cors-origins` unset every origin may read responses (`*`, as the
/// reference); with a list, only those, and a request from another origin is refused
/// (browsers would hide the answer, but a simple POST would still have taken effect).
/// Preflights (`OPTIONS`) are answered here, for every path, by the same rules. Says
/// whether it refused the request's origin.
async fn cors(app: &AppState, request: Request, next: Next) -> (Response, bool) {
    let origin = request.headers().get(header::ORIGIN).cloned();
    let allow = match (&app.cors_origins, origin) {
        (None, _) => Some(HeaderValue::from_static("*")),
        (Some(_), None) => None,
        (Some(allowed), Some(origin)) if allowed.contains(&origin) => Some(origin),
        (Some(_), Some(origin)) => {
            let refused = ApiError {
                status: StatusCode::FORBIDDEN,
                message: format!(
                    "requests from origin {:?} are not allowed (--cors-origins)",
                    origin.to_str().unwrap_or("?")
                ),
            };
            return (refused.into_response(), true);
        }
    };
    let mut response = if request.method() == axum::http::Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    if app.cors_origins.is_some() {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    let Some(allow) = allow else {
        return (response, false);
    };
    if app.cors_origins.is_some() {
        // Only a listed origin is echoed here (never `*`), so its pages may send their
        // cookies (`--auth-cookie`) and EventSource's `withCredentials`.
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
    );
    let (allowed, exposed) = &*CORS_HEADER_VALUES;
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed.clone());
    headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, exposed.clone());
    (response, false)
}

/// The values of `Access-Control-Allow-Headers` and `-Expose-Headers`, made once from the
/// wire's header names: the bus's headers as the reference spells them (`X-BUS-…`), and
/// for requests also the standard ones a client sends.
static CORS_HEADER_VALUES: std::sync::LazyLock<(HeaderValue, HeaderValue)> =
    std::sync::LazyLock::new(|| {
        let sent = CORS_REQUEST_HEADERS.join(", ").to_ascii_uppercase();
        let allowed = format!("Content-Type, Authorization, Last-Event-ID, {sent}");
        let exposed = CORS_RESPONSE_HEADERS.join(", ").to_ascii_uppercase();
        // Header names are visible ASCII, which a header value can always carry.
        let value = |text: &str| {
            HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
        };
        (value(&allowed), value(&exposed))
    });
