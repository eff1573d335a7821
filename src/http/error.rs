//! Turning failures into HTTP responses: a status code and a plain-text body that says
//! what to fix. The Go SDK uses the body as its error message, so it is one sentence.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::broker::{BrokerError, PublishError};
use crate::store::StoreError;

/// A plain-text error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }
}

/// 503 with `Retry-After`: the server is at a limit, not broken; the client may retry.
pub fn at_limit(message: String) -> Response {
    let mut response = ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message,
    }
    .into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from_static(RETRY_AFTER_SECONDS),
    );
    response
}

/// What a 503 at a limit suggests waiting, in seconds.
pub const RETRY_AFTER_SECONDS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.message;
        body.push('\n');
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // A 401 says how to authenticate.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"bus\""),
            );
        }
        response
    }
}

impl From<BrokerError> for ApiError {
    fn from(error: BrokerError) -> ApiError {
        let status = match &error {
            BrokerError::Invalid(_) => StatusCode::BAD_REQUEST,
            BrokerError::Forbidden(_) => StatusCode::FORBIDDEN,
            BrokerError::NotFound(_) => StatusCode::NOT_FOUND,
            BrokerError::Conflict(_) => StatusCode::CONFLICT,
            BrokerError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, error.to_string())
    }
}

impl From<PublishError> for ApiError {
    fn from(error: PublishError) -> ApiError {
        match error {
            PublishError::Invalid(message) => ApiError::bad_request(message),
            PublishError::Duplicate(message) => ApiError {
                status: StatusCode::CONFLICT,
                message,
            },
            PublishError::Storage(error) => storage_error(&error),
        }
    }
}

/// A storage failure: 507 when the disk is full (the client may retry later), 503 when
/// the log is closing or halted, 500 otherwise. The details are logged, not sent.
fn storage_error(error: &StoreError) -> ApiError {
    tracing::error!(error = %error, "publish failed in the storage layer");
    let (status, message) = match error {
        StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => (
            StatusCode::INSUFFICIENT_STORAGE,
            "the server's disk is full; the events were not stored",
        ),
        StoreError::Closed(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down; the events were not stored",
        ),
        StoreError::Halted { .. } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the server stopped storing events after a storage failure and must be restarted (see its log)",
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "storing the events failed (see the server's log)",
        ),
    };
    ApiError {
        status,
        message: message.to_owned(),
    }
}
