//! Connecting Calendly accounts through the real HTTP flow against the simulator, with real
//! PostgreSQL and RabbitMQ: forced consent, PKCE, single-use state, encrypted tokens, one account
//! per user, subscriptions, replay of parked deliveries, disconnect and key rotation.

use std::net::SocketAddr;
use std::time::Duration;

use calendly_sim::{DeliveryMode, NewUser, SimConfig, SimServer};
use calsync_common::config::TokenKeyArgs;
use calsync_common::crypto::{self, TokenCipher};
use calsync_common::db::connections::{self, ACCESS_TOKEN, binding};
use calsync_testkit::{IsolatedTopology, wait_until};
use clap::Parser;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const API_TOKEN: &str = "internal-test-token";
const CALLBACK: &str = "http://127.0.0.1:9/webhooks/calendly";
const REDIRECT: &str = "http://127.0.0.1:9/oauth/calendly/callback";

struct Env {
    sim: SimServer,
    topology: IsolatedTopology,
    pool: PgPool,
    db_url: String,
    key: String,
    addr: SocketAddr,
    http: reqwest::Client,
    shutdowns: Vec<CancellationToken>,
    state: calsync_ingest::AppState,
}

use calsync_testkit::test_database_url as database_url;

fn ingest_settings(
    env_sim: &SimServer,
    prefix: &str,
    db_url: &str,
    key: &str,
    extra: &[String],
) -> calsync_ingest::settings::IngestSettings {
    let mut args = vec![
        "calsync-ingest".to_owned(),
        "--ingest-addr=127.0.0.1:0".into(),
        format!("--calendly-webhook-signing-keys={}", env_sim.sim.config().signing_key),
        format!("--amqp-url={}", calsync_testkit::amqp_url()),
        format!("--amqp-topology-prefix={prefix}"),
        format!("--database-url={db_url}"),
        format!("--token-encryption-key={key}"),
        format!("--calendly-api-base-url={}", env_sim.url()),
        format!("--calendly-auth-base-url={}", env_sim.url()),
        format!("--calendly-oauth-client-id={}", env_sim.sim.config().client_id),
        format!("--calendly-oauth-client-secret={}", env_sim.sim.config().client_secret),
        format!("--calendly-oauth-redirect-uri={REDIRECT}"),
        format!("--calendly-webhook-callback-url={CALLBACK}"),
    ];
    args.extend(extra.iter().cloned());
    calsync_ingest::settings::IngestSettings::try_parse_from(args).unwrap()
}

impl Env {
    async fn new(pool: PgPool, extra: &[String]) -> Self {
        calsync_common::telemetry::init_tracing(calsync_common::config::LogFormat::Pretty);
        let sim = SimServer::start(SimConfig::default(), "127.0.0.1:0").await.unwrap();
        sim.sim.set_delivery_mode(DeliveryMode::Capture);
        let topology = IsolatedTopology::new().await;
        let db_url = database_url(&pool);
        let key = crypto::generate_key();
        let mut all = vec![format!("--internal-api-token={API_TOKEN}")];
        all.extend(extra.iter().cloned());
        let shutdown = CancellationToken::new();
        let app = calsync_ingest::Application::build(
            ingest_settings(&sim, &topology.prefix, &db_url, &key, &all),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let addr = app.local_addr();
        let (broker, database) = (app.state().broker.clone(), app.state().database.clone());
        let state = app.state().clone();
        tokio::spawn(app.run_until_stopped());
        assert!(broker.wait_ready(Duration::from_secs(10)).await);
        assert!(database.wait_ready(Duration::from_secs(10)).await);
        let http = calsync_common::http::client_builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Self { sim, topology, pool, db_url, key, addr, http, shutdowns: vec![shutdown], state }
    }

    /// The running ingest's connect flow (to run its sweep now rather than on its timer).
    fn app_connect(&self) -> &calsync_ingest::connect::ConnectService {
        &self.state.connect
    }

    fn cipher(&self) -> TokenCipher {
        TokenCipher::from_settings(&TokenKeyArgs {
            token_encryption_key: Some(secrecy::SecretString::from(self.key.clone())),
            token_encryption_previous_keys: vec![],
        })
        .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn calendly_user(&self, name: &str, webhooks: bool) -> Value {
        self.sim
            .sim
            .create_user(NewUser {
                name: name.into(),
                email: format!("{}@example.com", name.to_lowercase()),
                organization: None,
                webhooks_enabled: webhooks,
                plan: calendly_sim::Plan::Paid,
            })
            .unwrap()
    }

    async fn begin(&self, user_id: Uuid) -> String {
        let response = self
            .http
            .post(self.url("/connections/calendly"))
            .bearer_auth(API_TOKEN)
            .json(&serde_json::json!({ "user_id": user_id }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()["authorize_url"].as_str().unwrap().to_owned()
    }

    /// The browser's path through Calendly: returns the callback URL Calendly redirects to.
    async fn consent(&self, authorize_url: &str, approve_as: Option<&str>) -> String {
        let mut url = url::Url::parse(authorize_url).unwrap();
        match approve_as {
            Some(who) => url.query_pairs_mut().append_pair("sim_user", who),
            None => url.query_pairs_mut().append_pair("sim_deny", "1"),
        };
        let response = self.http.get(url).send().await.unwrap();
        assert!(response.status().is_redirection(), "Calendly redirects back");
        let location = url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
        assert!(location.as_str().starts_with(REDIRECT));
        format!("{}?{}", self.url("/oauth/calendly/callback"), location.query().unwrap_or_default())
    }

    async fn get(&self, url: &str) -> reqwest::Response {
        self.http.get(url).send().await.unwrap()
    }

    /// Consent for `user_id`'s link given as Calendly user `who`: the callback's answer.
    async fn consent_as(&self, user_id: Uuid, who: &Value) -> reqwest::Response {
        let authorize = self.begin(user_id).await;
        let callback = self.consent(&authorize, Some(who["email"].as_str().unwrap())).await;
        self.get(&callback).await
    }

    /// The one-time connect id a successful callback hands over (redirect or page).
    async fn connect_id(response: reqwest::Response) -> String {
        if let Some(location) = response.headers().get("location") {
            let location = url::Url::parse(location.to_str().unwrap()).unwrap();
            return location.query_pairs().find(|(k, _)| k == "connect_id").unwrap().1.into_owned();
        }
        let page = response.text().await.unwrap();
        let start = page.find("data-connect-id=\"").expect("the page carries the connect id") + 17;
        page[start..start + page[start..].find('"').unwrap()].to_owned()
    }

    /// The app's confirm call for `user_id`.
    async fn confirm(&self, user_id: Uuid, connect_id: &str) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/connections/calendly/{user_id}/confirm")))
            .bearer_auth(API_TOKEN)
            .json(&serde_json::json!({ "connect_id": connect_id }))
            .send()
            .await
            .unwrap()
    }

    /// The whole flow for `user_id` approving as Calendly user `who`, confirmed by the app for the
    /// same user: the confirm call's answer (or the callback's, when it refused).
    async fn connect(&self, user_id: Uuid, who: &Value) -> reqwest::Response {
        let callback = self.consent_as(user_id, who).await;
        if !(callback.status().is_success() || callback.status().is_redirection()) {
            return callback;
        }
        let connect_id = Self::connect_id(callback).await;
        self.confirm(user_id, &connect_id).await
    }

    /// Books a one-invitee meeting hosted by `host` (its webhook is captured).
    fn book_one(&self, host: &Value) {
        let booking = calendly_sim::Booking {
            user: host["uri"].as_str().unwrap().into(),
            name: None,
            start_time: None,
            duration_minutes: None,
            invitees: vec![calendly_sim::NewInvitee { name: "G".into(), email: "g@example.com".into() }],
            location: None,
            co_hosts: Vec::new(),
            webhook_lost: false,
        };
        self.sim.sim.book(booking).unwrap();
    }

    async fn status(&self, user_id: Uuid) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/connections/calendly/{user_id}")))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
    }

    /// The app's pull of `user_id`'s part of the change feed: `(kind, cause)` of each change.
    async fn changes_of(&self, user_id: Uuid) -> Vec<(String, String)> {
        let url = self.url(&format!("/changes?user_id={user_id}"));
        let feed: Value = self.http.get(url).bearer_auth(API_TOKEN).send().await.unwrap().json().await.unwrap();
        let changes = feed["changes"].as_array().unwrap().iter();
        changes.map(|c| (c["kind"].as_str().unwrap().to_owned(), c["cause"].as_str().unwrap().to_owned())).collect()
    }

    async fn start_worker(&mut self) {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            s: calsync_worker::settings::WorkerSettings,
        }
        let config = self.sim.sim.config();
        let client = (config.client_id.as_str(), config.client_secret.as_str());
        let args =
            calsync_testkit::worker_args(&self.db_url, &self.topology.prefix, &self.sim.url(), client, &self.key);
        let settings = Cli::try_parse_from(args).unwrap().s;
        let shutdown = CancellationToken::new();
        let worker = calsync_worker::Worker::build(settings, shutdown.clone()).await.unwrap();
        tokio::spawn(worker.run_until_stopped());
        self.shutdowns.push(shutdown);
    }

    /// Sends the simulator's captured deliveries through ingest, signed as Calendly would.
    async fn deliver_captured(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for captured in self.sim.sim.take_captured() {
            let signature = captured.signature(&self.sim.sim.config().signing_key);
            let response = self
                .http
                .post(self.url("/webhooks/calendly"))
                .header("Calendly-Webhook-Signature", signature)
                .body(captured.body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            ids.push(calsync_common::queue::message::message_id(captured.body.as_bytes()));
        }
        ids
    }

    async fn wait_inbox(&self, ids: &[String], status: &str) {
        wait_until(Duration::from_secs(30), &format!("inbox {status}"), || async {
            for id in ids {
                if calsync_common::db::inbox::status_of(&self.pool, id).await.unwrap().map(|s| s.as_str())
                    != Some(status)
                {
                    return false;
                }
            }
            true
        })
        .await;
    }

    async fn scalar<T>(&self, sql: &'static str, user: Uuid) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sql).bind(user).fetch_one(&self.pool).await.unwrap()
    }

    async fn stop(self) {
        for s in &self.shutdowns {
            s.cancel();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.topology.cleanup().await;
    }
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn two_users_connect_through_the_real_flow_and_each_status_shows_its_own_calendly_account(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let (ada, bob) = (env.calendly_user("Ada", true), env.calendly_user("Bob", true));
    let (ada_user, bob_user) = (Uuid::new_v4(), Uuid::new_v4());

    let ada_page = env.connect(ada_user, &ada).await;
    let bob_page = env.connect(bob_user, &bob).await;

    assert_eq!(ada_page.status(), 200);
    let confirmed: Value = ada_page.json().await.unwrap();
    assert_eq!((&confirmed["uri"], &confirmed["email"]), (&ada["uri"], &ada["email"]), "the app learns whose account");
    assert_eq!(bob_page.status(), 200);
    for request in env.sim.sim.authorize_requests() {
        assert_eq!(request["prompt"], "consent");
        assert_eq!(request["code_challenge_method"], "S256");
        assert!(request["code_challenge"].as_str().unwrap().len() >= 43);
        assert!(request["state"].as_str().unwrap().len() >= 43);
        assert_eq!(request["scope"], "users:read scheduled_events:read webhooks:read webhooks:write");
        assert_eq!(request["redirect_uri"], REDIRECT);
    }
    for (user, calendly) in [(ada_user, &ada), (bob_user, &bob)] {
        let status: Value = env.status(user).await.json().await.unwrap();
        assert_eq!(status["connected"], true);
        assert_eq!(status["status"], "active");
        assert_eq!(status["calendly_user_uri"], calendly["uri"]);
        assert_eq!(status["calendly_organization_uri"], calendly["current_organization"]);
        assert_eq!(status["subscription_state"], "active");
        assert!(status.get("access_token").is_none() && !status.to_string().contains("v1."), "no token in the status");
    }
    let subscriptions = env.sim.sim.subscriptions();
    assert_eq!(subscriptions.len(), 2);
    assert!(subscriptions.iter().all(|s| s["callback_url"] == CALLBACK && s["scope"] == "user"));
    wait_until(Duration::from_secs(5), "two backfill jobs queued", || async {
        env.topology.depth(&env.topology.topology.sync_queue()).await == 2
    })
    .await;
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn stored_tokens_are_ciphertext_that_decrypts_only_for_its_own_row(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let (ada, bob) = (env.calendly_user("Ada", true), env.calendly_user("Bob", true));
    let (ada_user, bob_user) = (Uuid::new_v4(), Uuid::new_v4());
    env.connect(ada_user, &ada).await;
    env.connect(bob_user, &bob).await;
    let rows: Vec<(Uuid, Uuid, String, String)> =
        sqlx::query_as("SELECT id, user_id, access_token, refresh_token FROM calendar_connections")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let cipher = env.cipher();

    for (id, _, access, refresh) in &rows {
        assert!(access.starts_with("v1.") && refresh.starts_with("v1."));
        let other = rows.iter().find(|r| r.0 != *id).unwrap().0;
        assert!(
            cipher.decrypt(access, binding(other, ACCESS_TOKEN)).is_err(),
            "copied to another row it does not decrypt"
        );
        let plain = cipher.decrypt(access, binding(*id, ACCESS_TOKEN)).unwrap();
        assert!(!access.contains(secrecy::ExposeSecret::expose_secret(&plain)));
        // The plaintext is a live token of that row's own Calendly user.
        let me: Value = env
            .http
            .get(format!("{}/users/me", env.sim.url()))
            .bearer_auth(secrecy::ExposeSecret::expose_secret(&plain))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let expected: String = env
            .scalar(
                "SELECT calendly_user_uri FROM calendar_connections WHERE user_id = $1",
                rows.iter().find(|r| r.0 == *id).unwrap().1,
            )
            .await;
        assert_eq!(me["resource"]["uri"], expected);
    }
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_configured_return_url_receives_the_user_with_a_pending_connect_id_and_nothing_connected(pool: PgPool) {
    let env = Env::new(pool, &["--connect-return-url=https://app.example.com/settings".into()]).await;
    let ada = env.calendly_user("Ada", true);
    let user = Uuid::new_v4();

    let response = env.consent_as(user, &ada).await;

    assert_eq!(response.status(), 303);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("https://app.example.com/settings?calendly=pending&connect_id="), "{location}");
    assert_eq!(env.status(user).await.status(), 404, "not a connection until the app confirms it");
    let connect_id = Env::connect_id(response).await;
    assert_eq!(env.confirm(user, &connect_id).await.status(), 200);
    let status: Value = env.status(user).await.json().await.unwrap();
    assert_eq!(status["calendly_user_uri"], ada["uri"]);
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn unknown_expired_and_reused_states_and_denied_consent_are_refused_and_store_nothing(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let ada = env.calendly_user("Ada", true);
    let who = ada["email"].as_str().unwrap();

    let unknown = env.get(&env.url("/oauth/calendly/callback?code=abc&state=not-ours")).await;
    let denied_user = Uuid::new_v4();
    let denied = env.get(&env.consent(&env.begin(denied_user).await, None).await).await;
    let expired_user = Uuid::new_v4();
    let expired_callback = env.consent(&env.begin(expired_user).await, Some(who)).await;
    sqlx::query("UPDATE oauth_states SET expires_at = now() - interval '1 second' WHERE user_id = $1")
        .bind(expired_user)
        .execute(&env.pool)
        .await
        .unwrap();
    let expired = env.get(&expired_callback).await;
    let reused_user = Uuid::new_v4();
    let callback = env.consent(&env.begin(reused_user).await, Some(who)).await;
    assert_eq!(env.get(&callback).await.status(), 200);
    sqlx::query("DELETE FROM calendar_connections").execute(&env.pool).await.unwrap();
    let reused = env.get(&callback).await;

    for (case, response, status, says) in [
        ("unknown state", unknown, 400, "not issued by us"),
        ("denied consent", denied, 403, "access_denied"),
        ("expired state", expired, 400, "expired"),
        ("reused state", reused, 400, "already been used"),
    ] {
        assert_eq!(response.status(), status, "{case}");
        let page = response.text().await.unwrap();
        assert!(page.contains("Calendly was not connected") && page.contains(says), "{case}: {page}");
    }
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM calendar_connections").fetch_one(&env.pool).await.unwrap(),
        0
    );
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_account_connected_to_another_user_is_refused_and_the_new_token_revoked(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let ada = env.calendly_user("Ada", true);
    let (owner, intruder) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(env.connect(owner, &ada).await.status(), 200);
    let revocations_before = env.sim.sim.counters_json()["revocations"].as_u64().unwrap();

    let response = env.connect(intruder, &ada).await;

    assert_eq!(response.status(), 409);
    assert!(response.text().await.unwrap().contains("already connected to another user"));
    assert_eq!(env.status(intruder).await.status(), 404, "nothing stored for the second user");
    let owner_status: Value = env.status(owner).await.json().await.unwrap();
    assert_eq!(owner_status["calendly_user_uri"], ada["uri"], "the first user keeps the account");
    assert_eq!(
        env.sim.sim.counters_json()["revocations"].as_u64().unwrap(),
        revocations_before + 2,
        "access and refresh token revoked"
    );
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn the_connection_api_rejects_a_missing_or_wrong_bearer_token(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let url = env.url("/connections/calendly");
    let body = serde_json::json!({ "user_id": Uuid::new_v4() });

    let missing = env.http.post(&url).json(&body).send().await.unwrap();
    let wrong = env.http.post(&url).bearer_auth("nope").json(&body).send().await.unwrap();
    let status_unknown = env.status(Uuid::new_v4()).await;

    assert_eq!(missing.status(), 401);
    assert_eq!(missing.json::<Value>().await.unwrap()["error"], "unauthorized");
    assert_eq!(wrong.status(), 401);
    assert_eq!(status_unknown.status(), 404);
    env.stop().await;
}

/// An ingest whose database is `db_url` and whose API token is `token`; returns its address.
async fn bare_ingest(
    sim: &SimServer,
    topology: &IsolatedTopology,
    db_url: &str,
    token: Option<&str>,
) -> (SocketAddr, CancellationToken) {
    let extra: Vec<String> = token.map(|t| format!("--internal-api-token={t}")).into_iter().collect();
    let shutdown = CancellationToken::new();
    let app = calsync_ingest::Application::build(
        ingest_settings(sim, &topology.prefix, db_url, &crypto::generate_key(), &extra),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let addr = app.local_addr();
    let broker = app.state().broker.clone();
    tokio::spawn(app.run_until_stopped());
    assert!(broker.wait_ready(Duration::from_secs(10)).await);
    (addr, shutdown)
}

#[tokio::test]
async fn without_an_internal_token_the_connection_api_answers_503() {
    let sim = SimServer::start(SimConfig::default(), "127.0.0.1:0").await.unwrap();
    let topology = IsolatedTopology::new().await;
    let (addr, shutdown) = bare_ingest(&sim, &topology, "postgres://postgres@127.0.0.1:1/none", None).await;
    let http = calsync_common::http::client_builder().build().unwrap();

    let response = http
        .post(format!("http://{addr}/connections/calendly"))
        .bearer_auth("anything")
        .json(&serde_json::json!({ "user_id": Uuid::new_v4() }))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 503);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "connection_api_disabled");
    shutdown.cancel();
    topology.cleanup().await;
}

#[tokio::test]
async fn an_empty_internal_token_keeps_the_connection_api_closed_even_without_an_authorization_header() {
    let sim = SimServer::start(SimConfig::default(), "127.0.0.1:0").await.unwrap();
    let topology = IsolatedTopology::new().await;
    // What `INTERNAL_API_TOKEN=` in an env file gives: set, but empty.
    let (addr, shutdown) = bare_ingest(&sim, &topology, "postgres://postgres@127.0.0.1:1/none", Some("")).await;
    let http = calsync_common::http::client_builder().build().unwrap();

    let no_header = http.get(format!("http://{addr}/connections/calendly/{}", Uuid::new_v4())).send().await.unwrap();
    let empty_bearer = http
        .get(format!("http://{addr}/connections/calendly/{}", Uuid::new_v4()))
        .header("authorization", "Bearer ")
        .send()
        .await
        .unwrap();

    assert_eq!(no_header.status(), 503);
    assert_eq!(empty_bearer.status(), 503);
    assert_eq!(no_header.json::<Value>().await.unwrap()["error"], "connection_api_disabled");
    shutdown.cancel();
    topology.cleanup().await;
}

#[tokio::test]
async fn with_postgres_down_the_connection_api_answers_503_while_webhooks_are_still_accepted() {
    let sim = SimServer::start(SimConfig::default(), "127.0.0.1:0").await.unwrap();
    let topology = IsolatedTopology::new().await;
    let (addr, shutdown) = bare_ingest(&sim, &topology, "postgres://postgres@127.0.0.1:1/none", Some(API_TOKEN)).await;
    let http = calsync_common::http::client_builder().build().unwrap();
    let body =
        br#"{"event":"invitee.created","created_by":"x","created_at":"2025-12-17T01:59:35.000000Z","payload":{}}"#;
    let signature = calsync_common::calendly::signature::sign(
        sim.sim.config().signing_key.as_bytes(),
        time::OffsetDateTime::now_utc().unix_timestamp(),
        body,
    );

    let api = http
        .post(format!("http://{addr}/connections/calendly"))
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({ "user_id": Uuid::new_v4() }))
        .send()
        .await
        .unwrap();
    let webhook = http
        .post(format!("http://{addr}/webhooks/calendly"))
        .header("Calendly-Webhook-Signature", signature)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();

    assert_eq!(api.status(), 503);
    assert!(api.headers().contains_key("retry-after"));
    assert_eq!(api.json::<Value>().await.unwrap()["error"], "database_unavailable");
    assert_eq!(webhook.status(), 202);
    shutdown.cancel();
    topology.cleanup().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn reconnecting_after_needs_reauth_replays_the_parked_deliveries_into_meetings(pool: PgPool) {
    let mut env = Env::new(pool, &[]).await;
    env.start_worker().await;
    let ada = env.calendly_user("Ada", true);
    let user = Uuid::new_v4();
    env.connect(user, &ada).await;
    // Ada removes the app at Calendly: the stored refresh token stops working.
    env.sim.sim.revoke_tokens(ada["uri"].as_str().unwrap()).unwrap();
    sqlx::query("UPDATE calendar_connections SET token_expires_at = now() WHERE user_id = $1")
        .bind(user)
        .execute(&env.pool)
        .await
        .unwrap();
    for _ in 0..2 {
        env.book_one(&ada);
    }
    let ids = env.deliver_captured().await;
    env.wait_inbox(&ids, "awaiting_reauth").await;
    let status: Value = env.status(user).await.json().await.unwrap();
    assert_eq!(status["status"], "needs_reauth");

    assert_eq!(env.connect(user, &ada).await.status(), 200);

    env.wait_inbox(&ids, "processed").await;
    let meetings: i64 = env.scalar("SELECT count(*) FROM meetings WHERE user_id = $1", user).await;
    assert_eq!(meetings, 2);
    let status: Value = env.status(user).await.json().await.unwrap();
    assert_eq!(status["status"], "active");
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn disconnect_deletes_the_subscription_revokes_and_wipes_tokens_and_later_webhooks_are_unmatched(pool: PgPool) {
    let mut env = Env::new(pool, &[]).await;
    env.start_worker().await;
    let ada = env.calendly_user("Ada", true);
    let user = Uuid::new_v4();
    env.connect(user, &ada).await;
    // The connect's backfill shows in the status, for the app's "last synced".
    wait_until(Duration::from_secs(60), "the backfill reported done", || async {
        let status: Value = env.status(user).await.json().await.unwrap();
        status["sync"]["kind"] == "backfill" && status["sync"]["result"] == "done"
    })
    .await;
    let revocations_before = env.sim.sim.counters_json()["revocations"].as_u64().unwrap();

    let response =
        env.http.delete(env.url(&format!("/connections/calendly/{user}"))).bearer_auth(API_TOKEN).send().await.unwrap();

    assert_eq!(response.status(), 204);
    assert!(env.sim.sim.subscriptions().is_empty(), "our subscription is deleted at Calendly");
    assert_eq!(env.sim.sim.counters_json()["revocations"].as_u64().unwrap(), revocations_before + 2);
    let status: Value = env.status(user).await.json().await.unwrap();
    assert_eq!(status["status"], "disconnected");
    assert_eq!(status["connected"], false);
    let (access, refresh, active): (Option<String>, Option<String>, bool) =
        sqlx::query_as("SELECT access_token, refresh_token, is_active FROM calendar_connections WHERE user_id = $1")
            .bind(user)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(access.is_none() && refresh.is_none() && !active);
    // A delivery still in flight from Calendly for that account now finds no user.
    env.sim.sim.subscribe(ada["uri"].as_str().unwrap(), CALLBACK).unwrap();
    env.book_one(&ada);
    let ids = env.deliver_captured().await;
    env.wait_inbox(&ids, "unmatched").await;
    let meetings: i64 = env.scalar("SELECT count(*) FROM meetings WHERE user_id = $1", user).await;
    assert_eq!(meetings, 0);
    // The app following the feed was told both, with their causes.
    let told = env.changes_of(user).await;
    let told: Vec<(&str, &str)> = told.iter().map(|(k, c)| (k.as_str(), c.as_str())).collect();
    assert_eq!(told, [("connection.active", "connect"), ("connection.disconnected", "disconnect")]);
    assert_eq!(
        env.http
            .delete(env.url(&format!("/connections/calendly/{}", Uuid::new_v4())))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_plan_without_webhooks_keeps_the_connection_and_says_why_in_last_error(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let free = env.calendly_user("Free", false);
    let user = Uuid::new_v4();

    assert_eq!(env.connect(user, &free).await.status(), 200);

    let status: Value = env.status(user).await.json().await.unwrap();
    assert_eq!(status["status"], "active");
    assert!(status["last_error"].as_str().unwrap().contains("paid Calendly plan (403)"));
    assert!(status["webhook_subscription_uri"].is_null());
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_existing_subscription_is_reused_and_a_disabled_one_replaced(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let ada = env.calendly_user("Ada", true);
    let user = Uuid::new_v4();
    let existing = env.sim.sim.subscribe(ada["uri"].as_str().unwrap(), CALLBACK).unwrap();

    env.connect(user, &ada).await;
    let reused: Value = env.status(user).await.json().await.unwrap();
    assert_eq!(reused["webhook_subscription_uri"], existing["uri"], "409 → the existing active subscription is reused");

    // Calendly gave up on it (24 h of failures): a reconnect replaces it.
    {
        let id: Uuid = existing["uri"].as_str().unwrap().rsplit('/').next().unwrap().parse().unwrap();
        env.sim.sim.disable_subscription(id);
    }
    env.connect(user, &ada).await;
    let replaced: Value = env.status(user).await.json().await.unwrap();
    assert_ne!(replaced["webhook_subscription_uri"], existing["uri"]);
    assert_eq!(replaced["subscription_state"], "active");
    assert_eq!(env.sim.sim.subscriptions().len(), 1);
    env.stop().await;
}

async fn revocations(env: &Env) -> u64 {
    env.sim.sim.counters_json()["revocations"].as_u64().unwrap()
}

async fn pending_rows(env: &Env) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pending_connections").fetch_one(&env.pool).await.unwrap()
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_forwarded_link_confirmed_by_another_app_user_is_refused_discarded_and_revoked(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let bob = env.calendly_user("Bob", true);
    let (sender, recipient) = (Uuid::new_v4(), Uuid::new_v4());
    // The sender forwards their own link; Bob approves it in his browser, where the app knows him
    // as `recipient`, so that is whom the app confirms for.
    let connect_id = Env::connect_id(env.consent_as(sender, &bob).await).await;
    let before = revocations(&env).await;

    let refused = env.confirm(recipient, &connect_id).await;
    let by_sender_after = env.confirm(sender, &connect_id).await;

    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
    assert_eq!(by_sender_after.status(), 404, "the pending result was discarded, not kept for the sender");
    assert_eq!(revocations(&env).await, before + 2, "access and refresh token revoked");
    assert_eq!(env.status(sender).await.status(), 404, "Bob's account never reached the sender");
    assert_eq!(env.status(recipient).await.status(), 404);
    assert_eq!(pending_rows(&env).await, 0);
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_unknown_used_or_expired_connect_id_is_404_and_expired_consents_are_swept_and_revoked(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let (ada, bob) = (env.calendly_user("Ada", true), env.calendly_user("Bob", true));
    let (ada_user, bob_user) = (Uuid::new_v4(), Uuid::new_v4());
    let used = Env::connect_id(env.consent_as(ada_user, &ada).await).await;
    assert_eq!(env.confirm(ada_user, &used).await.status(), 200);
    let late = Env::connect_id(env.consent_as(bob_user, &bob).await).await;
    sqlx::query("UPDATE pending_connections SET expires_at = now() - interval '1 second'")
        .execute(&env.pool)
        .await
        .unwrap();
    let before = revocations(&env).await;

    assert_eq!(env.confirm(ada_user, "never-issued").await.status(), 404);
    assert_eq!(env.confirm(ada_user, &used).await.status(), 404, "a connect id works once");
    assert_eq!(env.confirm(bob_user, &late).await.status(), 404, "ten minutes have passed");
    assert_eq!(revocations(&env).await, before + 2, "the expired consent's tokens are revoked");
    assert_eq!(env.status(bob_user).await.status(), 404);

    // A consent nobody confirms is swept after its ten minutes, tokens revoked.
    let abandoned = Env::connect_id(env.consent_as(bob_user, &bob).await).await;
    sqlx::query("UPDATE pending_connections SET expires_at = now() - interval '1 second'")
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(env.app_connect().sweep_expired().await.unwrap(), 1);
    assert_eq!(revocations(&env).await, before + 4);
    assert_eq!(pending_rows(&env).await, 0);
    assert_eq!(env.confirm(bob_user, &abandoned).await.status(), 404);
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn switching_to_another_calendly_account_deletes_the_old_subscription_and_revokes_the_old_grant(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let (ada, bob) = (env.calendly_user("Ada", true), env.calendly_user("Bob", true));
    let user = Uuid::new_v4();
    assert_eq!(env.connect(user, &ada).await.status(), 200);
    let ada_subscription: Value = env.status(user).await.json().await.unwrap();
    let ada_subscription = ada_subscription["webhook_subscription_uri"].as_str().unwrap().to_owned();
    let before = revocations(&env).await;

    assert_eq!(env.connect(user, &bob).await.status(), 200);

    let status: Value = env.status(user).await.json().await.unwrap();
    assert_eq!(status["calendly_user_uri"], bob["uri"]);
    assert_eq!(status["status"], "active");
    let subscriptions = env.sim.sim.subscriptions();
    assert!(!subscriptions.iter().any(|s| s["uri"] == ada_subscription.as_str()), "Ada's subscription is deleted");
    assert!(subscriptions.iter().any(|s| s["user"] == bob["uri"]), "Bob's is created");
    assert_eq!(revocations(&env).await, before + 2, "Ada's access and refresh token revoked");
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_disconnect_waiting_on_calendly_unlinks_at_once_and_stalls_no_one_s_deliveries(pool: PgPool) {
    let mut env = Env::new(pool, &[]).await;
    env.start_worker().await;
    let (ada, bob) = (env.calendly_user("Ada", true), env.calendly_user("Bob", true));
    let (ada_user, bob_user) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(env.connect(ada_user, &ada).await.status(), 200);
    assert_eq!(env.connect(bob_user, &bob).await.status(), 200);
    // Calendly hangs on the disconnect's cleanup calls (until the client's own timeout).
    let slow = [("revoke".to_owned(), 600_000), ("delete_subscription".to_owned(), 600_000)];
    env.sim.sim.set_faults(calendly_sim::Faults { endpoint_latency_ms: slow.into(), ..Default::default() });
    let disconnect = tokio::spawn(
        env.http.delete(env.url(&format!("/connections/calendly/{ada_user}"))).bearer_auth(API_TOKEN).send(),
    );

    wait_until(Duration::from_secs(20), "Ada's row is unlinked before Calendly answers", || async {
        let (status, access): (String, Option<String>) =
            sqlx::query_as("SELECT status, access_token FROM calendar_connections WHERE user_id = $1")
                .bind(ada_user)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        status == "disconnected" && access.is_none()
    })
    .await;
    // Both accounts book while the disconnect is still waiting on Calendly (Ada's subscription is
    // not deleted yet, so her webhook still arrives).
    env.book_one(&ada);
    env.book_one(&bob);
    let ids = env.deliver_captured().await;
    assert_eq!(ids.len(), 2);
    wait_until(Duration::from_secs(30), "both deliveries settle", || async {
        let mut statuses = Vec::new();
        for id in &ids {
            statuses.push(calsync_common::db::inbox::status_of(&env.pool, id).await.unwrap().map(|s| s.as_str()));
        }
        statuses.contains(&Some("processed")) && statuses.contains(&Some("unmatched"))
    })
    .await;

    assert!(!disconnect.is_finished(), "the disconnect is still waiting on Calendly meanwhile");
    let bob_meetings: i64 = env.scalar("SELECT count(*) FROM meetings WHERE user_id = $1", bob_user).await;
    let ada_meetings: i64 = env.scalar("SELECT count(*) FROM meetings WHERE user_id = $1", ada_user).await;
    assert_eq!((bob_meetings, ada_meetings), (1, 0), "Bob's meeting is stored, none for the unlinked account");
    disconnect.abort();
    env.stop().await;
}

/// Takes the connections table away (every read of it fails, as in an outage) or puts it back.
async fn connections_table(env: &Env, present: bool) {
    let statement = if present {
        "ALTER TABLE calendar_connections_away RENAME TO calendar_connections"
    } else {
        "ALTER TABLE calendar_connections RENAME TO calendar_connections_away"
    };
    sqlx::query(statement).execute(&env.pool).await.unwrap();
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_consent_whose_storing_fails_on_a_database_error_is_revoked_at_the_callback_and_at_the_confirm(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let ada = env.calendly_user("Ada", true);
    // Callback: the token exchange works, then the connections table cannot be read.
    let authorize = env.begin(Uuid::new_v4()).await;
    let callback = env.consent(&authorize, Some(ada["email"].as_str().unwrap())).await;
    let before = revocations(&env).await;
    connections_table(&env, false).await;

    let answer = env.get(&callback).await;

    assert_eq!(answer.status(), 503);
    assert_eq!(revocations(&env).await, before + 2, "both of the consent's tokens are revoked");
    connections_table(&env, true).await;

    // Confirm: the pending consent is taken, then the connections table cannot be read.
    let user = Uuid::new_v4();
    let connect_id = Env::connect_id(env.consent_as(user, &ada).await).await;
    let before = revocations(&env).await;
    connections_table(&env, false).await;

    let answer = env.confirm(user, &connect_id).await;

    assert_eq!(answer.status(), 503);
    assert_eq!(revocations(&env).await, before + 2, "the taken consent's tokens do not outlive it");
    connections_table(&env, true).await;
    assert_eq!(pending_rows(&env).await, 0);
    env.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_user_imported_as_needs_reauth_reconnects_straight_to_active_without_a_disconnect_in_the_feed(pool: PgPool) {
    let env = Env::new(pool, &[]).await;
    let ada = env.calendly_user("Ada", true);
    let user = Uuid::new_v4();
    // What `import-connections` stores for a row whose grant Calendly refused: no account, no token.
    let reason = "Calendly refused the refresh token (invalid_grant)";
    let code = calsync_common::db::changes::ReauthReason::InvalidGrant;
    assert!(connections::store_unverified(&env.pool, user, code, reason).await.unwrap());

    assert_eq!(env.connect(user, &ada).await.status(), 200);

    let status: Value = env.status(user).await.json().await.unwrap();
    assert_eq!((&status["status"], &status["calendly_user_uri"]), (&json!("active"), &ada["uri"]));
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM change_log WHERE user_id = $1 ORDER BY seq")
        .bind(user)
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(kinds, ["connection.needs_reauth", "connection.active"]);
    env.stop().await;
}
