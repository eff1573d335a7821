//! The web console: a page for people, served by the server itself (off with
//! `--no-console`).
//!
//! - `GET /console` (and `/console/`) — the page; `GET /console/console.js` and
//!   `GET /console/console.css` — its script and style. Plain files in `console/`,
//!   compiled into the binary: no build step, no external URL, nothing fetched from
//!   elsewhere. They hold no data and no secret, so they are served to anyone; each with
//!   `Cache-Control: no-cache` (a new server's page replaces the old one) and a strict
//!   Content-Security-Policy (same-origin scripts, styles and connections only; no inline
//!   script or style, no framing), so that event data the page shows can never run.
//! - `GET /console/live` — what the page's overview and consumer views draw, as Server-
//!   Sent Events: an `event: stats` frame at once and then every [`STATS_EVERY`]
//!   ([`Stats`]). With authentication it needs the `admin` operation on at least one
//!   namespace, and shows the namespaces the token administers only (as
//!   `GET /namespaces`). It holds a place under `--max-subscriptions` and ends when the
//!   server shuts down or the token stops being accepted, as event streams do
//!   ([`super::subscribe`]).
//!
//! Everything else the page shows or does goes through the public endpoints with the
//! caller's token (`/namespaces`, `/consumers`, `GET /`, `POST /`), whose grants apply as
//! they do to any client.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream;
use serde::Serialize;

use super::auth::Operation;
use super::query::Params;
use super::subscribe::{event_stream, stream_auth, stream_slot, StreamLifetime};
use super::{consumers, namespaces, ops, AppState};
use crate::wire::{ConsumerInfo, NamespaceInfo};

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// How often the live stream sends the figures again: a rate over the interval is what
/// the page draws.
pub const STATS_EVERY: Duration = Duration::from_secs(2);

/// Only same-origin resources; no inline script or style, no plugins, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'";

/// The console's routes, merged into the router when it is on.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/console.js", get(script))
        .route("/console/console.css", get(style))
        .route("/console/live", get(live))
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// One `event: stats` frame of `/console/live`: the server and the namespaces the caller
/// administers, at one moment. Only the server writes it and only the console's script
/// reads it, so it is defined here rather than in [`crate::wire`], which holds what the
/// tools and the SDK share.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// The crate version.
    pub version: &'static str,
    /// The git commit the binary was built from (as `bus_build_info`).
    pub commit: &'static str,
    /// Whole seconds since the server started.
    pub uptime_seconds: u64,
    /// As `GET /readyz`: whether every namespace takes events.
    pub ready: bool,
    /// Why not, when not.
    pub ready_reason: Option<String>,
    /// As `GET /namespaces` answers them.
    pub namespaces: Vec<NamespaceInfo>,
    /// Events sent to subscribers since the server started, by namespace: the page draws
    /// its difference between frames as a rate.
    pub delivered: BTreeMap<String, u64>,
    /// Durable consumers by namespace, as `GET /consumers/{namespace}` lists them.
    pub consumers: BTreeMap<String, Vec<ConsumerInfo>>,
    /// What could not be read this time (a namespace or its consumers), so that the page
    /// says so rather than showing a namespace as gone.
    pub errors: Vec<String>,
}

async fn live(State(app): State<AppState>, params: Params, headers: HeaderMap) -> Response {
    // Read before the token is checked: a reload in between is seen by the stream.
    let generation = app.auth.as_ref().map(|auth| auth.generation());
    let who = match app.authenticate(&headers, &params) {
        Ok(who) => who,
        Err(denied) => return denied.into_response(),
    };
    let shown = match namespaces::administered(&app, who.as_ref()) {
        Ok(shown) => shown,
        Err(denied) => return denied.into_response(),
    };
    let mut guard = stream_auth(&app, who.as_ref(), generation);
    if let Some(guard) = &mut guard {
        for namespace in &shown {
            guard.needs_namespace(Operation::Admin, namespace);
        }
    }
    let permit = match stream_slot(&app) {
        Ok(permit) => permit,
        Err(refused) => return refused.into_response(),
    };
    let lifetime = StreamLifetime::new(
        None,
        "console",
        permit,
        Vec::new(),
        std::sync::Arc::clone(&app.memory),
    );
    // The first tick of an interval is at once: the page has figures as soon as it opens.
    let ticks = tokio::time::interval(STATS_EVERY);
    let frames = stream::unfold(
        (app.clone(), shown, ticks),
        |(app, shown, mut ticks)| async move {
            ticks.tick().await;
            let frame = stats_frame(&stats(&app, &shown).await);
            Some((frame, (app, shown, ticks)))
        },
    );
    let mut response = event_stream(&app, frames, None, lifetime, guard);
    // Proxies such as nginx otherwise hold the small frames back.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The figures of the namespaces in `shown` now.
async fn stats(app: &AppState, shown: &[String]) -> Stats {
    let ready = ops::readiness(app);
    let mut errors = Vec::new();
    let mut infos = Vec::with_capacity(shown.len());
    let mut listed = BTreeMap::new();
    for namespace in shown {
        // The consumers are listed once, for their own view and the namespace's count.
        let consumers = consumers::of(app, namespace).await;
        let info = match &consumers {
            Ok(list) => namespaces::describe_counting(app, namespace, list.len() as u64).await,
            Err(_) => namespaces::describe(app, namespace).await,
        };
        match info {
            Ok(info) => infos.push(info),
            Err(e) => errors.push(format!("namespace {namespace}: {}", e.message)),
        }
        match consumers {
            Ok(list) => {
                listed.insert(namespace.clone(), list);
            }
            Err(e) => errors.push(format!("consumers of {namespace}: {}", e.message)),
        }
    }
    let delivered = app
        .broker
        .counts()
        .delivered
        .into_iter()
        .filter(|(namespace, _)| shown.contains(namespace))
        .collect();
    Stats {
        version: env!("CARGO_PKG_VERSION"),
        commit: crate::metrics::BUILD_COMMIT,
        uptime_seconds: app.started.elapsed().as_secs(),
        ready: ready.is_ok(),
        ready_reason: ready.err(),
        namespaces: infos,
        delivered,
        consumers: listed,
        errors,
    }
}

/// `event: stats` with the figures as JSON on one `data:` line (serde_json escapes line
/// breaks inside strings, and writes none of its own).
fn stats_frame(stats: &Stats) -> Bytes {
    // Plain structs, strings and numbers: writing them cannot fail.
    let json = serde_json::to_string(stats).unwrap_or_default();
    Bytes::from(format!("event: stats\ndata: {json}\n\n"))
}
