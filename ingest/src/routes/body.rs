//! Every route reads its whole body under one size limit and one deadline, before its handler runs.
//!
//! tower-http's body timeout restarts with every frame, so a client trickling a byte a second never
//! trips it and holds its connection (and a graceful shutdown) for as long as it likes. Here the
//! deadline covers the whole body: past it the answer is `408` and the connection closes.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::error::ApiError;

/// What one group of routes accepts as a body.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// The most bytes a body may have (`413` past it).
    pub max_bytes: usize,
    /// The whole body must have arrived within this, counted from the end of the headers.
    pub deadline: Duration,
}

/// Middleware (`from_fn_with_state`): the request goes on with its body fully read, or is answered
/// `413` / `408` / `400` here.
pub async fn read_whole(State(limits): State<BodyLimits>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match read(body, limits).await {
        Ok(bytes) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Err(error) => error.into_response(),
    }
}

/// Reads `body` whole within `limits` (webhook intake calls it itself, to count what it answers).
pub async fn read(body: Body, limits: BodyLimits) -> Result<Bytes, ApiError> {
    let collected = tokio::time::timeout(limits.deadline, Limited::new(body, limits.max_bytes).collect()).await;
    match collected {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::PayloadTooLarge { limit: limits.max_bytes })
        }
        Ok(Err(error)) => Err(ApiError::BadRequest(format!("the request body could not be read: {error}"))),
        Err(_) => Err(ApiError::RequestTimeout),
    }
}
