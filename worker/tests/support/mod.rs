//! A worker (or several) in-process against real PostgreSQL (a fresh `#[sqlx::test]` database),
//! real RabbitMQ (an isolated topology) and the Calendly simulator in capture mode, so each test
//! decides what is delivered, when, and in which order.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use serde_json::Value;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use calendly_sim::{Booking, DeliveryMode, NewInvitee, NewUser, SimConfig, SimServer};
use calsync_common::config::TokenKeyArgs;
use calsync_common::crypto::{self, TokenCipher};
use calsync_common::db::connections::{self, Connected};
use calsync_common::queue::{Broker, BrokerConfig, message};
use calsync_testkit::IsolatedTopology;
use calsync_worker::settings::WorkerSettings;

/// Generous: it only matters when something is broken, and delayed retries take tens of seconds.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The callback URL of the harness's subscriptions: nothing listens there (the simulator captures
/// deliveries instead of sending them).
pub const CAPTURE_URL: &str = "http://127.0.0.1:9/captured";

/// A test's extra flags override the harness's defaults.
#[derive(Parser)]
#[command(args_override_self = true)]
struct WorkerCli {
    #[command(flatten)]
    settings: WorkerSettings,
}

pub struct Harness {
    pub sim: SimServer,
    pub topology: IsolatedTopology,
    pub pool: PgPool,
    pub db_url: String,
    pub publisher: Broker,
    pub cipher: TokenCipher,
    pub key: String,
    workers: Vec<(CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>, SocketAddr)>,
}

pub struct User {
    pub app_user: Uuid,
    pub calendly: Value,
    pub uri: String,
    pub connection_id: Uuid,
}

pub use calsync_testkit::test_database_url as database_url;

impl Harness {
    pub async fn new(pool: PgPool) -> Self {
        Self::with_sim(pool, SimConfig::default()).await
    }

    pub async fn with_sim(pool: PgPool, config: SimConfig) -> Self {
        calsync_common::telemetry::init_tracing(calsync_common::config::LogFormat::Pretty);
        let sim = SimServer::start(config, "127.0.0.1:0").await.unwrap();
        sim.sim.set_delivery_mode(DeliveryMode::Capture);
        let topology = IsolatedTopology::new().await;
        let publisher = Broker::start(BrokerConfig {
            url: secrecy::SecretString::from(calsync_testkit::amqp_url()),
            topology: topology.topology.clone(),
            publish_channels: 2,
            confirm_timeout: Duration::from_secs(10),
            connection_name: "test-publisher".into(),
        });
        assert!(publisher.wait_ready(Duration::from_secs(10)).await);
        let key = crypto::generate_key();
        let cipher = TokenCipher::from_settings(&TokenKeyArgs {
            token_encryption_key: Some(secrecy::SecretString::from(key.clone())),
            token_encryption_previous_keys: vec![],
        })
        .unwrap();
        let db_url = database_url(&pool);
        Self { sim, topology, pool, db_url, publisher, cipher, key, workers: Vec::new() }
    }

    /// What a worker's processing code needs, built on this harness (to call it without AMQP).
    pub fn deps(&self) -> calsync_worker::Deps {
        let settings = self.settings(&[]);
        calsync_worker::Deps {
            sync_lookback: Duration::from_secs(86_400),
            ..calsync_worker::Deps::new(&settings, self.pool.clone(), self.publisher.clone()).unwrap()
        }
    }

    /// A harness with one worker running and one connected user, `name`.
    pub async fn with_worker_and_user(pool: PgPool, name: &str) -> (Self, User) {
        let mut h = Self::new(pool).await;
        h.start_worker(&[]).await;
        let user = h.connect(name).await;
        (h, user)
    }

    pub fn worker_args(&self) -> Vec<String> {
        let config = self.sim.sim.config();
        let client = (config.client_id.as_str(), config.client_secret.as_str());
        let mut args =
            calsync_testkit::worker_args(&self.db_url, &self.topology.prefix, &self.sim.url(), client, &self.key);
        args.push("--worker-concurrency=16".into());
        args
    }

    pub fn settings(&self, extra: &[&str]) -> WorkerSettings {
        let mut args = self.worker_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        WorkerCli::try_parse_from(args).expect("worker test settings").settings
    }

    /// Starts one more in-process worker; returns its health address.
    pub async fn start_worker(&mut self, extra: &[&str]) -> SocketAddr {
        let shutdown = CancellationToken::new();
        let worker = calsync_worker::Worker::build(self.settings(extra), shutdown.clone()).await.unwrap();
        let addr = worker.health_addr();
        let handle = tokio::spawn(worker.run_until_stopped());
        self.workers.push((shutdown, handle, addr));
        addr
    }

    /// Starts the real `calsync-worker` binary on this harness (killed when the handle drops).
    /// `extra` flags replace the harness's flags of the same name (the binary refuses a flag twice).
    pub fn spawn_worker_process(&self, extra: &[&str]) -> tokio::process::Child {
        let name = |arg: &str| arg.split('=').next().unwrap_or_default().to_owned();
        let overridden: Vec<String> = extra.iter().map(|a| name(a)).collect();
        tokio::process::Command::new(env!("CARGO_BIN_EXE_calsync-worker"))
            .args(self.worker_args().into_iter().skip(1).filter(|a| !overridden.contains(&name(a))))
            .args(extra)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// A simulated Calendly user connected to a new app user (tokens stored encrypted, as the
    /// connect flow does), with a user-scoped subscription so its changes are captured.
    pub async fn connect(&self, name: &str) -> User {
        self.connect_as(NewUser::named(name)).await
    }

    /// [`Harness::connect`] for a Calendly user made as `new` says (e.g. on the free plan). The
    /// subscription is recorded on the connection, as the connect flow records it.
    pub async fn connect_as(&self, new: NewUser) -> User {
        let calendly = self.sim.sim.create_user(new).unwrap();
        let uri = calendly["uri"].as_str().unwrap().to_owned();
        let subscription = self.sim.sim.subscribe(&uri, CAPTURE_URL).unwrap();
        let app_user = Uuid::new_v4();
        let connection_id =
            self.store_tokens(app_user, &calendly, OffsetDateTime::now_utc() + time::Duration::hours(2)).await;
        connections::set_subscription(&self.pool, connection_id, subscription["uri"].as_str(), None).await.unwrap();
        User { app_user, calendly, uri, connection_id }
    }

    /// Stores a fresh token pair for `calendly` on `app_user`'s connection, expiring at `expires_at`.
    pub async fn store_tokens(&self, app_user: Uuid, calendly: &Value, expires_at: OffsetDateTime) -> Uuid {
        let uri = calendly["uri"].as_str().unwrap();
        let tokens = self.sim.sim.grant_tokens(uri).unwrap();
        connections::store_connected(
            &self.pool,
            &self.cipher,
            &Connected {
                user_id: app_user,
                calendly_user_uri: uri,
                calendly_organization_uri: calendly["current_organization"].as_str().unwrap(),
                access_token: tokens["access_token"].as_str().unwrap(),
                refresh_token: tokens["refresh_token"].as_str().unwrap(),
                expires_at,
            },
        )
        .await
        .unwrap()
        .id
    }

    pub fn book(&self, user: &User, invitees: usize) -> Value {
        self.book_with(user, &[], invitees)
    }

    /// A meeting hosted by `user` and, for a collective event, `co_hosts`.
    pub fn book_with(&self, user: &User, co_hosts: &[&User], invitees: usize) -> Value {
        self.sim.sim.book(Self::booking(user, co_hosts, invitees)).unwrap()
    }

    /// A meeting booked at Calendly whose webhooks are lost on the way (only a reconciliation
    /// can find it).
    pub fn book_unannounced(&self, user: &User, invitees: usize) -> Value {
        self.sim.sim.book(Booking { webhook_lost: true, ..Self::booking(user, &[], invitees) }).unwrap()
    }

    fn booking(user: &User, co_hosts: &[&User], invitees: usize) -> Booking {
        Booking {
            user: user.uri.clone(),
            name: Some(format!("Meeting with {invitees}")),
            start_time: None,
            duration_minutes: Some(30),
            invitees: (0..invitees)
                .map(|n| NewInvitee { name: format!("Guest {n}"), email: format!("guest{n}@example.com") })
                .collect(),
            location: None,
            co_hosts: co_hosts.iter().map(|u| u.uri.clone()).collect(),
            webhook_lost: false,
        }
    }

    /// `calendar_connections.status` of `user`'s connection.
    pub async fn connection_status(&self, user: &User) -> String {
        sqlx::query_scalar("SELECT status FROM calendar_connections WHERE id = $1")
            .bind(user.connection_id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// `(invitee uri, status)` of the invitees on `app_user`'s meetings.
    pub async fn invitees_of(&self, app_user: Uuid) -> Vec<(String, String)> {
        sqlx::query_as(
            "SELECT i.calendly_invitee_uri, i.status FROM meeting_invitees i JOIN meetings m ON m.id = i.meeting_id \
             WHERE m.user_id = $1 ORDER BY 1",
        )
        .bind(app_user)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// The signed bodies the simulator produced since the last call, oldest first.
    pub fn captured(&self) -> Vec<Vec<u8>> {
        self.sim.sim.take_captured().into_iter().map(|c| c.body.into_bytes()).collect()
    }

    /// Publishes a body as ingest would (confirmed); returns its message id.
    pub async fn publish(&self, body: &[u8]) -> String {
        self.publisher.publish(&message::webhook(body.to_vec(), OffsetDateTime::now_utc())).await.expect("published");
        message::message_id(body)
    }

    pub async fn publish_all(&self, bodies: &[Vec<u8>]) -> Vec<String> {
        let mut ids = Vec::new();
        for body in bodies {
            ids.push(self.publish(body).await);
        }
        ids
    }

    /// A transaction holding `user`'s connection row (`FOR UPDATE`), as a disconnect under way or an
    /// operator's session would; the row is free again when it is dropped or ended.
    pub async fn hold_connection_row(&self, user: &User) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut holder = self.pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM calendar_connections WHERE id = $1 FOR UPDATE")
            .bind(user.connection_id)
            .execute(&mut *holder)
            .await
            .unwrap();
        holder
    }

    pub async fn inbox_status(&self, message_id: &str) -> Option<String> {
        let status = calsync_common::db::inbox::status_of(&self.pool, message_id).await.unwrap();
        status.map(|s| s.as_str().to_owned())
    }

    /// Waits until every message id has one of `statuses` in the inbox.
    pub async fn wait_for_inbox(&self, ids: &[String], statuses: &[&str]) {
        self.wait_for_inbox_within(DEADLINE, ids, statuses).await;
    }

    /// [`Self::wait_for_inbox`] with its own deadline, for work that legitimately passes through
    /// the broker's longer retry tiers.
    pub async fn wait_for_inbox_within(&self, deadline: Duration, ids: &[String], statuses: &[&str]) {
        calsync_testkit::wait_until(deadline, &format!("inbox rows {statuses:?}"), || async {
            for id in ids {
                match self.inbox_status(id).await {
                    Some(s) if statuses.contains(&s.as_str()) => {}
                    _ => return false,
                }
            }
            true
        })
        .await;
    }

    /// `(event uri, status)` of every meeting of `app_user`, by start time.
    pub async fn meetings(&self, app_user: Uuid) -> Vec<(String, String)> {
        sqlx::query_as("SELECT calendly_event_uri, status FROM meetings WHERE user_id = $1 ORDER BY start_time, calendly_event_uri")
            .bind(app_user)
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// `(invitee uri, status, meeting owner)` of every invitee row.
    pub async fn invitees(&self) -> Vec<(String, String, Uuid)> {
        sqlx::query_as(
            "SELECT i.calendly_invitee_uri, i.status, m.user_id FROM meeting_invitees i JOIN meetings m ON m.id = i.meeting_id \
             ORDER BY i.calendly_invitee_uri",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// `user`'s changes in the order they were recorded, each as `kind/reason/cause` (`-` for no
    /// reason): what an app following the feed is told about that user.
    pub async fn changes(&self, user: &User) -> Vec<String> {
        let rows: Vec<(String, Option<String>, String)> =
            sqlx::query_as("SELECT kind, reason, cause FROM change_log WHERE user_id = $1 ORDER BY seq")
                .bind(user.app_user)
                .fetch_all(&self.pool)
                .await
                .unwrap();
        rows.into_iter()
            .map(|(kind, reason, cause)| format!("{kind}/{}/{cause}", reason.as_deref().unwrap_or("-")))
            .collect()
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }

    pub async fn dead_letters(&self) -> Vec<lapin::message::BasicGetMessage> {
        self.topology.drain(&self.topology.topology.dead_queue()).await
    }

    pub async fn stop(mut self) {
        for (shutdown, handle, _) in self.workers.drain(..) {
            shutdown.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(20), handle).await;
        }
        self.publisher.close().await;
        self.topology.cleanup().await;
    }
}

/// A worker's `/metrics` page.
pub async fn metrics(addr: SocketAddr) -> String {
    let http = calsync_common::http::client_builder().build().unwrap();
    http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// The sum of `name`'s samples (all label sets) on a worker's `/metrics` page; 0 when absent.
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    metrics(addr)
        .await
        .lines()
        .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn uuid_of(uri: &str) -> Uuid {
    uri.rsplit('/').next().unwrap().parse().unwrap()
}
