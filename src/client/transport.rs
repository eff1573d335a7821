//! The HTTP under a [`Client`](super::Client), which it shares with the subscriptions and
//! events it hands out ([`Transport`]): how the reqwest client is built (token, trusted
//! certificates, TLS provider), sending with a bound on the wait, turning a refusal into
//! [`ClientError::Server`] with the server's own message, and the two requests a
//! subscription makes itself: opening its event stream and acknowledging.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use reqwest::header::HeaderValue;
use reqwest::{StatusCode, Url};
use serde_json::value::RawValue;

use super::error::ClientError;
use super::options::SubscribeOptions;
use crate::duration::format_go_duration;
use crate::wire::{param, HEADER_CONSUMER_ID, HEADER_LAST_EVENT_ID};

/// An event stream's body, as it arrives.
pub(super) type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A connection to one server. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub(super) struct Transport {
    pub(super) base: Url,
    pub(super) http: reqwest::Client,
    /// What `http` was built with, to build it again with one more setting.
    settings: HttpSettings,
    /// How long a request may wait for the server's answer.
    pub(super) timeout: Duration,
    /// The largest event (SSE message) a subscription buffers.
    pub(super) max_event_size: usize,
}

#[derive(Debug, Clone, Default)]
struct HttpSettings {
    /// `Authorization` on every request.
    token: Option<HeaderValue>,
    /// Certificate authorities trusted besides the system's.
    #[cfg(feature = "tls")]
    roots: Vec<reqwest::Certificate>,
}

impl Transport {
    /// A transport to the server at `base`, checked by the caller.
    pub(super) fn new(
        base: Url,
        timeout: Duration,
        max_event_size: usize,
    ) -> Result<Transport, ClientError> {
        let settings = HttpSettings::default();
        Ok(Transport {
            base,
            http: settings.client()?,
            settings,
            timeout,
            max_event_size,
        })
    }

    /// Presents `token` (a whole `Authorization` value) on every request from now on.
    pub(super) fn set_token(&mut self, token: HeaderValue) -> Result<(), ClientError> {
        self.settings.token = Some(token);
        self.http = self.settings.client()?;
        Ok(())
    }

    /// Trusts `roots` besides the system's certificate authorities from now on.
    #[cfg(feature = "tls")]
    pub(super) fn trust(&mut self, roots: Vec<reqwest::Certificate>) -> Result<(), ClientError> {
        self.settings.roots.extend(roots);
        self.http = self.settings.client()?;
        Ok(())
    }

    /// The server's address, without a trailing `/`.
    pub(super) fn host(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// The error for a request that failed on the way.
    pub(super) fn unreachable(&self, error: &reqwest::Error) -> ClientError {
        ClientError::unreachable(&self.base, error)
    }

    /// Sends `request` and waits at most `timeout` for the answer's head.
    pub(super) async fn send(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        match tokio::time::timeout(timeout, request.send()).await {
            Ok(answer) => answer.map_err(|e| self.unreachable(&e)),
            Err(_) => Err(ClientError::Timeout(format!(
                "the bus server at {} did not answer within {}",
                self.host(),
                format_go_duration(timeout)
            ))),
        }
    }

    /// `PUT /?consumer_id=…&event_id=…`, with a reply body or none.
    pub(super) async fn put_ack(
        &self,
        consumer_id: &str,
        event_id: &str,
        reply: Option<&RawValue>,
    ) -> Result<(), ClientError> {
        let mut url = self.base.clone();
        url.query_pairs_mut()
            .append_pair(param::CONSUMER_ID, consumer_id)
            .append_pair(param::EVENT_ID, event_id);
        let mut request = self.http.put(url);
        if let Some(reply) = reply {
            request = request.body(reply.get().to_owned());
        }
        let response = self.send(request, self.timeout).await?;
        expect_status(response, StatusCode::ACCEPTED)
            .await
            .map(drop)
    }

    /// Opens the event stream `options` ask for, resuming after `last_event_id` if given;
    /// the consumer id the server gave it, and its body.
    pub(super) async fn open_stream(
        &self,
        options: &SubscribeOptions,
        last_event_id: Option<&str>,
    ) -> Result<(String, ByteStream), ClientError> {
        let mut url = self.base.clone();
        url.query_pairs_mut().extend_pairs(options.query());
        let mut request = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header(HEADER_LAST_EVENT_ID, id);
        }
        let response = self.send(request, self.timeout).await?;
        let response = expect_status(response, StatusCode::OK).await?;
        let consumer_id = response
            .headers()
            .get(HEADER_CONSUMER_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((consumer_id, Box::pin(response.bytes_stream())))
    }
}

/// `response` if it has the `expected` status, else the server's refusal: its status
/// and plain-text explanation (or the status's reason when it gave none).
pub(super) async fn expect_status(
    response: reqwest::Response,
    expected: StatusCode,
) -> Result<reqwest::Response, ClientError> {
    let status = response.status();
    if status == expected {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let message = match text.trim() {
        "" => status
            .canonical_reason()
            .unwrap_or("no explanation")
            .to_owned(),
        text => text.to_owned(),
    };
    Err(ClientError::Server {
        status: status.as_u16(),
        message,
    })
}
impl HttpSettings {
    fn client(&self) -> Result<reqwest::Client, ClientError> {
        let mut builder = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10));
        #[cfg(feature = "tls")]
        {
            install_tls_provider();
            builder = builder.tls_certs_merge(self.roots.iter().cloned());
        }
        if let Some(token) = &self.token {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(reqwest::header::AUTHORIZATION, token.clone());
            builder = builder.default_headers(headers);
        }
        builder
            .build()
            .map_err(|e| ClientError::Protocol(format!("cannot set up HTTP: {e}")))
    }
}

/// Makes ring rustls's process-wide crypto provider, unless one is installed already.
///
/// With the `tls` feature, reqwest (in the whole program: cargo unifies its features)
/// uses rustls without a provider of its own, and panics when a `reqwest::Client` is
/// built before one is installed. A [`Client`](super::Client) calls this itself; a program
/// that builds its own reqwest clients calls it first (or installs the provider it
/// prefers).
///
/// ```
/// bus::client::install_tls_provider();
/// let http = reqwest::Client::new(); // would panic without a provider
/// # drop(http);
/// ```
#[cfg(feature = "tls")]
pub fn install_tls_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may have installed one meanwhile; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
