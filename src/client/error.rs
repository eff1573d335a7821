//! [`ClientError`]: every way a client call can fail, each with a message that says what
//! happened in the caller's terms (the server's own words for a refusal).

use reqwest::Url;

/// Why a client call failed.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = bus::doc_support::server().await?; let host = server.host();
/// use bus::client::{Client, ClientError, NewEvent};
///
/// let client = Client::new(host)?;
/// // `billing` is not a namespace this server declares.
/// match client.publish(&NewEvent::new("billing.paid")).await {
///     Err(ClientError::Server { status, message }) => {
///         assert_eq!(status, 400);
///         assert!(message.contains("billing"), "{message}");
///     }
///     other => panic!("expected a refusal, got {other:?}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address given to [`Client::new`](super::Client::new) is not
    /// `http://host[:port]` or `https://host[:port]`.
    #[error("invalid server address {0:?}: use http://host:port or https://host:port")]
    InvalidHost(String),
    /// The certificate given to
    /// [`Client::with_root_certificate`](super::Client::with_root_certificate) is not
    /// usable.
    #[error("cannot use the CA certificate: {0}")]
    Certificate(String),
    /// The server could not be reached, or the connection broke; `reason` is the
    /// innermost cause (connection refused, reset, …).
    #[error("cannot reach the bus server at {host}: {reason}")]
    Unreachable {
        /// The server's address.
        host: String,
        /// What went wrong.
        reason: String,
    },
    /// The server refused the request; `message` is its explanation.
    #[error("the server refused the request ({status}): {message}")]
    Server {
        /// The HTTP status.
        status: u16,
        /// The server's plain-text explanation.
        message: String,
    },
    /// The server answered something this client does not understand, or a value could
    /// not be encoded or decoded.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The server ended a subscription with an error event.
    #[error("the server ended the subscription: {0}")]
    Subscription(String),
    /// A subscription's stream brought an event (or a line) larger than the client's
    /// limit ([`Client::with_max_event_size`](super::Client::with_max_event_size)); the
    /// subscription ends, since reconnecting would bring the same event again.
    #[error(
        "an event on the stream is larger than the client's limit of {limit} bytes \
         (Client::with_max_event_size); the subscription ends"
    )]
    EventTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The server did not answer in time, or the answers waited for did not all come.
    #[error("{0}")]
    Timeout(String),
}

impl ClientError {
    pub(super) fn unreachable(host: &Url, error: &reqwest::Error) -> ClientError {
        // reqwest's outer message is generic; the cause says what happened.
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason = cause.to_string();
            source = cause.source();
        }
        ClientError::Unreachable {
            host: host.as_str().trim_end_matches('/').to_owned(),
            reason,
        }
    }
}
