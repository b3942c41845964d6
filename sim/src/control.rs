//! `/_sim/...`: the control API (not part of Calendly) that tests, the demo and the load generator
//! use to shape the simulated world and read what happened.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::sim::{Booking, Cancellation, FailNext, Faults, NewUser, Sim, SimError, SubscriptionChange};
use crate::webhook::DeliveryMode;

pub const PREFIX: &str = "/_sim";

pub fn router() -> Router<Sim> {
    Router::new()
        .route("/_sim", get(help))
        .route("/_sim/users", post(create_user).get(list_users))
        .route("/_sim/users/{user}/tokens", post(grant_tokens))
        .route("/_sim/users/{user}/subscriptions", post(subscribe))
        .route("/_sim/users/{user}/expire_tokens", post(expire_tokens))
        .route("/_sim/users/{user}/revoke_tokens", post(revoke_tokens))
        .route("/_sim/events", post(book))
        .route("/_sim/invitees/{id}/cancel", post(cancel))
        .route("/_sim/invitees/{id}/reschedule", post(reschedule))
        .route("/_sim/invitees/{id}/no_show", post(mark_no_show).delete(unmark_no_show))
        .route("/_sim/counters", get(counters))
        .route("/_sim/faults", get(get_faults).put(set_faults))
        .route("/_sim/fail_next", post(fail_next))
        .route("/_sim/delivery", put(set_delivery))
        .route("/_sim/deliveries", get(take_deliveries))
        .route("/_sim/authorize_requests", get(authorize_requests))
        .route("/_sim/subscriptions", get(subscriptions))
        .route("/_sim/subscriptions/{id}", put(change_subscription))
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        let status = match self {
            SimError::NotFound(_) => StatusCode::NOT_FOUND,
            SimError::BadRequest(_) => StatusCode::BAD_REQUEST,
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

type Answer = Result<Json<Value>, SimError>;

async fn help() -> Json<Value> {
    Json(json!({
        "about": "calendly-sim control API (not part of Calendly)",
        "routes": [
            "POST /_sim/users {name, email, organization?, webhooks_enabled?, plan?: free|paid}",
            "GET /_sim/users",
            "POST /_sim/users/{user}/tokens (a token pair, as after OAuth) | /expire_tokens | /revoke_tokens",
            "POST /_sim/users/{user}/subscriptions {url} (a user-scoped subscription to every event, without OAuth)",
            "POST /_sim/events {user, invitees: [{name, email}], name?, start_time?, duration_minutes?, location?, co_hosts?, webhook_lost?}",
            "POST /_sim/invitees/{id}/cancel {reason?, canceled_by?, canceler_type?}",
            "POST /_sim/invitees/{id}/reschedule {start_time?}",
            "POST|DELETE /_sim/invitees/{id}/no_show",
            "GET /_sim/counters",
            "GET|PUT /_sim/faults {latency_ms, error_rate, rate_429, rate_limit_per_minute, rate_limit_window_secs, token: {missing_scopes, latency_ms, expires_in}, endpoint_latency_ms: {endpoint: ms}}",
            "POST /_sim/fail_next {endpoint, count, status?}",
            "PUT /_sim/delivery {mode: send|capture}",
            "GET /_sim/deliveries (captured signed bodies; empties the list)",
            "GET /_sim/authorize_requests",
            "GET /_sim/subscriptions",
            "PUT /_sim/subscriptions/{id} {disabled?: bool, retry_started_at?: time|null, deleted?: bool}",
        ],
        "authorize": "GET /oauth/authorize?...&sim_user=<uuid|uri|email> approves as that user; &sim_deny=1 denies",
    }))
}

async fn create_user(State(sim): State<Sim>, Json(new): Json<NewUser>) -> Result<(StatusCode, Json<Value>), SimError> {
    Ok((StatusCode::CREATED, Json(sim.create_user(new)?)))
}

async fn list_users(State(sim): State<Sim>) -> Json<Value> {
    let world = sim.world();
    Json(json!(world.users.values().map(|u| world.user_json(sim.uris(), u)).collect::<Vec<_>>()))
}

#[derive(Debug, Deserialize)]
struct Subscribe {
    url: String,
}

async fn subscribe(
    State(sim): State<Sim>,
    Path(user): Path<String>,
    Json(body): Json<Subscribe>,
) -> Result<(StatusCode, Json<Value>), SimError> {
    Ok((StatusCode::CREATED, Json(sim.subscribe(&user, &body.url)?)))
}

async fn grant_tokens(State(sim): State<Sim>, Path(user): Path<String>) -> Answer {
    Ok(Json(sim.grant_tokens(&user)?))
}

async fn expire_tokens(State(sim): State<Sim>, Path(user): Path<String>) -> Answer {
    Ok(Json(json!({ "expired": sim.expire_tokens(&user)? })))
}

async fn revoke_tokens(State(sim): State<Sim>, Path(user): Path<String>) -> Answer {
    Ok(Json(json!({ "revoked": sim.revoke_tokens(&user)? })))
}

async fn book(State(sim): State<Sim>, Json(booking): Json<Booking>) -> Result<(StatusCode, Json<Value>), SimError> {
    Ok((StatusCode::CREATED, Json(sim.book(booking)?)))
}

async fn cancel(State(sim): State<Sim>, Path(id): Path<Uuid>, body: Option<Json<Cancellation>>) -> Answer {
    Ok(Json(sim.cancel(id, body.map(|b| b.0).unwrap_or_default())?))
}

#[derive(Debug, Default, Deserialize)]
struct Reschedule {
    #[serde(default, with = "time::serde::rfc3339::option")]
    start_time: Option<OffsetDateTime>,
}

async fn reschedule(State(sim): State<Sim>, Path(id): Path<Uuid>, body: Option<Json<Reschedule>>) -> Answer {
    Ok(Json(sim.reschedule(id, body.and_then(|b| b.0.start_time))?))
}

async fn mark_no_show(State(sim): State<Sim>, Path(id): Path<Uuid>) -> Answer {
    Ok(Json(sim.set_no_show(id, true)?))
}

async fn unmark_no_show(State(sim): State<Sim>, Path(id): Path<Uuid>) -> Answer {
    Ok(Json(sim.set_no_show(id, false)?))
}

async fn counters(State(sim): State<Sim>) -> Json<Value> {
    Json(sim.counters_json())
}

async fn get_faults(State(sim): State<Sim>) -> Json<Faults> {
    Json(sim.faults())
}

async fn set_faults(State(sim): State<Sim>, Json(faults): Json<Faults>) -> Json<Faults> {
    sim.set_faults(faults);
    Json(sim.faults())
}

async fn fail_next(State(sim): State<Sim>, Json(fail): Json<FailNext>) -> StatusCode {
    sim.fail_next(fail);
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct Delivery {
    mode: DeliveryMode,
}

async fn set_delivery(State(sim): State<Sim>, Json(d): Json<Delivery>) -> StatusCode {
    sim.set_delivery_mode(d.mode);
    StatusCode::NO_CONTENT
}

async fn take_deliveries(State(sim): State<Sim>) -> Json<Value> {
    Json(json!(sim.take_captured()))
}

async fn authorize_requests(State(sim): State<Sim>) -> Json<Value> {
    Json(json!(sim.authorize_requests()))
}

async fn subscriptions(State(sim): State<Sim>) -> Json<Value> {
    Json(json!(sim.subscriptions()))
}

async fn change_subscription(
    State(sim): State<Sim>,
    Path(id): Path<Uuid>,
    Json(change): Json<SubscriptionChange>,
) -> Answer {
    Ok(Json(sim.set_subscription(id, change)?))
}
