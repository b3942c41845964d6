//! Calendly's OAuth server: authorize (with a simulator-only way to pick who approves), the token
//! endpoint (authorization_code with PKCE, single-use rotating refresh tokens), and revoke.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::model::{AuthCode, Uris};
use crate::sim::{Sim, random_token};

/// Query parameter (simulator only) naming the user who approves: UUID, URI or email.
pub const SIM_USER_PARAM: &str = "sim_user";
/// Query parameter (simulator only) that makes the user press "Deny".
pub const SIM_DENY_PARAM: &str = "sim_deny";

pub fn router() -> Router<Sim> {
    Router::new()
        .route("/oauth/authorize", get(authorize))
        .route("/oauth/token", post(token))
        .route("/oauth/revoke", post(revoke))
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (status, Json(json!({ "error": error, "error_description": description }))).into_response()
}

fn with_query(base: &str, params: &[(&str, &str)]) -> String {
    let mut url = url::Url::parse(base).expect("redirect_uri was validated");
    url.query_pairs_mut().extend_pairs(params);
    url.to_string()
}

async fn authorize(State(sim): State<Sim>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    sim.inner.authorize_log.lock().expect("authorize log lock").push(json!(q));
    if let Err(response) = sim.enter("authorize").await {
        return response;
    }
    if q.get("client_id").map(String::as_str) != Some(sim.config().client_id.as_str()) {
        return (StatusCode::BAD_REQUEST, Html("<h1>Unknown client_id</h1>")).into_response();
    }
    let Some(redirect_uri) = q.get("redirect_uri").filter(|r| url::Url::parse(r).is_ok()) else {
        return (StatusCode::BAD_REQUEST, Html("<h1>Missing or invalid redirect_uri</h1>")).into_response();
    };
    if q.get("response_type").map(String::as_str) != Some("code") {
        return (StatusCode::BAD_REQUEST, Html("<h1>response_type must be code</h1>")).into_response();
    }
    let state = q.get("state").cloned().unwrap_or_default();
    if q.contains_key(SIM_DENY_PARAM) {
        let target = with_query(
            redirect_uri,
            &[("error", "access_denied"), ("error_description", "The user denied access"), ("state", &state)],
        );
        return Redirect::to(&target).into_response();
    }
    let Some(who) = q.get(SIM_USER_PARAM) else {
        return consent_page(&sim, &q);
    };
    let user = {
        let world = sim.world();
        let id = Uris::id_of(who).or_else(|| who.parse().ok());
        world.users.values().find(|u| Some(u.id) == id || u.email == *who).map(|u| u.id)
    };
    let Some(user) = user else {
        return (StatusCode::BAD_REQUEST, Html(format!("<h1>No simulated user {who}</h1>"))).into_response();
    };
    if q.contains_key("code_challenge") && q.get("code_challenge_method").map(String::as_str) != Some("S256") {
        let target = with_query(
            redirect_uri,
            &[
                ("error", "invalid_request"),
                ("error_description", "code_challenge_method must be S256"),
                ("state", &state),
            ],
        );
        return Redirect::to(&target).into_response();
    }
    let code = random_token();
    sim.world().codes.insert(
        code.clone(),
        AuthCode {
            user,
            redirect_uri: redirect_uri.clone(),
            code_challenge: q.get("code_challenge").cloned(),
            expires_at: OffsetDateTime::now_utc() + sim.config().auth_code_ttl,
            used: false,
        },
    );
    Redirect::to(&with_query(redirect_uri, &[("code", &code), ("state", &state)])).into_response()
}

/// Stands in for Calendly's consent screen: one "Approve as ..." link per user, and "Deny".
fn consent_page(sim: &Sim, q: &BTreeMap<String, String>) -> Response {
    let base: Vec<(String, String)> = q.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let link = |extra: (&str, &str)| {
        let mut url = url::Url::parse(&format!("{}/oauth/authorize", sim.uris().api)).expect("api url");
        url.query_pairs_mut()
            .extend_pairs(base.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .append_pair(extra.0, extra.1);
        url.to_string()
    };
    let world = sim.world();
    let mut html = String::from(
        "<!doctype html><title>Calendly (simulated) — authorize</title><h1>Allow access to your Calendly account?</h1><ul>",
    );
    for user in world.users.values() {
        html.push_str(&format!(
            "<li><a href=\"{}\">Approve as {} &lt;{}&gt;</a></li>",
            link((SIM_USER_PARAM, &user.id.to_string())),
            user.name,
            user.email
        ));
    }
    html.push_str(&format!("</ul><p><a href=\"{}\">Deny</a></p>", link((SIM_DENY_PARAM, "1"))));
    Html(html).into_response()
}

fn basic_client(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get("authorization")?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(value).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

async fn token(State(sim): State<Sim>, headers: HeaderMap, Form(form): Form<BTreeMap<String, String>>) -> Response {
    if let Err(response) = sim.enter("token").await {
        return response;
    }
    let config = sim.config();
    match basic_client(&headers) {
        Some((id, secret)) if id == config.client_id && secret == config.client_secret => {}
        _ => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "Client authentication failed (HTTP Basic required)",
            );
        }
    }
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or_default();
    let token_window = sim.token_window_secs();
    let user = match grant_type {
        "authorization_code" => {
            let mut world = sim.world();
            let code = form.get("code").and_then(|c| world.codes.get_mut(c));
            let Some(code) = code else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "The provided authorization grant is invalid",
                );
            };
            if code.used || code.expires_at <= OffsetDateTime::now_utc() {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "The authorization code has expired or was already used",
                );
            }
            if form.get("redirect_uri") != Some(&code.redirect_uri) {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "redirect_uri does not match");
            }
            if let Some(challenge) = &code.code_challenge {
                let Some(verifier) = form.get("code_verifier") else {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "code_verifier is required");
                };
                if URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) != *challenge {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "code_verifier does not match code_challenge",
                    );
                }
            }
            // A request over the user's token budget is refused before it uses up the code.
            if let Err(refused) = sim.take_token_request(code.user, token_window) {
                drop(world);
                return sim.refuse_token_request(refused);
            }
            code.used = true;
            code.user
        }
        "refresh_token" => {
            let mut world = sim.world();
            let Some(grant) = form.get("refresh_token").and_then(|t| world.refresh_tokens.get_mut(t)) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "The provided refresh token is invalid");
            };
            if grant.used {
                drop(world);
                sim.counters().refresh_token_reuse_attempts += 1;
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "The refresh token was already used");
            }
            if grant.revoked {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "The refresh token was revoked");
            }
            // A request over the user's token budget is refused before it uses up the token.
            if let Err(refused) = sim.take_token_request(grant.user, token_window) {
                drop(world);
                return sim.refuse_token_request(refused);
            }
            grant.used = true;
            grant.user
        }
        _ => return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "grant_type is not supported"),
    };
    *sim.counters().token_grants.entry(grant_type.to_owned()).or_default() += 1;
    (StatusCode::OK, Json(sim.issue_tokens(user))).into_response()
}

async fn revoke(State(sim): State<Sim>, Form(form): Form<BTreeMap<String, String>>) -> Response {
    if let Err(response) = sim.enter("revoke").await {
        return response;
    }
    let config = sim.config();
    if form.get("client_id") != Some(&config.client_id) || form.get("client_secret") != Some(&config.client_secret) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "Client authentication failed");
    }
    let Some(token) = form.get("token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "token is required");
    };
    {
        let mut world = sim.world();
        if let Some(t) = world.access_tokens.get_mut(token) {
            t.revoked = true;
        }
        if let Some(t) = world.refresh_tokens.get_mut(token) {
            t.revoked = true;
        }
    }
    sim.counters().revocations += 1;
    (StatusCode::OK, Json(json!({}))).into_response()
}
