//! Turning failures into HTTP responses: a status code and a plain-text body that says
//! what to fix. The Go SDK uses the body as its error message, so it is one sentence.
//!
//! The statuses: 400 for the caller's mistakes, 401/403 for authentication, 404, 409 for
//! conflicts with what exists, 413 for sizes, 503 (always with `Retry-After`) when the
//! server cannot serve now — at a limit, shutting down, or its storage failed — 507 for a
//! full disk, 500 for anything else. Storage details go to the server's log, never into
//! a body.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::broker::{BrokerError, PublishError};
use crate::store::{ErrorKind, StorageError};

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

/// 503: the server cannot serve this now (a limit, shutdown, a storage failure); the
/// answer says when to retry.
pub fn unavailable(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
}

/// What a 503 suggests waiting before a retry, in seconds (`Retry-After`).
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
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of a body over the limit is not read, so the connection cannot
            // carry another request: said, so that a client does not put it back in its
            // pool and send the next request into a connection being closed.
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 is a "not now": it says when to ask again.
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static(RETRY_AFTER_SECONDS),
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
            BrokerError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
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

/// A storage failure, whatever the backend, by its kind: 507 when storage is full (the
/// client may retry later), 503 when it cannot take events now (shutting down, stopped
/// after a failure: another node, or this one once restarted, may take the retry), 413
/// for an event too large to store and 409 for an id that exists (the caller's doing:
/// their message is sent), 500 otherwise. The details of the server's own failures are
/// logged, not sent.
fn storage_error(error: &StorageError) -> ApiError {
    let (status, message) = match error.kind {
        ErrorKind::TooLarge => return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, &error.message),
        ErrorKind::Conflict => return ApiError::conflict(&error.message),
        ErrorKind::Full => (
            StatusCode::INSUFFICIENT_STORAGE,
            "the server's disk is full; the events were not stored: retry once space is freed",
        ),
        ErrorKind::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the server cannot store events now: it is shutting down, or its storage failed and it must be restarted (see its log and /readyz); the events were not stored",
        ),
        ErrorKind::NotFound | ErrorKind::Corrupt | ErrorKind::Internal => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "storing the events failed (see the server's log)",
        ),
    };
    tracing::error!(error = %error, "publish failed in the storage layer");
    ApiError::new(status, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(error: PublishError) -> Response {
        ApiError::from(error).into_response()
    }

    #[test]
    fn storage_errors_map_to_their_kind_of_answer_and_keep_details_private() {
        for (kind, status) in [
            (ErrorKind::Full, StatusCode::INSUFFICIENT_STORAGE),
            (ErrorKind::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            (ErrorKind::TooLarge, StatusCode::PAYLOAD_TOO_LARGE),
            (ErrorKind::Conflict, StatusCode::CONFLICT),
            (ErrorKind::Corrupt, StatusCode::INTERNAL_SERVER_ERROR),
            (ErrorKind::Internal, StatusCode::INTERNAL_SERVER_ERROR),
        ] {
            let error = StorageError::new(kind, "/data/app/00000000000000000000.log: details");
            let caller_s_own = matches!(kind, ErrorKind::TooLarge | ErrorKind::Conflict);
            let api = ApiError::from(PublishError::Storage(error));
            assert_eq!(api.status, status, "{kind:?}");
            assert_eq!(api.message.contains("/data/app"), caller_s_own, "{kind:?}");
            let response = api.into_response();
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                status == StatusCode::SERVICE_UNAVAILABLE
            );
        }
        // A halted or closing file log is unavailable: 503.
        for error in [
            crate::store::StoreError::Halted {
                namespace: "app".into(),
                cause: "syncing failed".into(),
            },
            crate::store::StoreError::Closed("app".into()),
        ] {
            let response = answer(PublishError::Storage(error.into()));
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], RETRY_AFTER_SECONDS);
        }
    }

    #[test]
    fn broker_errors_map_to_their_kind_of_answer() {
        for (error, status) in [
            (BrokerError::Invalid("x".into()), StatusCode::BAD_REQUEST),
            (BrokerError::Forbidden("x".into()), StatusCode::FORBIDDEN),
            (BrokerError::NotFound("x".into()), StatusCode::NOT_FOUND),
            (BrokerError::Conflict("x".into()), StatusCode::CONFLICT),
            (
                BrokerError::Storage("x".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ] {
            let response = ApiError::from(error).into_response();
            assert_eq!(response.status(), status);
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                status == StatusCode::SERVICE_UNAVAILABLE
            );
        }
    }
}
