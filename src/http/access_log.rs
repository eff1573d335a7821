//! `--access-log`: one log line per answered request, at INFO with the target
//! `bus::access` and the message `access`.
//!
//! A line holds the method, the route (one of [`Route`]'s names, never the raw path), the
//! status, the body bytes sent (the answer's body, without its head or chunk framing, as
//! nginx's `body_bytes_sent`), the duration from the request's arrival to the end of its
//! answer, the HTTP version, the namespace when one is known (a publish's, a stream's, the
//! path's of `/consumers/…` and `/namespaces/…`; a stream of several namespaces lists
//! them comma-separated) and whether the answer's body was sent to its end (`complete`: false when the client
//! left first, as an event stream usually ends).
//!
//! What it promises:
//! - A line is written when the answer is done: for an event stream, when the stream ends
//!   (so it carries the stream's whole duration and bytes); a stream open now has no line
//!   yet (`bus_subscriptions_active` counts them).
//! - Never a token, a header or the query string: the path is reduced to its route and the
//!   namespace is written only if it is one the server serves.
//! - Off (the default), it costs nothing: [`super::front`] wraps no body.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::{Method, StatusCode, Version};
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::query::Params;
use super::traffic::Route;

/// The tracing target of access lines (`--log-level bus::access=off` hides them).
pub const TARGET: &str = "bus::access";

/// A namespace a handler learnt from the request's body (a publish's), for the access log:
/// put in the answer's extensions, only when access lines are written.
#[derive(Debug, Clone)]
pub struct LoggedNamespace(pub String);

/// A request being answered, as the access log will tell it.
#[derive(Debug)]
pub struct Entry {
    method: Method,
    route: Route,
    version: Version,
    namespace: Option<String>,
    started: Instant,
}

impl Entry {
    /// Starts the line of `request`; `served` says whether a namespace is one the server
    /// serves (only those are written).
    pub fn start(request: &Request, route: Route, served: impl Fn(&str) -> bool) -> Entry {
        let namespace = match route {
            Route::Subscribe => {
                let params = Params::parse(request.uri().query()).unwrap_or_default();
                let mut namespaces: Vec<&str> = Vec::new();
                for subject in params.all("subject") {
                    let namespace = subject.trim().split('.').next().unwrap_or_default();
                    if served(namespace) && !namespaces.contains(&namespace) {
                        namespaces.push(namespace);
                    }
                }
                (!namespaces.is_empty()).then(|| namespaces.join(","))
            }
            Route::Consumers | Route::Namespaces => request
                .uri()
                .path()
                .splitn(3, '/')
                .nth(2)
                .and_then(|rest| rest.split('/').next())
                .filter(|namespace| served(namespace))
                .map(str::to_owned),
            _ => None,
        };
        Entry {
            method: request.method().clone(),
            route,
            version: request.version(),
            namespace,
            started: Instant::now(),
        }
    }

    /// The answer, its body wrapped so that the line is written when it is done.
    pub fn finish(mut self, response: Response) -> Response {
        let (mut parts, body) = response.into_parts();
        if let Some(LoggedNamespace(namespace)) = parts.extensions.remove::<LoggedNamespace>() {
            self.namespace = Some(namespace);
        }
        let body = Body::new(Logged {
            body,
            status: parts.status,
            entry: self,
            bytes: 0,
            complete: false,
        });
        Response::from_parts(parts, body)
    }
}

/// An answer's body that counts what it yields and writes the access line when dropped:
/// once sent to its end, or when the connection gave up on it.
struct Logged {
    body: Body,
    status: StatusCode,
    entry: Entry,
    bytes: u64,
    complete: bool,
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // An answer without a body (a HEAD, a 204) is complete as it is.
        let complete = self.complete || self.body.is_end_stream();
        let entry = &self.entry;
        tracing::info!(
            target: TARGET,
            method = %entry.method,
            route = entry.route.name(),
            status = self.status.as_u16(),
            bytes = self.bytes,
            duration_ms = millis(entry.started),
            version = ?entry.version,
            namespace = entry.namespace.as_deref(),
            complete,
            "access"
        );
    }
}

/// An answer the connection code gave before any handler ran (a request head it could
/// not read, a connection over the limit): no method is known, nor always the route.
pub fn refused(route: Route, status: StatusCode, bytes: usize, started: Instant) {
    tracing::info!(
        target: TARGET,
        route = route.name(),
        status = status.as_u16(),
        bytes,
        duration_ms = millis(started),
        complete = true,
        "access"
    );
}

/// Milliseconds since `started`, to the microsecond.
fn millis(started: Instant) -> f64 {
    started.elapsed().as_micros() as f64 / 1000.0
}
