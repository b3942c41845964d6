//! `POST /webhooks/calendly`: verify the signature on the raw bytes, publish them unchanged with a
//! publisher confirm, and answer 202 only once the broker holds the message.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{BoxError, Router};
use time::OffsetDateTime;
use tower::ServiceBuilder;

use calsync_common::calendly::signature;
use calsync_common::queue::{Outgoing, PublishError, message};
use calsync_common::traces;
use tracing::Instrument;

use crate::error::ApiError;
use crate::routes::body::{self, BodyLimits};
use crate::state::AppState;

/// Calendly's payloads are a few KiB; anything this large is not a webhook.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Intake, bounded: at most `max_in_flight` requests at once (more are shed with 503 at once, never
/// queued in memory); the whole body must arrive within `body_deadline` (the handler reads it, see
/// [`body::read`], so a slow body still holds its in-flight slot only that long).
pub fn router(max_in_flight: usize, body_deadline: Duration) -> Router<AppState> {
    let bounded =
        ServiceBuilder::new().layer(HandleErrorLayer::new(overloaded)).load_shed().concurrency_limit(max_in_flight);
    let limits = BodyLimits { max_bytes: MAX_BODY_BYTES, deadline: body_deadline };
    let intake =
        post(move |state, headers, body| receive(state, headers, body, limits)).layer::<_, Infallible>(bounded);
    Router::new().route("/webhooks/calendly", intake)
}

/// A request past `INGEST_MAX_IN_FLIGHT` (the only error the layers above the handler produce).
async fn overloaded(error: BoxError) -> ApiError {
    tracing::debug!(%error, "webhook request shed");
    metrics::counter!("calsync_ingest_requests_total", "outcome" => "overloaded").increment(1);
    ApiError::Unavailable { code: "overloaded", message: "too many webhook requests in flight; retry later".into() }
}

/// Decrements the in-flight gauge however the request ends (including client disconnects).
struct InFlight;
impl InFlight {
    fn enter() -> Self {
        metrics::gauge!("calsync_ingest_in_flight_requests").increment(1.0);
        Self
    }
}
impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("calsync_ingest_in_flight_requests").decrement(1.0);
    }
}

async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
    limits: BodyLimits,
) -> Result<impl IntoResponse, ApiError> {
    let _in_flight = InFlight::enter();
    // The root of the webhook's trace (Calendly sends no trace context); no span at all with
    // traces off, so logs cost what they did.
    let span = if traces::enabled() {
        tracing::info_span!(
            "webhook receive",
            otel.name = "POST /webhooks/calendly",
            otel.kind = "server",
            http.request.method = "POST",
            http.route = "/webhooks/calendly",
            calsync.outcome = tracing::field::Empty,
            message_id = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    let result = accept(&state, &headers, body, limits).instrument(span.clone()).await;
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(ApiError::Signature(_)) => "unauthorized",
        Err(ApiError::PayloadTooLarge { .. }) => "too_large",
        Err(ApiError::BadRequest(_)) => "bad_request",
        Err(ApiError::RequestTimeout) => "timeout",
        Err(ApiError::Unavailable { .. }) => "unavailable",
        Err(_) => "error",
    };
    metrics::counter!("calsync_ingest_requests_total", "outcome" => outcome).increment(1);
    span.record("calsync.outcome", outcome);
    result
}

async fn accept(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    limits: BodyLimits,
) -> Result<impl IntoResponse + use<>, ApiError> {
    let body = body::read(body, limits).await?;
    let received_at = OffsetDateTime::now_utc();
    // A header that is not even visible ASCII cannot be a valid signature.
    let header = match headers.get(signature::HEADER) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| signature::SignatureError::Malformed)?),
    };
    state.verifier.verify(header, &body, received_at.unix_timestamp())?;

    // `Bytes` into `Vec` reuses the buffer when nothing else holds it; the id is the one the
    // message carries (hashed once).
    let mut message = message::webhook(body.into(), received_at);
    let message_id = message.message_id().to_owned();
    let publish = publish_span(state, &message, &message_id);
    message.properties = traces::inject(&publish, message.properties);
    let started = Instant::now();
    let published = state.broker.publish(&message).instrument(publish).await;
    metrics::histogram!("calsync_ingest_publish_seconds").record(started.elapsed().as_secs_f64());
    match published {
        Ok(()) => {
            tracing::debug!(%message_id, routing_key = %message.routing_key, "webhook queued");
            // Written out rather than built as a JSON value: the id is hex, nothing to escape.
            let answer = format!(r#"{{"status":"queued","message_id":"{message_id}"}}"#);
            Ok((StatusCode::ACCEPTED, [(header::CONTENT_TYPE, "application/json")], answer))
        }
        Err(error) => {
            tracing::warn!(%message_id, %error, "webhook not queued; answering 503 so Calendly retries");
            let code = match error {
                PublishError::Blocked => "broker_blocked",
                PublishError::Timeout(_) => "broker_timeout",
                _ => "broker_unavailable",
            };
            Err(ApiError::Unavailable { code, message: format!("the webhook was not queued: {error}; retry later") })
        }
    }
}

/// The producer span whose context the message carries (OTel's messaging conventions): the
/// worker's processing span is its child.
fn publish_span(state: &AppState, message: &Outgoing, message_id: &str) -> tracing::Span {
    if !traces::enabled() {
        return tracing::Span::none();
    }
    tracing::Span::current().record("message_id", message_id);
    tracing::info_span!(
        "publish",
        otel.name = "publish calsync",
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        "messaging.operation.type" = "send",
        messaging.destination.name = %state.broker.topology().exchange(),
        messaging.rabbitmq.destination.routing_key = %message.routing_key,
        messaging.message.id = %message_id,
        message_id = %message_id,
    )
}
