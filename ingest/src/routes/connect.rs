//! The connection API (bearer `INTERNAL_API_TOKEN`) and the OAuth callback (a browser page).

use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use uuid::Uuid;

use calsync_common::db::connections::{Connection, ConnectionStatus, SubscriptionState, SyncStatus};

use crate::connect::{CalendlyAccount, Callback, ConnectError, PendingConnect};

use crate::error::ApiError;
use crate::routes::body::{self, BodyLimits};
use crate::state::AppState;

/// Bodies of the connection API are a few dozen bytes of JSON.
const API_MAX_BODY_BYTES: usize = 4 * 1024;

/// The connection API behind the bearer check, and the browser's OAuth callback. The bearer check
/// is the outermost layer: a request without the token is answered `401` before a byte of its body
/// is read, so nobody unauthenticated can hold a connection open by sending a body slowly.
pub fn router(state: AppState, body_deadline: Duration) -> Router<AppState> {
    let api_body = BodyLimits { max_bytes: API_MAX_BODY_BYTES, deadline: body_deadline };
    let api = Router::new()
        .route("/connections/calendly", post(begin))
        .route("/connections/calendly/{user_id}", get(status).delete(disconnect))
        .route("/connections/calendly/{user_id}/confirm", post(confirm))
        .route_layer(from_fn_with_state(api_body, body::read_whole))
        .route_layer(from_fn_with_state(state, admit));
    let browser_body = BodyLimits { max_bytes: 0, deadline: body_deadline };
    let browser = Router::new()
        .route("/oauth/calendly/callback", get(callback))
        .route_layer(from_fn_with_state(browser_body, body::read_whole));
    api.merge(browser)
}

/// Constant-time bearer check; the API is closed (503) until a token is configured.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = calsync_common::config::present(&state.settings.internal_api_token) else {
        return Err(ApiError::Unavailable {
            code: "connection_api_disabled",
            message: "INTERNAL_API_TOKEN is not set; the connection API is disabled".into(),
        });
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.expose_secret().as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// The connection API needs PostgreSQL; answer 503 at once while it is not there.
fn database_ready(state: &AppState) -> Result<(), ApiError> {
    if state.database.is_migrated() { Ok(()) } else { Err(ApiError::database("not migrated yet")) }
}

/// A connection API request may proceed once the bearer token matched, then the database is there.
pub async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match authorize(&state, request.headers()).and_then(|()| database_ready(&state)) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

fn api_error(error: ConnectError) -> ApiError {
    match error {
        ConnectError::Database(e) => ApiError::database(e),
        ConnectError::NotConfigured(var) => {
            ApiError::Unavailable { code: "not_configured", message: format!("{var} is not set") }
        }
        ConnectError::Calendly(e) => ApiError::Upstream(format!("Calendly: {e}")),
        ConnectError::PendingNotFound => ApiError::NotFound(ConnectError::PendingNotFound.to_string()),
        ConnectError::WrongUser => ApiError::Forbidden(ConnectError::WrongUser.to_string()),
        ConnectError::AccountTaken => ApiError::Conflict(ConnectError::AccountTaken.to_string()),
        other => {
            tracing::error!(error = %other, "connection API failed");
            ApiError::Internal
        }
    }
}

#[derive(serde::Deserialize)]
struct BeginRequest {
    user_id: Uuid,
}

async fn begin(
    State(state): State<AppState>,
    body: Result<Json<BeginRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(request) =
        body.map_err(|e| ApiError::BadRequest(format!("expected {{\"user_id\": \"<uuid>\"}}: {}", e.body_text())))?;
    let url = state.connect.begin(request.user_id).await.map_err(api_error)?;
    Ok(Json(serde_json::json!({ "authorize_url": url.as_str() })))
}

/// `GET /connections/calendly/{user_id}`: the connection as the app may see it — never a token
/// (not even ciphertext), nor internal bookkeeping. Every field is listed here on purpose.
#[derive(serde::Serialize)]
struct StatusBody {
    connected: bool,
    user_id: Uuid,
    provider: String,
    calendly_user_uri: Option<String>,
    calendly_organization_uri: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    token_expires_at: Option<OffsetDateTime>,
    status: ConnectionStatus,
    webhook_subscription_uri: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    last_synced_at: Option<OffsetDateTime>,
    last_error: Option<String>,
    /// What the worker's last subscription check found (asking Calendly on every status request
    /// would spend the user's API budget).
    subscription_state: Option<SubscriptionState>,
    /// Since when Calendly has been failing to deliver (while `subscription_state` is `failing`).
    #[serde(with = "time::serde::rfc3339::option")]
    subscription_failing_since: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    subscription_checked_at: Option<OffsetDateTime>,
    /// The last sync pass (backfill, resync or reconciliation); `null` before the first.
    sync: Option<SyncStatus>,
}

impl StatusBody {
    fn new(c: Connection, sync: Option<SyncStatus>) -> Self {
        Self {
            connected: c.status == ConnectionStatus::Active,
            user_id: c.user_id,
            provider: c.provider,
            calendly_user_uri: c.calendly_user_uri,
            calendly_organization_uri: c.calendly_organization_uri,
            token_expires_at: c.token_expires_at,
            status: c.status,
            webhook_subscription_uri: c.webhook_subscription_uri,
            last_synced_at: c.last_synced_at,
            last_error: c.last_error,
            subscription_state: c.subscription_state,
            subscription_failing_since: c.subscription_failing_since,
            subscription_checked_at: c.subscription_checked_at,
            sync,
        }
    }
}

async fn status(State(state): State<AppState>, Path(user_id): Path<Uuid>) -> Result<Response, ApiError> {
    match state.connect.status(user_id).await.map_err(api_error)? {
        Some((connection, sync)) => Ok(Json(StatusBody::new(connection, sync)).into_response()),
        None => Err(ApiError::NotFound(format!("user {user_id} never connected Calendly"))),
    }
}

#[derive(serde::Deserialize)]
struct ConfirmRequest {
    connect_id: String,
}

/// The app finishes a connect for the user its browser session belongs to.
async fn confirm(
    State(state): State<AppState>,
    Path(user_id): Path<Uuid>,
    body: Result<Json<ConfirmRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<CalendlyAccount>, ApiError> {
    let Json(request) =
        body.map_err(|e| ApiError::BadRequest(format!("expected {{\"connect_id\": \"...\"}}: {}", e.body_text())))?;
    Ok(Json(state.connect.confirm(user_id, &request.connect_id).await.map_err(api_error)?))
}

async fn disconnect(State(state): State<AppState>, Path(user_id): Path<Uuid>) -> Result<StatusCode, ApiError> {
    if state.connect.disconnect(user_id).await.map_err(api_error)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("user {user_id} never connected Calendly")))
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn page(status: StatusCode, title: &str, detail: &str) -> Response {
    page_with(status, title, &escape(detail))
}

/// `detail_html` must already be escaped.
fn page_with(status: StatusCode, title: &str, detail_html: &str) -> Response {
    let html = format!(
        "<!doctype html><meta charset=\"utf-8\"><title>{t}</title>\
         <body style=\"font-family:sans-serif;max-width:36em;margin:4em auto\"><h1>{t}</h1>{detail_html}</body>",
        t = escape(title),
    );
    (status, Html(html)).into_response()
}

/// Without a `CONNECT_RETURN_URL`: names the account that consented and hands over the one-time
/// connect id, which the app confirms for the user logged in on its side.
fn pending_page(account: &CalendlyAccount, connect_id: &str) -> Response {
    let who = match (&account.name, &account.email) {
        (Some(name), Some(email)) => format!("{name} ({email})"),
        (Some(one), None) | (None, Some(one)) => one.clone(),
        (None, None) => account.uri.clone(),
    };
    let detail = format!(
        "<p>Calendly confirmed the account <strong>{}</strong>. Return to the app to finish connecting it; \
         nothing is connected until the app confirms it for you.</p>\
         <p>Connect id (valid 10 minutes, once): <code id=\"connect_id\" data-connect-id=\"{id}\">{id}</code></p>",
        escape(&who),
        id = escape(connect_id),
    );
    page_with(StatusCode::OK, "Almost done", &detail)
}

async fn callback(State(state): State<AppState>, Query(query): Query<Callback>) -> Response {
    if !state.database.is_migrated() {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Please try again shortly",
            "calsync cannot store the connection right now.",
        );
    }
    match state.connect.complete(query).await {
        Ok(PendingConnect { connect_id, account }) => match state.settings.return_url() {
            Some(url) => {
                let mut url = url.clone();
                url.query_pairs_mut().append_pair("calendly", "pending").append_pair("connect_id", &connect_id);
                Redirect::to(url.as_str()).into_response()
            }
            None => pending_page(&account, &connect_id),
        },
        Err(error) => {
            let status = match &error {
                ConnectError::State(_) | ConnectError::MissingCode => StatusCode::BAD_REQUEST,
                ConnectError::Denied(_) => StatusCode::FORBIDDEN,
                ConnectError::AccountTaken => StatusCode::CONFLICT,
                // Not produced by the callback (only by the confirm call).
                ConnectError::PendingNotFound => StatusCode::NOT_FOUND,
                ConnectError::WrongUser => StatusCode::FORBIDDEN,
                ConnectError::Calendly(_) => StatusCode::BAD_GATEWAY,
                ConnectError::Database(_) | ConnectError::NotConfigured(_) => StatusCode::SERVICE_UNAVAILABLE,
                ConnectError::Crypto(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            tracing::warn!(%error, "Calendly connection not completed");
            let detail = match &error {
                ConnectError::Crypto(_) => "Something went wrong on our side. Please start again.".to_owned(),
                ConnectError::Database(_) => {
                    "calsync cannot store the connection right now. Please start again shortly.".to_owned()
                }
                other => format!("{other}. Nothing was stored; please start the connection again."),
            };
            page(status, "Calendly was not connected", &detail)
        }
    }
}
