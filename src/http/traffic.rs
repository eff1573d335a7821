//! Answered requests counted by route and status (`bus_http_requests_total{route,code}`)
//! and authentication failures (`bus_auth_failures_total{reason}`).
//!
//! What it promises:
//! - A request's route is one of a fixed set ([`Route`]), told from its method and path
//!   alone — never the raw path — so the series stay few: routes × status codes seen.
//! - Counting is one relaxed atomic add in a table allocated when the server starts:
//!   nothing is allocated per request.
//! - Every answer is counted once, when its head is ready (an event stream when it opens):
//!   those of the router (counted in [`super::front`]) and those the connection code
//!   gives before any handler runs (a request head too large or malformed, a connection
//!   over `--max-connections`). What hyper refuses on its own on an HTTP/2 connection (a
//!   header block over the limit, a protocol error) is not counted.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{Method, StatusCode};

use crate::metrics::family;

/// What a request asks for, as counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /`
    Publish,
    /// `GET /` (and `HEAD /`)
    Subscribe,
    /// `PUT /`
    Ack,
    /// `/consumers/…`
    Consumers,
    /// `/namespaces`, `/namespaces/…`
    Namespaces,
    /// `/console`, `/console/…`: the web console's page, assets and live stats
    Console,
    /// `GET /metrics`
    Metrics,
    /// `/health`, `/healthz`
    Health,
    /// `/readyz`
    Ready,
    /// `/admin/reload`
    Reload,
    /// A CORS preflight, on any path.
    Options,
    /// Anything else: unknown paths, other methods on `/`, unreadable request heads.
    Other,
}

impl Route {
    pub const ALL: [Route; 12] = [
        Route::Publish,
        Route::Subscribe,
        Route::Ack,
        Route::Consumers,
        Route::Namespaces,
        Route::Console,
        Route::Metrics,
        Route::Health,
        Route::Ready,
        Route::Reload,
        Route::Options,
        Route::Other,
    ];

    /// The route of a request by `method` to `path` (without its query).
    pub fn of(method: &Method, path: &str) -> Route {
        if method == Method::OPTIONS {
            return Route::Options;
        }
        match path {
            "/" => match *method {
                Method::POST => Route::Publish,
                Method::GET | Method::HEAD => Route::Subscribe,
                Method::PUT => Route::Ack,
                _ => Route::Other,
            },
            "/metrics" => Route::Metrics,
            "/health" | "/healthz" => Route::Health,
            "/readyz" => Route::Ready,
            "/admin/reload" => Route::Reload,
            _ if path.starts_with("/consumers/") => Route::Consumers,
            "/namespaces" => Route::Namespaces,
            _ if path.starts_with("/namespaces/") => Route::Namespaces,
            "/console" => Route::Console,
            _ if path.starts_with("/console/") => Route::Console,
            _ => Route::Other,
        }
    }

    /// The route of a raw HTTP/1 request head (as much of it as was read), `Other` if its
    /// request line cannot be read.
    pub fn of_head(head: &[u8]) -> Route {
        let line = head.split(|&b| b == b'\r' || b == b'\n').next();
        let mut parts = line.unwrap_or_default().split(|&b| b == b' ');
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return Route::Other;
        };
        let path = target.split(|&b| b == b'?').next().unwrap_or_default();
        match (Method::from_bytes(method), std::str::from_utf8(path)) {
            (Ok(method), Ok(path)) => Route::of(&method, path),
            _ => Route::Other,
        }
    }

    /// Its `route` label.
    pub fn name(self) -> &'static str {
        match self {
            Route::Publish => "publish",
            Route::Subscribe => "subscribe",
            Route::Ack => "ack",
            Route::Consumers => "consumers",
            Route::Namespaces => "namespaces",
            Route::Console => "console",
            Route::Metrics => "metrics",
            Route::Health => "health",
            Route::Ready => "ready",
            Route::Reload => "reload",
            Route::Options => "options",
            Route::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Status codes counted apart: 100 to 599 (anything else is counted as 599).
const CODES: usize = 500;
const FIRST_CODE: usize = 100;

/// Why a request was refused by authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// `401`: no token, or one that is unknown, expired or revoked.
    Unauthenticated,
    /// `403`: a valid token without the grant for what it asked.
    Forbidden,
}

/// The counters, shared by every connection.
#[derive(Debug)]
pub struct Traffic {
    /// One per route and status code: `route * CODES + (code - 100)`.
    requests: Box<[AtomicU64]>,
    auth_failures: [AtomicU64; 2],
    /// `--access-log`: every answer is also logged (see [`super::access_log`]).
    access_log: bool,
}

impl Traffic {
    pub fn new(access_log: bool) -> Traffic {
        Traffic {
            requests: (0..Route::ALL.len() * CODES)
                .map(|_| AtomicU64::new(0))
                .collect(),
            auth_failures: Default::default(),
            access_log,
        }
    }

    /// Whether answers are logged (`--access-log`).
    pub fn access_log(&self) -> bool {
        self.access_log
    }

    /// Counts an answer.
    pub fn answered(&self, route: Route, status: StatusCode) {
        let code = usize::from(status.as_u16()).clamp(FIRST_CODE, FIRST_CODE + CODES - 1);
        self.requests[route.index() * CODES + code - FIRST_CODE].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request refused by authentication.
    pub fn auth_failed(&self, failure: AuthFailure) {
        self.auth_failures[failure as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Answers counted so far for `route` with `status`.
    pub fn count(&self, route: Route, status: u16) -> u64 {
        let code = usize::from(status).clamp(FIRST_CODE, FIRST_CODE + CODES - 1);
        self.requests[route.index() * CODES + code - FIRST_CODE].load(Ordering::Relaxed)
    }

    /// Writes `bus_http_requests_total` (the series counted so far) and
    /// `bus_auth_failures_total`.
    pub fn render(&self, out: &mut String) {
        family(
            out,
            "bus_http_requests_total",
            "counter",
            "Requests answered, by route and status code (event streams when they open).",
        );
        for route in Route::ALL {
            let counts = &self.requests[route.index() * CODES..][..CODES];
            for (offset, count) in counts.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let _ = writeln!(
                        out,
                        "bus_http_requests_total{{route=\"{}\",code=\"{}\"}} {count}",
                        route.name(),
                        offset + FIRST_CODE
                    );
                }
            }
        }
        family(
            out,
            "bus_auth_failures_total",
            "counter",
            "Requests refused by authentication: unauthenticated (401) or forbidden (403).",
        );
        for (reason, failure) in [
            ("unauthenticated", AuthFailure::Unauthenticated),
            ("forbidden", AuthFailure::Forbidden),
        ] {
            let _ = writeln!(
                out,
                "bus_auth_failures_total{{reason=\"{reason}\"}} {}",
                self.auth_failures[failure as usize].load(Ordering::Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_come_from_method_and_path_only() {
        assert_eq!(Route::of(&Method::POST, "/"), Route::Publish);
        assert_eq!(Route::of(&Method::GET, "/"), Route::Subscribe);
        assert_eq!(Route::of(&Method::HEAD, "/"), Route::Subscribe);
        assert_eq!(Route::of(&Method::PUT, "/"), Route::Ack);
        assert_eq!(Route::of(&Method::DELETE, "/"), Route::Other);
        assert_eq!(Route::of(&Method::OPTIONS, "/metrics"), Route::Options);
        assert_eq!(
            Route::of(&Method::DELETE, "/consumers/app/c1"),
            Route::Consumers
        );
        assert_eq!(Route::of(&Method::GET, "/namespaces"), Route::Namespaces);
        assert_eq!(
            Route::of(&Method::GET, "/namespaces/app"),
            Route::Namespaces
        );
        assert_eq!(Route::of(&Method::GET, "/console"), Route::Console);
        assert_eq!(Route::of(&Method::GET, "/console/live"), Route::Console);
        assert_eq!(Route::of(&Method::GET, "/consoles"), Route::Other);
        assert_eq!(Route::of(&Method::GET, "/healthz"), Route::Health);
        assert_eq!(Route::of(&Method::GET, "/health"), Route::Health);
        assert_eq!(Route::of(&Method::GET, "/readyz"), Route::Ready);
        assert_eq!(Route::of(&Method::POST, "/admin/reload"), Route::Reload);
        assert_eq!(Route::of(&Method::GET, "/secret-path"), Route::Other);
        assert_eq!(
            Route::of_head(b"POST /?access_token=x HTTP/1.1\r\nHost: a\r\n"),
            Route::Publish
        );
        assert_eq!(Route::of_head(b"GET /metrics HTTP/1.1\r\n"), Route::Metrics);
        assert_eq!(Route::of_head(b""), Route::Other);
        assert_eq!(Route::of_head(b"\xff\xfe"), Route::Other);
    }

    #[test]
    fn answers_are_counted_by_route_and_code() {
        let traffic = Traffic::new(false);
        traffic.answered(Route::Publish, StatusCode::ACCEPTED);
        traffic.answered(Route::Publish, StatusCode::ACCEPTED);
        traffic.answered(Route::Subscribe, StatusCode::SERVICE_UNAVAILABLE);
        traffic.auth_failed(AuthFailure::Forbidden);
        assert_eq!(traffic.count(Route::Publish, 202), 2);
        let mut out = String::new();
        traffic.render(&mut out);
        assert!(out.contains("bus_http_requests_total{route=\"publish\",code=\"202\"} 2\n"));
        assert!(out.contains("bus_http_requests_total{route=\"subscribe\",code=\"503\"} 1\n"));
        assert!(!out.contains("route=\"ack\""), "{out}");
        assert!(out.contains("bus_auth_failures_total{reason=\"forbidden\"} 1\n"));
        assert!(out.contains("bus_auth_failures_total{reason=\"unauthenticated\"} 0\n"));
    }
}
