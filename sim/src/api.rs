//! Calendly API v2 (the parts calsync touches), behind bearer auth, a per-user rate limit and the
//! injected faults.

use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::{FREE_PLAN_REQUESTS_PER_MINUTE, Plan, TOKEN_REQUESTS_PER_MINUTE};
use crate::model::{Subscription, Uris, World};
use crate::sim::Sim;

pub fn router() -> Router<Sim> {
    Router::new()
        .route("/users/me", get(users_me))
        .route("/scheduled_events", get(list_events))
        .route("/scheduled_events/{id}", get(get_event))
        .route("/scheduled_events/{id}/invitees", get(list_invitees))
        .route("/webhook_subscriptions", get(list_subscriptions).post(create_subscription))
        .route("/webhook_subscriptions/{id}", get(get_subscription).delete(delete_subscription))
}

/// Calendly's API error body: `{title, message}`.
pub(crate) fn api_error(status: StatusCode, title: &str, message: &str) -> Response {
    (status, Json(json!({ "title": title, "message": message }))).into_response()
}

type Answer = Result<(StatusCode, Value), Response>;

pub(crate) struct Rate {
    limit: u32,
    remaining: u32,
    reset_secs: u64,
}

type Windows = std::sync::Mutex<std::collections::HashMap<Uuid, (Instant, u32)>>;

/// Takes one request from `user`'s window in `windows` (a window starts at the first request after
/// the last one ended), or the spent window's rate.
fn take_from_window(windows: &Windows, user: Uuid, limit: u32, window_secs: u64) -> Result<Rate, Rate> {
    let mut buckets = windows.lock().expect("rate lock");
    let now = Instant::now();
    let (start, used) = buckets.entry(user).or_insert((now, 0));
    if now.duration_since(*start) >= Duration::from_secs(window_secs) {
        *start = now;
        *used = 0;
    }
    let reset_secs = window_secs.saturating_sub(now.duration_since(*start).as_secs()).max(1);
    if *used >= limit {
        return Err(Rate { limit, remaining: 0, reset_secs });
    }
    *used += 1;
    Ok(Rate { limit, remaining: limit - *used, reset_secs })
}

pub(crate) fn with_rate(mut response: Response, rate: &Rate) -> Response {
    let h = response.headers_mut();
    h.insert("X-RateLimit-Limit", HeaderValue::from(rate.limit));
    h.insert("X-RateLimit-Remaining", HeaderValue::from(rate.remaining));
    h.insert("X-RateLimit-Reset", HeaderValue::from(rate.reset_secs));
    response
}

impl Sim {
    /// Counts the call, adds latency, and applies a pending "fail the next N calls" for `endpoint`.
    pub(crate) async fn enter(&self, endpoint: &str) -> Result<(), Response> {
        *self.counters().calls.entry(endpoint.to_owned()).or_default() += 1;
        let faults = self.faults();
        let latency = faults.latency_ms
            + if endpoint == "token" { faults.token.latency_ms } else { 0 }
            + faults.endpoint_latency_ms.get(endpoint).copied().unwrap_or(0);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let mut fail_next = self.inner.fail_next.lock().expect("fail_next lock");
        if let Some((count, status)) = fail_next.get_mut(endpoint) {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            *count -= 1;
            if *count == 0 {
                fail_next.remove(endpoint);
            }
            let mut response = api_error(status, "Injected Failure", "the simulator was told to fail this call");
            if status == StatusCode::TOO_MANY_REQUESTS {
                response.headers_mut().insert("X-RateLimit-Reset", HeaderValue::from(1u32));
            }
            return Err(response);
        }
        Ok(())
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<Uuid, Response> {
        let invalid = || api_error(StatusCode::UNAUTHORIZED, "Unauthenticated", "The access token is invalid");
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(invalid)?;
        let world = self.world();
        let grant = world.access_tokens.get(token).ok_or_else(invalid)?;
        if grant.revoked {
            return Err(invalid());
        }
        if grant.expires_at <= OffsetDateTime::now_utc() {
            return Err(api_error(StatusCode::UNAUTHORIZED, "Unauthenticated", "The access token is expired"));
        }
        Ok(grant.user)
    }

    fn rate_limit(&self, user: Uuid) -> Result<Rate, Response> {
        let faults = self.faults();
        let plan = self.world().users.get(&user).map(|u| u.plan).unwrap_or_default();
        let limit = faults.rate_limit_per_minute.unwrap_or(match plan {
            Plan::Free => FREE_PLAN_REQUESTS_PER_MINUTE,
            Plan::Paid => self.config().rate_limit_per_minute,
        });
        let window = faults.rate_limit_window_secs.unwrap_or(60).max(1);
        take_from_window(&self.inner.rate, user, limit, window).map_err(|rate| {
            with_rate(api_error(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests", "Rate limit exceeded"), &rate)
        })
    }

    /// The token endpoint's window (Calendly's minute, or the `rate_limit_window_secs` fault).
    pub(crate) fn token_window_secs(&self) -> u64 {
        self.faults().rate_limit_window_secs.unwrap_or(60).max(1)
    }

    /// Takes one of `user`'s token requests (8 per window), or the spent window's rate. Locks only
    /// the token windows, so it may be called while the world is locked.
    pub(crate) fn take_token_request(&self, user: Uuid, window_secs: u64) -> Result<(), Rate> {
        take_from_window(&self.inner.token_rate, user, TOKEN_REQUESTS_PER_MINUTE, window_secs).map(|_| ())
    }

    /// Calendly's 429 for a token request over the user's budget, counted.
    pub(crate) fn refuse_token_request(&self, rate: Rate) -> Response {
        self.counters().token_rate_limited += 1;
        let body = json!({ "error": "rate_limited", "error_description": "Too many token requests" });
        with_rate((StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response(), &rate)
    }

    /// An injected failure, or `None`. 5xx answers carry the caller's real rate headers; an injected
    /// 429 says its window resets in one second.
    fn random_fault(&self, rate: &Rate) -> Option<Response> {
        let faults = self.faults();
        let roll: f64 = rand::random();
        if roll < faults.error_rate {
            let status = [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::BAD_GATEWAY, StatusCode::SERVICE_UNAVAILABLE]
                [rand::random_range(0..3usize)];
            return Some(with_rate(api_error(status, "Internal Server Error", "injected fault"), rate));
        }
        if roll < faults.error_rate + faults.rate_429 {
            let rate = Rate { limit: self.config().rate_limit_per_minute, remaining: 0, reset_secs: 1 };
            return Some(with_rate(
                api_error(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests", "injected fault"),
                &rate,
            ));
        }
        None
    }

    /// Calendly's answer to a token without the scope `endpoint` needs (the `missing_scopes` fault).
    fn scope_check(&self, endpoint: &str) -> Option<Response> {
        let required = match endpoint {
            "users_me" => "users:read",
            "get_event" | "list_events" | "list_invitees" => "scheduled_events:read",
            "list_subscriptions" | "get_subscription" => "webhooks:read",
            _ => "webhooks:write",
        };
        self.faults().token.missing_scopes.iter().any(|s| s == required).then(|| {
            let body = json!({
                "title": "Insufficient scope",
                "message": "The access token does not grant the required scope",
                "required_scopes": [required],
            });
            (StatusCode::FORBIDDEN, Json(body)).into_response()
        })
    }

    /// Runs one API call: counters, latency, auth, rate limit, faults, then `f` under the world
    /// lock with the caller's user id.
    async fn api(
        &self,
        endpoint: &str,
        headers: &HeaderMap,
        f: impl FnOnce(&mut World, &Uris, Uuid) -> Answer,
    ) -> Response {
        if let Err(response) = self.enter(endpoint).await {
            return response;
        }
        let user = match self.authenticate(headers) {
            Ok(user) => user,
            Err(response) => return response,
        };
        let rate = match self.rate_limit(user) {
            Ok(rate) => rate,
            Err(response) => {
                self.counters().rate_limited += 1;
                return response;
            }
        };
        if let Some(response) = self.random_fault(&rate) {
            return response;
        }
        if let Some(response) = self.scope_check(endpoint) {
            return with_rate(response, &rate);
        }
        let answer = {
            let mut world = self.world();
            f(&mut world, self.uris(), user)
        };
        let response = match answer {
            Ok((StatusCode::NO_CONTENT, _)) => StatusCode::NO_CONTENT.into_response(),
            Ok((status, body)) => (status, Json(body)).into_response(),
            Err(response) => response,
        };
        with_rate(response, &rate)
    }
}

fn not_found() -> Response {
    api_error(StatusCode::NOT_FOUND, "Resource Not Found", "The server could not find the requested resource.")
}

fn forbidden(message: &str) -> Response {
    api_error(StatusCode::FORBIDDEN, "Permission Denied", message)
}

fn bad_request(message: &str) -> Response {
    api_error(StatusCode::BAD_REQUEST, "Invalid Argument", message)
}

#[derive(Debug, Default, Deserialize)]
struct Page {
    /// A string because `serde(flatten)` inside a query hands numbers over as strings.
    count: Option<String>,
    page_token: Option<String>,
}

/// Calendly-style pagination over an already ordered list. The page token is an opaque offset.
fn paginate(items: Vec<Value>, page: &Page, next_base: &str) -> Result<Value, Response> {
    let count = match &page.count {
        Some(c) => c.parse::<usize>().map_err(|_| bad_request("count must be a number"))?,
        None => 20,
    };
    if count == 0 || count > 100 {
        return Err(bad_request("count must be between 1 and 100"));
    }
    let offset = match &page.page_token {
        Some(token) => token
            .strip_prefix("p")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| bad_request("invalid page_token"))?,
        None => 0,
    };
    let end = (offset + count).min(items.len());
    let slice = items.get(offset..end).map(<[Value]>::to_vec).unwrap_or_default();
    let next = (end < items.len()).then(|| format!("p{end}"));
    let previous = (offset > 0).then(|| format!("p{}", offset.saturating_sub(count)));
    let sep = if next_base.contains('?') { '&' } else { '?' };
    Ok(json!({
        "collection": slice,
        "pagination": {
            "count": slice.len(),
            "next_page": next.as_ref().map(|t| format!("{next_base}{sep}count={count}&page_token={t}")),
            "previous_page": previous.as_ref().map(|t| format!("{next_base}{sep}count={count}&page_token={t}")),
            "next_page_token": next,
            "previous_page_token": previous,
        }
    }))
}

async fn users_me(State(sim): State<Sim>, headers: HeaderMap) -> Response {
    sim.api("users_me", &headers, |world, uris, user| {
        let user = world.users.get(&user).ok_or_else(not_found)?;
        Ok((StatusCode::OK, json!({ "resource": world.user_json(uris, user) })))
    })
    .await
}

async fn get_event(State(sim): State<Sim>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    sim.api("get_event", &headers, |world, uris, user| {
        let event = id.parse::<Uuid>().ok().and_then(|id| world.events.get(&id)).ok_or_else(not_found)?;
        if !event.is_hosted_by(user) {
            return Err(forbidden("You do not have permission to access this resource."));
        }
        Ok((StatusCode::OK, json!({ "resource": world.event_json(uris, event) })))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct EventQuery {
    user: Option<String>,
    organization: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    min_start_time: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    max_start_time: Option<OffsetDateTime>,
    status: Option<String>,
    sort: Option<String>,
    #[serde(flatten)]
    page: Page,
}

async fn list_events(State(sim): State<Sim>, Query(q): Query<EventQuery>, headers: HeaderMap) -> Response {
    sim.api("list_events", &headers, |world, uris, user| {
        let filter_user = match (&q.user, &q.organization) {
            (Some(u), _) => {
                let id = Uris::id_of(u).ok_or_else(|| bad_request("invalid user"))?;
                if id != user {
                    return Err(forbidden("You do not have permission to access this resource."));
                }
                Some(id)
            }
            (None, Some(_)) => None,
            (None, None) => return Err(bad_request("user or organization is required")),
        };
        let org = world.users[&user].organization;
        let mut events: Vec<_> = world
            .events
            .values()
            .filter(|e| {
                filter_user.map_or_else(
                    || world.users.get(&e.host).is_some_and(|h| h.organization == org),
                    |u| e.is_hosted_by(u),
                )
            })
            .filter(|e| q.min_start_time.is_none_or(|t| e.start_time >= t))
            .filter(|e| q.max_start_time.is_none_or(|t| e.start_time < t))
            .filter(|e| q.status.as_deref().is_none_or(|s| e.status == s))
            .collect();
        events.sort_by_key(|e| (e.start_time, e.id));
        if q.sort.as_deref() == Some("start_time:desc") {
            events.reverse();
        }
        let items = events.into_iter().map(|e| world.event_json(uris, e)).collect();
        let mut base = format!("{}/scheduled_events?", uris.api);
        if let Some(u) = &q.user {
            base.push_str(&format!("user={u}"));
        }
        Ok((StatusCode::OK, paginate(items, &q.page, base.trim_end_matches('?'))?))
    })
    .await
}

async fn list_invitees(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Response {
    sim.api("list_invitees", &headers, |world, uris, user| {
        let event = id.parse::<Uuid>().ok().and_then(|id| world.events.get(&id)).ok_or_else(not_found)?;
        if !event.is_hosted_by(user) {
            return Err(forbidden("You do not have permission to access this resource."));
        }
        // Booking order is creation order, which is what Calendly pages by.
        let invitees: Vec<_> = world.invitees_of(event.id).collect();
        let items = invitees.into_iter().map(|i| world.invitee_json(uris, i, false)).collect();
        let base = format!("{}/invitees", uris.event(event.id));
        Ok((StatusCode::OK, paginate(items, &page, &base)?))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct NewSubscription {
    url: String,
    events: Vec<String>,
    organization: String,
    scope: String,
    user: Option<String>,
}

async fn create_subscription(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Json(body): Json<NewSubscription>,
) -> Response {
    sim.api("create_subscription", &headers, |world, uris, user| {
        let owner = &world.users[&user];
        let organization = Uris::id_of(&body.organization).ok_or_else(|| bad_request("invalid organization"))?;
        if organization != owner.organization {
            return Err(forbidden("You do not have permission to access this resource."));
        }
        let sub_user = match body.scope.as_str() {
            "user" => {
                let id = body
                    .user
                    .as_deref()
                    .and_then(Uris::id_of)
                    .ok_or_else(|| bad_request("user is required for scope user"))?;
                if id != user {
                    return Err(forbidden("You do not have permission to access this resource."));
                }
                Some(id)
            }
            "organization" => None,
            _ => return Err(bad_request("scope must be user or organization")),
        };
        if !owner.webhooks_enabled {
            return Err(forbidden("Please upgrade your Calendly account to Standard"));
        }
        if body.events.is_empty() || body.events.iter().any(|e| !crate::webhook::ALL_EVENTS.contains(&e.as_str())) {
            return Err(bad_request("events must be a non-empty list of supported events"));
        }
        // A disabled subscription does not hold its URL: it can be replaced before it is deleted.
        let duplicate = world.subscriptions.values().any(|s| {
            s.state == "active" && s.callback_url == body.url && s.organization == organization && s.user == sub_user
        });
        if duplicate {
            return Err(api_error(StatusCode::CONFLICT, "Already Exists", "Hook with this url already exists"));
        }
        let sub = Subscription {
            id: Uuid::new_v4(),
            callback_url: body.url,
            events: body.events,
            scope: body.scope,
            organization,
            user: sub_user,
            creator: user,
            state: "active",
            retry_started_at: None,
            created_at: OffsetDateTime::now_utc(),
        };
        let value = world.subscription_json(uris, &sub);
        world.subscriptions.insert(sub.id, sub);
        Ok((StatusCode::CREATED, json!({ "resource": value })))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct SubscriptionQuery {
    organization: Option<String>,
    scope: Option<String>,
    user: Option<String>,
    #[serde(flatten)]
    page: Page,
}

async fn list_subscriptions(
    State(sim): State<Sim>,
    Query(q): Query<SubscriptionQuery>,
    headers: HeaderMap,
) -> Response {
    sim.api("list_subscriptions", &headers, |world, uris, user| {
        let organization =
            q.organization.as_deref().and_then(Uris::id_of).ok_or_else(|| bad_request("organization is required"))?;
        if organization != world.users[&user].organization {
            return Err(forbidden("You do not have permission to access this resource."));
        }
        let filter_user = q.user.as_deref().and_then(Uris::id_of);
        let mut subs: Vec<_> = world
            .subscriptions
            .values()
            .filter(|s| s.organization == organization)
            .filter(|s| q.scope.as_deref().is_none_or(|scope| s.scope == scope))
            .filter(|s| filter_user.is_none_or(|u| s.user == Some(u)))
            .collect();
        subs.sort_by_key(|s| (s.created_at, s.id));
        let items = subs.into_iter().map(|s| world.subscription_json(uris, s)).collect();
        let base = format!("{}/webhook_subscriptions?organization={}", uris.api, uris.organization(organization));
        Ok((StatusCode::OK, paginate(items, &q.page, &base)?))
    })
    .await
}

fn owned_subscription<'w>(world: &'w World, id: &str, user: Uuid) -> Result<&'w Subscription, Response> {
    let sub = id.parse::<Uuid>().ok().and_then(|id| world.subscriptions.get(&id)).ok_or_else(not_found)?;
    if sub.organization != world.users[&user].organization || sub.user.is_some_and(|u| u != user) {
        return Err(forbidden("You do not have permission to access this resource."));
    }
    Ok(sub)
}

async fn get_subscription(State(sim): State<Sim>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    sim.api("get_subscription", &headers, |world, uris, user| {
        let sub = owned_subscription(world, &id, user)?;
        Ok((StatusCode::OK, json!({ "resource": world.subscription_json(uris, sub) })))
    })
    .await
}

async fn delete_subscription(State(sim): State<Sim>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    sim.api("delete_subscription", &headers, |world, _, user| {
        let sub_id = owned_subscription(world, &id, user)?.id;
        world.subscriptions.remove(&sub_id);
        Ok((StatusCode::NO_CONTENT, Value::Null))
    })
    .await
}
