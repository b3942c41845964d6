//! `GET /changes`: the change feed, pulled (bearer `INTERNAL_API_TOKEN`). The cursor's guarantees
//! live in `calsync_common::db::changes`; this handler parses the query and maps the answers.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::{Json, Router};
use uuid::Uuid;

use calsync_common::db::changes::{self, Cursor, Page, ReadError};

use crate::error::ApiError;
use crate::routes::body::{self, BodyLimits};
use crate::routes::connect::admit;
use crate::state::AppState;

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;
/// Changes numbered per request before reading (the publisher numbers the rest): a reader is never
/// held up for long by a backlog, and sees what committed just before it asked.
const SEQUENCE_PER_READ: i64 = 10_000;

/// Behind the bearer check (outermost, like the connection API); a GET carries no body.
pub fn router(state: AppState, body_deadline: Duration) -> Router<AppState> {
    let no_body = BodyLimits { max_bytes: 0, deadline: body_deadline };
    Router::new()
        .route("/changes", get(read))
        .route_layer(from_fn_with_state(no_body, body::read_whole))
        .route_layer(from_fn_with_state(state, admit))
}

/// The query as sent; each value is parsed here so a wrong one is a 400 that names it.
#[derive(serde::Deserialize)]
struct RawQuery {
    after: Option<String>,
    limit: Option<String>,
    user_id: Option<String>,
}

struct FeedQuery {
    after: Option<Cursor>,
    limit: i64,
    user_id: Option<Uuid>,
}

impl TryFrom<RawQuery> for FeedQuery {
    type Error = ApiError;

    fn try_from(raw: RawQuery) -> Result<Self, ApiError> {
        let after = match raw.after.as_deref() {
            None | Some("") => None,
            Some(after) => Some(after.parse::<Cursor>().map_err(|e| ApiError::InvalidCursor(e.to_string()))?),
        };
        let limit = match raw.limit.as_deref() {
            None => DEFAULT_LIMIT,
            Some(limit) => limit
                .parse::<i64>()
                .ok()
                .filter(|l| (1..=MAX_LIMIT).contains(l))
                .ok_or_else(|| ApiError::BadRequest(format!("limit must be a number from 1 to {MAX_LIMIT}")))?,
        };
        let user_id = match raw.user_id.as_deref() {
            None => None,
            Some(id) => Some(Uuid::parse_str(id).map_err(|_| ApiError::BadRequest("user_id must be a UUID".into()))?),
        };
        Ok(Self { after, limit, user_id })
    }
}

async fn read(
    State(state): State<AppState>,
    query: Result<Query<RawQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(raw) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let query = FeedQuery::try_from(raw)?;
    let pool = state.database.pool();
    changes::sequence(pool, SEQUENCE_PER_READ).await.map_err(ApiError::database)?;
    match changes::read(pool, query.after, query.limit, query.user_id).await {
        Ok(page) => Ok(Json(page)),
        Err(ReadError::Expired) => Err(ApiError::CursorExpired(ReadError::Expired.to_string())),
        Err(ReadError::Unknown) => Err(ApiError::InvalidCursor(ReadError::Unknown.to_string())),
        Err(ReadError::Database(error)) => Err(ApiError::database(error)),
    }
}
