//! The router: webhook intake, the connection API and the probes, each with its body limits.

use axum::Router;

use calsync_common::health;

use crate::routes;
use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    // Ready = the broker can take webhooks; the database is reported but webhook intake does not need it.
    let probe = health::Probe {
        broker: state.broker.clone(),
        database: state.database.clone(),
        database_required: false,
        token_keys: None,
    };
    let body_deadline = state.settings.request_timeout();
    // Probes and scrapes carry no body.
    let no_body = routes::body::BodyLimits { max_bytes: 0, deadline: body_deadline };
    Router::new()
        .merge(routes::webhooks::router(state.settings.ingest_max_in_flight, body_deadline))
        .merge(routes::connect::router(state.clone(), body_deadline))
        .merge(routes::changes::router(state.clone(), body_deadline))
        .merge(
            health::router(probe).route_layer(axum::middleware::from_fn_with_state(no_body, routes::body::read_whole)),
        )
        .with_state(state)
}
