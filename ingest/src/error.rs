//! The one error type of the HTTP API. Each variant decides its status code; every error answer
//! is JSON `{"error": "<code>", "message": "..."}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use calsync_common::calendly::signature::SignatureError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "5";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// 413
    #[error("the body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 400
    #[error("{0}")]
    BadRequest(String),
    /// 408: the body did not arrive within `INGEST_REQUEST_TIMEOUT_SECS`.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// 503 with Retry-After
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    /// 401 on the connection API
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// 403: authenticated, but not this user's to do.
    #[error("{0}")]
    Forbidden(String),
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 409
    #[error("{0}")]
    Conflict(String),
    /// 409 from the change feed: the changes after this cursor were pruned.
    #[error("{0}")]
    CursorExpired(String),
    /// 400 from the change feed: not a cursor it gave out.
    #[error("{0}")]
    InvalidCursor(String),
    /// 502: Calendly answered something we cannot use.
    #[error("{0}")]
    Upstream(String),
    /// 500: logged with its cause, shown without it.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn database(error: impl std::fmt::Display) -> Self {
        tracing::warn!(%error, "database unavailable");
        Self::Unavailable { code: "database_unavailable", message: "the database is unavailable; retry later".into() }
    }
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Signature(e) => (StatusCode::UNAUTHORIZED, e.code()),
            Self::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::Unavailable { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, code),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::CursorExpired(_) => (StatusCode::CONFLICT, "cursor_expired"),
            Self::InvalidCursor(_) => (StatusCode::BAD_REQUEST, "invalid_cursor"),
            Self::Upstream(_) => (StatusCode::BAD_GATEWAY, "calendly_error"),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = Json(serde_json::json!({ "error": code, "message": self.to_string() }));
        let mut response = (status, body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        response
    }
}
