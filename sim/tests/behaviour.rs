//! The simulator behaves like Calendly where calsync depends on it (CALENDLY.md, point by point).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use calendly_sim::{Booking, Cancellation, DeliveryMode, FailNext, Faults, NewInvitee, NewUser, SimConfig, SimServer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const REDIRECT: &str = "http://127.0.0.1:9/callback";

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

async fn start(config: SimConfig) -> SimServer {
    SimServer::start(config, "127.0.0.1:0").await.unwrap()
}

fn user(server: &SimServer, name: &str) -> Value {
    server.sim.create_user(NewUser::named(name)).unwrap()
}

fn basic(config: &SimConfig) -> String {
    format!("Basic {}", STANDARD.encode(format!("{}:{}", config.client_id, config.client_secret)))
}

/// Runs authorize as `who` with a PKCE challenge for `verifier`; returns the code.
async fn authorize(server: &SimServer, who: &str, verifier: &str) -> String {
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let response = http()
        .get(format!("{}/oauth/authorize", server.url()))
        .query(&[
            ("client_id", server.sim.config().client_id.as_str()),
            ("response_type", "code"),
            ("redirect_uri", REDIRECT),
            ("state", "st-1"),
            ("prompt", "consent"),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
            ("sim_user", who),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303, "authorize redirects");
    let location = url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    let params: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert_eq!(params["state"], "st-1");
    params["code"].clone()
}

async fn exchange(server: &SimServer, code: &str, verifier: Option<&str>) -> reqwest::Response {
    let mut form = vec![("grant_type", "authorization_code"), ("code", code), ("redirect_uri", REDIRECT)];
    if let Some(v) = verifier {
        form.push(("code_verifier", v));
    }
    http()
        .post(format!("{}/oauth/token", server.url()))
        .header("authorization", basic(server.sim.config()))
        .form(&form)
        .send()
        .await
        .unwrap()
}

async fn tokens_for(server: &SimServer, who: &str) -> Value {
    let code = authorize(server, who, "verifier-0123456789-0123456789-0123456789-abc").await;
    exchange(server, &code, Some("verifier-0123456789-0123456789-0123456789-abc")).await.json().await.unwrap()
}

async fn refresh(server: &SimServer, token: &str) -> reqwest::Response {
    http()
        .post(format!("{}/oauth/token", server.url()))
        .header("authorization", basic(server.sim.config()))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", token)])
        .send()
        .await
        .unwrap()
}

async fn api(server: &SimServer, token: &str, path: &str) -> reqwest::Response {
    http().get(format!("{}{path}", server.url())).bearer_auth(token).send().await.unwrap()
}

fn book(server: &SimServer, host: &Value, invitees: usize) -> Value {
    book_hosted(server, host, &[], invitees)
}

/// A booking hosted by `host` and, for a collective event, `co_hosts`.
fn book_hosted(server: &SimServer, host: &Value, co_hosts: &[&Value], invitees: usize) -> Value {
    server
        .sim
        .book(Booking {
            user: host["uri"].as_str().unwrap().into(),
            name: Some("Intro".into()),
            start_time: None,
            duration_minutes: Some(30),
            invitees: (0..invitees)
                .map(|n| NewInvitee { name: format!("Guest {n}"), email: format!("g{n}@example.com") })
                .collect(),
            location: None,
            co_hosts: co_hosts.iter().map(|h| h["uri"].as_str().unwrap().to_owned()).collect(),
            webhook_lost: false,
        })
        .unwrap()
}

fn uuid_of(uri: &str) -> uuid::Uuid {
    uri.rsplit('/').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn an_authorization_code_with_pkce_yields_tokens_owned_by_the_approving_user() {
    let server = start(SimConfig::default()).await;
    let ada = user(&server, "Ada");

    let tokens = tokens_for(&server, ada["email"].as_str().unwrap()).await;

    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["owner"], ada["uri"]);
    assert_eq!(tokens["organization"], ada["current_organization"]);
    assert_eq!(tokens["expires_in"], 7200);
    let me: Value = api(&server, tokens["access_token"].as_str().unwrap(), "/users/me").await.json().await.unwrap();
    assert_eq!(me["resource"]["uri"], ada["uri"]);
    let log = server.sim.authorize_requests();
    assert_eq!(log[0]["prompt"], "consent");
    assert_eq!(log[0]["code_challenge_method"], "S256");
    assert_eq!(log[0]["state"], "st-1");
    assert_eq!(server.sim.token_grants("authorization_code"), 1);
}

#[tokio::test]
async fn every_bad_code_exchange_is_invalid_grant_or_invalid_client() {
    // Codes live their real 10 minutes here, so no case depends on how fast the machine is; the
    // expired case gets a simulator whose codes are born expired.
    let server = start(SimConfig::default()).await;
    let born_expired = start(SimConfig { auth_code_ttl: Duration::ZERO, ..SimConfig::default() }).await;
    let ada = user(&server, "Ada");
    let who = ada["email"].as_str().unwrap();
    let ada_there = user(&born_expired, "Ada");
    let v = "verifier-0123456789-0123456789-0123456789-abc";

    let code = authorize(&server, who, v).await;
    let wrong_verifier = exchange(&server, &code, Some("another-verifier-0123456789-0123456789-xyz")).await;
    let missing_verifier = exchange(&server, &code, None).await;
    assert_eq!(exchange(&server, &code, Some(v)).await.status(), 200);
    let reused = exchange(&server, &code, Some(v)).await;
    let no_basic = http()
        .post(format!("{}/oauth/token", server.url()))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &authorize(&server, who, v).await),
            ("redirect_uri", REDIRECT),
            ("code_verifier", v),
        ])
        .send()
        .await
        .unwrap();
    let late = authorize(&born_expired, ada_there["email"].as_str().unwrap(), v).await;
    let expired = exchange(&born_expired, &late, Some(v)).await;

    for (case, response, error) in [
        ("wrong verifier", wrong_verifier, "invalid_grant"),
        ("missing verifier", missing_verifier, "invalid_grant"),
        ("reused code", reused, "invalid_grant"),
        ("expired code", expired, "invalid_grant"),
        ("no client auth", no_basic, "invalid_client"),
    ] {
        assert!(response.status().is_client_error(), "{case}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], error, "{case}");
        assert!(body["error_description"].is_string(), "{case}");
    }
}

#[tokio::test]
async fn denying_consent_redirects_with_access_denied_and_the_state() {
    let server = start(SimConfig::default()).await;
    user(&server, "Ada");

    let response = http()
        .get(format!("{}/oauth/authorize", server.url()))
        .query(&[
            ("client_id", "sim-client-id"),
            ("response_type", "code"),
            ("redirect_uri", REDIRECT),
            ("state", "s"),
            ("sim_deny", "1"),
        ])
        .send()
        .await
        .unwrap();

    let location = response.headers()["location"].to_str().unwrap();
    assert!(location.starts_with(REDIRECT));
    assert!(location.contains("error=access_denied") && location.contains("state=s"), "{location}");
}

#[tokio::test]
async fn a_refresh_token_works_once_and_its_reuse_is_invalid_grant_and_counted() {
    let server = start(SimConfig::default()).await;
    let ada = user(&server, "Ada");
    let first = tokens_for(&server, ada["email"].as_str().unwrap()).await;
    let old_refresh = first["refresh_token"].as_str().unwrap();

    let rotated: Value = refresh(&server, old_refresh).await.json().await.unwrap();
    let reuse = refresh(&server, old_refresh).await;

    assert_ne!(rotated["refresh_token"], first["refresh_token"]);
    assert_eq!(api(&server, rotated["access_token"].as_str().unwrap(), "/users/me").await.status(), 200);
    assert_eq!(reuse.status(), 400);
    assert_eq!(reuse.json::<Value>().await.unwrap()["error"], "invalid_grant");
    assert_eq!(server.sim.refresh_token_reuse_attempts(), 1);
    assert_eq!(server.sim.token_grants("refresh_token"), 1);
    assert_eq!(refresh(&server, rotated["refresh_token"].as_str().unwrap()).await.status(), 200);
}

#[tokio::test]
async fn expired_revoked_and_unknown_tokens_get_401_with_calendlys_error_body() {
    let server = start(SimConfig::default()).await;
    let ada = user(&server, "Ada");
    let tokens = tokens_for(&server, ada["email"].as_str().unwrap()).await;
    let access = tokens["access_token"].as_str().unwrap();

    let unknown = api(&server, "nope", "/users/me").await;
    server.sim.expire_tokens(ada["uri"].as_str().unwrap()).unwrap();
    let expired = api(&server, access, "/users/me").await;
    let fresh: Value = refresh(&server, tokens["refresh_token"].as_str().unwrap()).await.json().await.unwrap();
    server.sim.revoke_tokens(ada["uri"].as_str().unwrap()).unwrap();
    let revoked = api(&server, fresh["access_token"].as_str().unwrap(), "/users/me").await;

    for response in [unknown, expired, revoked] {
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["title"], "Unauthenticated");
    }
    assert_eq!(
        refresh(&server, fresh["refresh_token"].as_str().unwrap()).await.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );
}

#[tokio::test]
async fn reading_another_users_event_is_403() {
    let server = start(SimConfig::default()).await;
    let (ada, bob) = (user(&server, "Ada"), user(&server, "Bob"));
    let booked = book(&server, &ada, 1);
    let bob_tokens = tokens_for(&server, bob["email"].as_str().unwrap()).await;

    let path = format!("/scheduled_events/{}", uuid_of(booked["event"]["uri"].as_str().unwrap()));
    let response = api(&server, bob_tokens["access_token"].as_str().unwrap(), &path).await;

    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn a_collective_event_reaches_every_hosts_subscription_and_every_host_can_read_it() {
    let server = start(SimConfig::default()).await;
    let (ada, bob, cy) = (user(&server, "Ada"), user(&server, "Bob"), user(&server, "Cy"));
    subscribe_capture(&server, &ada).await;
    subscribe_capture(&server, &bob).await;
    subscribe_capture(&server, &cy).await;
    let booked = book_hosted(&server, &ada, &[&bob], 1);

    let created_by: Vec<Value> = server
        .sim
        .take_captured()
        .iter()
        .map(|c| serde_json::from_str::<Value>(&c.body).unwrap()["created_by"].clone())
        .collect();
    assert_eq!(created_by.len(), 2, "one delivery per host's subscription, none for Cy");
    assert!(created_by.contains(&ada["uri"]) && created_by.contains(&bob["uri"]));
    let path = format!("/scheduled_events/{}", uuid_of(booked["event"]["uri"].as_str().unwrap()));
    for (who, status) in [(&ada, 200), (&bob, 200), (&cy, 403)] {
        let tokens = tokens_for(&server, who["email"].as_str().unwrap()).await;
        assert_eq!(api(&server, tokens["access_token"].as_str().unwrap(), &path).await.status(), status);
    }
    assert_eq!(booked["event"]["event_memberships"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn every_api_answer_carries_rate_limit_headers_and_the_limit_yields_429() {
    let server = start(SimConfig { rate_limit_per_minute: 3, ..SimConfig::default() }).await;
    let ada = user(&server, "Ada");
    let token = tokens_for(&server, ada["email"].as_str().unwrap()).await["access_token"].as_str().unwrap().to_owned();

    let mut statuses = Vec::new();
    let mut remaining = Vec::new();
    for _ in 0..4 {
        let response = api(&server, &token, "/users/me").await;
        statuses.push(response.status().as_u16());
        remaining.push(response.headers()["x-ratelimit-remaining"].to_str().unwrap().to_owned());
        assert_eq!(response.headers()["x-ratelimit-limit"], "3");
        let reset: u64 = response.headers()["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&reset), "reset is seconds until the window ends, got {reset}");
    }

    assert_eq!(statuses, vec![200, 200, 200, 429]);
    assert_eq!(remaining, vec!["2", "1", "0", "0"]);
}

#[tokio::test]
async fn scheduled_events_paginate_with_page_tokens_and_refuse_counts_over_100() {
    let server = start(SimConfig::default()).await;
    let ada = user(&server, "Ada");
    for _ in 0..25 {
        book(&server, &ada, 1);
    }
    let token = tokens_for(&server, ada["email"].as_str().unwrap()).await["access_token"].as_str().unwrap().to_owned();
    let user_uri = ada["uri"].as_str().unwrap();

    let mut seen = Vec::new();
    let mut page_token: Option<String> = None;
    loop {
        let mut path = format!("/scheduled_events?user={user_uri}&count=10&sort=start_time:asc");
        if let Some(t) = &page_token {
            path.push_str(&format!("&page_token={t}"));
        }
        let page: Value = api(&server, &token, &path).await.json().await.unwrap();
        seen.extend(page["collection"].as_array().unwrap().iter().map(|e| e["uri"].as_str().unwrap().to_owned()));
        page_token = page["pagination"]["next_page_token"].as_str().map(str::to_owned);
        if page_token.is_none() {
            assert!(page["pagination"]["next_page"].is_null());
            break;
        }
    }

    assert_eq!(seen.len(), 25);
    assert_eq!(seen.iter().collect::<std::collections::HashSet<_>>().len(), 25);
    assert_eq!(api(&server, &token, &format!("/scheduled_events?user={user_uri}&count=101")).await.status(), 400);
}

#[tokio::test]
async fn a_duplicate_subscription_url_is_409_and_a_plan_without_webhooks_is_403() {
    let server = start(SimConfig::default()).await;
    let ada = user(&server, "Ada");
    let free = server
        .sim
        .create_user(NewUser {
            name: "Free".into(),
            email: "free@example.com".into(),
            organization: None,
            webhooks_enabled: false,
            plan: calendly_sim::Plan::Paid,
        })
        .unwrap();
    let subscribe = |who: Value| {
        let server = &server;
        async move {
            let token =
                tokens_for(server, who["email"].as_str().unwrap()).await["access_token"].as_str().unwrap().to_owned();
            http()
                .post(format!("{}/webhook_subscriptions", server.url()))
                .bearer_auth(token)
                .json(&json!({ "url": "http://127.0.0.1:9/hook", "events": ["invitee.created"], "organization": who["current_organization"], "scope": "user", "user": who["uri"] }))
                .send()
                .await
                .unwrap()
        }
    };

    let created = subscribe(ada.clone()).await;
    let duplicate = subscribe(ada.clone()).await;
    let forbidden = subscribe(free).await;

    assert_eq!(created.status(), 201);
    let resource = created.json::<Value>().await.unwrap()["resource"].clone();
    assert_eq!(resource["state"], "active");
    assert_eq!(resource["creator"], ada["uri"]);
    assert_eq!(duplicate.status(), 409);
    assert_eq!(duplicate.json::<Value>().await.unwrap()["title"], "Already Exists");
    assert_eq!(forbidden.status(), 403);
}

async fn subscribe_capture(server: &SimServer, who: &Value) {
    server.sim.subscribe(who["uri"].as_str().unwrap(), "http://127.0.0.1:9/hook").unwrap();
    server.sim.set_delivery_mode(DeliveryMode::Capture);
}

#[tokio::test]
async fn delivered_webhooks_are_signed_so_that_calsyncs_verifier_accepts_them() {
    let server = start(SimConfig::default()).await;
    let ada = user(&server, "Ada");
    subscribe_capture(&server, &ada).await;
    book(&server, &ada, 1);

    let captured = server.sim.take_captured();

    assert_eq!(captured.len(), 1);
    let verifier = calsync_common::calendly::signature::WebhookVerifier::new(
        vec![secrecy::SecretString::from(server.sim.config().signing_key.clone())],
        Duration::from_secs(180),
    );
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let signature = captured[0].signature(&server.sim.config().signing_key);
    assert_eq!(verifier.verify(Some(&signature), captured[0].body.as_bytes(), now), Ok(()));
    let envelope: Value = serde_json::from_str(&captured[0].body).unwrap();
    assert_eq!(envelope["event"], "invitee.created");
    assert_eq!(envelope["created_by"], ada["uri"]);
    assert_eq!(envelope["payload"]["scheduled_event"]["event_memberships"][0]["user"], ada["uri"]);
    assert!(envelope["payload"]["updated_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn a_reschedule_is_a_canceled_old_invitee_and_a_created_invitee_on_a_new_event_linked_both_ways() {
    let server = start(SimConfig::default()).await;
    let ada = user(&server, "Ada");
    let booked = book(&server, &ada, 1);
    subscribe_capture(&server, &ada).await;
    let old_uri = booked["invitees"][0]["uri"].as_str().unwrap();

    server.sim.reschedule(uuid_of(old_uri), None).unwrap();
    let captured = server.sim.take_captured();

    let bodies: Vec<Value> = captured.iter().map(|c| serde_json::from_str(&c.body).unwrap()).collect();
    assert_eq!(bodies.len(), 2);
    let (canceled, created) = (&bodies[0], &bodies[1]);
    assert_eq!(canceled["event"], "invitee.canceled");
    assert_eq!(canceled["payload"]["uri"], old_uri);
    assert_eq!(canceled["payload"]["rescheduled"], true);
    assert_eq!(canceled["payload"]["status"], "canceled");
    assert_eq!(created["event"], "invitee.created");
    assert_eq!(created["payload"]["old_invitee"], old_uri);
    assert_eq!(canceled["payload"]["new_invitee"], created["payload"]["uri"]);
    assert_ne!(created["payload"]["event"], canceled["payload"]["event"], "a reschedule is a new event");
    assert_eq!(canceled["payload"]["scheduled_event"]["status"], "canceled");
}

#[tokio::test]
async fn cancel_and_no_show_deliver_their_events_with_the_invitee_shape() {
    let server = start(SimConfig::default()).await;
    let ada = user(&server, "Ada");
    let booked = book(&server, &ada, 2);
    subscribe_capture(&server, &ada).await;
    let first = uuid_of(booked["invitees"][0]["uri"].as_str().unwrap());

    server.sim.set_no_show(first, true).unwrap();
    server.sim.set_no_show(first, false).unwrap();
    server
        .sim
        .cancel(
            first,
            Cancellation {
                reason: Some("conflict".into()),
                canceled_by: Some("Ada".into()),
                canceler_type: Some("host".into()),
            },
        )
        .unwrap();
    let bodies: Vec<Value> =
        server.sim.take_captured().iter().map(|c| serde_json::from_str(&c.body).unwrap()).collect();

    let events: Vec<&str> = bodies.iter().map(|b| b["event"].as_str().unwrap()).collect();
    assert_eq!(events, vec!["invitee_no_show.created", "invitee_no_show.deleted", "invitee.canceled"]);
    assert!(bodies[0]["payload"]["no_show"]["uri"].is_string());
    assert!(bodies[1]["payload"]["no_show"].is_null());
    assert_eq!(bodies[2]["payload"]["cancellation"]["reason"], "conflict");
    assert_eq!(bodies[2]["payload"]["cancellation"]["canceler_type"], "host");
    assert_eq!(
        bodies[2]["payload"]["scheduled_event"]["status"], "active",
        "a group event stays active while an invitee remains"
    );
}

#[tokio::test]
async fn failed_deliveries_are_retried_until_the_window_closes_and_then_the_subscription_is_disabled() {
    let server = start(SimConfig {
        // Several retries fit in the window however slowly each attempt is answered here.
        delivery_retry_base: Duration::from_millis(20),
        delivery_retry_window: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await;
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", receiver.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { axum::http::StatusCode::INTERNAL_SERVER_ERROR }
        }),
    );
    tokio::spawn(async move { axum::serve(receiver, app).await.unwrap() });
    let ada = user(&server, "Ada");
    server.sim.subscribe(ada["uri"].as_str().unwrap(), &hook).unwrap();

    book(&server, &ada, 1);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while server.sim.subscriptions()[0]["state"] != "disabled" {
        assert!(std::time::Instant::now() < deadline, "subscription never disabled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(hits.load(std::sync::atomic::Ordering::SeqCst) >= 3, "retried several times");
    assert!(server.sim.subscriptions()[0]["retry_started_at"].is_string());
}

#[tokio::test]
async fn injected_faults_fail_the_named_endpoint_then_recover() {
    let server = start(SimConfig::default()).await;
    let ada = user(&server, "Ada");
    let token = tokens_for(&server, ada["email"].as_str().unwrap()).await["access_token"].as_str().unwrap().to_owned();

    server.sim.fail_next(FailNext { endpoint: "users_me".into(), count: 2, status: 502 });
    let statuses: Vec<u16> = futures_statuses(&server, &token, 3).await;
    server.sim.set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    let always = api(&server, &token, "/users/me").await.status().as_u16();
    server.sim.set_faults(Faults::default());

    assert_eq!(statuses, vec![502, 502, 200]);
    assert!(always >= 500);
    assert_eq!(api(&server, &token, "/users/me").await.status(), 200);
    assert_eq!(server.sim.calls("users_me"), 5);
}

async fn futures_statuses(server: &SimServer, token: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(api(server, token, "/users/me").await.status().as_u16());
    }
    out
}
