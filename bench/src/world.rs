//! A simulated Calendly with connected users and pre-generated signed webhooks, shared by the
//! worker and end-to-end measurements.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use calsync_common::config::TokenKeyArgs;
use calsync_common::crypto::TokenCipher;
use calsync_common::db::connections::{self, Connected, Connection};
use calsync_common::db::inbox::InboxStatus;

use crate::Ctx;
use crate::procs::{Proc, free_port, wait_ok};

pub const USERS: usize = 50;
pub const SIM_SIGNING_KEY: &str = "bench-sim-signing-key";

pub struct World {
    pub sim: Proc,
    pub sim_url: String,
    pub pool: PgPool,
    pub token_key: String,
    pub cipher: TokenCipher,
    /// Calendly user URI → connection.
    pub connections: HashMap<String, Connection>,
    pub users: Vec<String>,
}

impl World {
    pub async fn setup(ctx: &Ctx) -> anyhow::Result<Self> {
        use sqlx::migrate::MigrateDatabase;
        if sqlx::Postgres::database_exists(&ctx.db_url).await? {
            sqlx::Postgres::force_drop_database(&ctx.db_url).await?;
        }
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(64).connect_lazy(&ctx.db_url)?;
        calsync_common::db::prepare(&ctx.db_url, &pool).await?;
        let port = free_port()?;
        let sim_url = format!("http://127.0.0.1:{port}");
        let sim = Proc::spawn(
            "calendly-sim",
            &[
                ("SIM_ADDR", format!("127.0.0.1:{port}")),
                ("SIM_SIGNING_KEY", SIM_SIGNING_KEY.into()),
                // We measure calsync, not Calendly's quota: the per-user limit is lifted.
                ("SIM_RATE_LIMIT_PER_MINUTE", "100000000".into()),
            ],
            &[],
        )?;
        wait_ok(&ctx.http, &format!("{sim_url}/_sim")).await?;
        ctx.http
            .put(format!("{sim_url}/_sim/delivery"))
            .json(&json!({ "mode": "capture" }))
            .send()
            .await?
            .error_for_status()?;
        let token_key = calsync_common::crypto::generate_key();
        let cipher = TokenCipher::from_settings(&TokenKeyArgs {
            token_encryption_key: Some(secrecy::SecretString::from(token_key.clone())),
            token_encryption_previous_keys: vec![],
        })?;
        let mut world = Self { sim, sim_url, pool, token_key, cipher, connections: HashMap::new(), users: Vec::new() };
        for n in 0..USERS {
            let connection = world.connect(ctx, &format!("bench{n}"), "paid").await?;
            world.users.push(connection.calendly_user_uri.clone().context("uri")?);
        }
        Ok(world)
    }

    /// A simulated Calendly user on `plan` (`free` or `paid`), subscribed and connected to a new
    /// app user, as the connect flow would leave it.
    pub async fn connect(&mut self, ctx: &Ctx, name: &str, plan: &str) -> anyhow::Result<Connection> {
        let email = format!("{name}@example.com");
        let user = self.sim_post("/_sim/users", json!({ "name": name, "email": email, "plan": plan }), ctx).await?;
        let uri = user["uri"].as_str().context("uri")?.to_owned();
        let id = uri.rsplit('/').next().unwrap_or_default();
        self.sim_post(&format!("/_sim/users/{id}/subscriptions"), json!({ "url": "http://127.0.0.1:9/unused" }), ctx)
            .await?;
        let tokens = self.sim_post(&format!("/_sim/users/{id}/tokens"), json!({}), ctx).await?;
        let connection = connections::store_connected(
            &self.pool,
            &self.cipher,
            &Connected {
                user_id: Uuid::new_v4(),
                calendly_user_uri: &uri,
                calendly_organization_uri: user["current_organization"].as_str().context("org")?,
                access_token: tokens["access_token"].as_str().context("token")?,
                refresh_token: tokens["refresh_token"].as_str().context("token")?,
                expires_at: time::OffsetDateTime::now_utc() + time::Duration::hours(2),
            },
        )
        .await?;
        self.connections.insert(uri, connection.clone());
        Ok(connection)
    }

    /// Books `n` one-invitee events for `user`; returns their captured webhook bodies.
    pub async fn book(&self, ctx: &Ctx, user: &str, n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
        for i in 0..n {
            let invitees = json!([{ "name": format!("Guest {i}"), "email": format!("guest{i}@example.com") }]);
            self.sim_post("/_sim/events", json!({ "user": user, "invitees": invitees }), ctx).await?;
        }
        self.take_captured(ctx).await
    }

    async fn take_captured(&self, ctx: &Ctx) -> anyhow::Result<Vec<Vec<u8>>> {
        let captured: Vec<Value> =
            ctx.http.get(format!("{}/_sim/deliveries", self.sim_url)).send().await?.json().await?;
        Ok(captured.into_iter().filter_map(|c| c["body"].as_str().map(|b| b.as_bytes().to_vec())).collect())
    }

    /// Replaces the simulator's injected faults (`{}`: none, every user on their plan's limit).
    pub async fn set_faults(&self, ctx: &Ctx, faults: Value) -> anyhow::Result<()> {
        ctx.http.put(format!("{}/_sim/faults", self.sim_url)).json(&faults).send().await?.error_for_status()?;
        Ok(())
    }

    pub async fn sim_post(&self, path: &str, body: Value, ctx: &Ctx) -> anyhow::Result<Value> {
        let response = ctx.http.post(format!("{}{path}", self.sim_url)).json(&body).send().await?.error_for_status()?;
        Ok(response.json().await.unwrap_or(Value::Null))
    }

    pub async fn set_latency(&self, ctx: &Ctx, latency_ms: u64) -> anyhow::Result<()> {
        self.set_faults(ctx, json!({ "latency_ms": latency_ms, "rate_limit_per_minute": 100_000_000 })).await
    }

    /// Books events until `webhooks` signed deliveries exist: half one-invitee events, half group
    /// events of `group` invitees (whose bursts can share one fetch). Returns the bodies.
    pub async fn generate(&self, ctx: &Ctx, webhooks: usize, group: usize) -> anyhow::Result<Vec<Vec<u8>>> {
        let singles = webhooks / 2;
        let groups = (webhooks - singles).div_ceil(group);
        let bookings: Vec<(usize, usize)> =
            (0..singles).map(|n| (n, 1)).chain((0..groups).map(|n| (singles + n, group))).collect();
        let results: Vec<anyhow::Result<Value>> = futures_util::stream::iter(bookings)
            .map(|(n, size)| {
                let invitees: Vec<Value> = (0..size)
                    .map(|i| json!({ "name": format!("Guest {n}-{i}"), "email": format!("g{n}-{i}@example.com") }))
                    .collect();
                let user = self.users[n % self.users.len()].clone();
                async move { self.sim_post("/_sim/events", json!({ "user": user, "invitees": invitees }), ctx).await }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            r?;
        }
        self.take_captured(ctx).await
    }

    pub async fn counter(&self, ctx: &Ctx, path: &[&str]) -> anyhow::Result<f64> {
        let mut v: Value = ctx.http.get(format!("{}/_sim/counters", self.sim_url)).send().await?.json().await?;
        for p in path {
            v = v[*p].take();
        }
        Ok(v.as_f64().unwrap_or(0.0))
    }

    pub async fn truncate(&self) -> anyhow::Result<()> {
        sqlx::query("TRUNCATE meetings, meeting_invitees, webhook_inbox, change_log").execute(&self.pool).await?;
        sqlx::query("UPDATE change_feed SET last_position = 0, pruned_through = 0, published_through = 0")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn processed(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM webhook_inbox WHERE status = $1")
            .bind(InboxStatus::Processed)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Waits until `n` deliveries are processed; returns the seconds between the first and the last
    /// commit (the drain time, free of process start-up).
    pub async fn wait_processed(&self, n: usize, deadline: Duration) -> anyhow::Result<f64> {
        let started = std::time::Instant::now();
        while (self.processed().await? as usize) < n {
            anyhow::ensure!(
                started.elapsed() < deadline,
                "only {} of {n} processed after {deadline:?}",
                self.processed().await?
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (first, last): (time::OffsetDateTime, time::OffsetDateTime) =
            sqlx::query_as("SELECT min(processed_at), max(processed_at) FROM webhook_inbox WHERE status = $1")
                .bind(InboxStatus::Processed)
                .fetch_one(&self.pool)
                .await?;
        Ok((last - first).as_seconds_f64().max(0.001))
    }

    /// Environment of a worker process against this world.
    pub fn worker_env(&self, ctx: &Ctx, prefix: &str, concurrency: u16) -> anyhow::Result<Vec<(&'static str, String)>> {
        Ok(vec![
            ("WORKER_ADDR", format!("127.0.0.1:{}", free_port()?)),
            ("WORKER_CONCURRENCY", concurrency.to_string()),
            ("DATABASE_URL", ctx.db_url.clone()),
            ("AMQP_URL", ctx.amqp_url.clone()),
            ("AMQP_TOPOLOGY_PREFIX", prefix.to_owned()),
            ("CALENDLY_API_BASE_URL", self.sim_url.clone()),
            ("CALENDLY_AUTH_BASE_URL", self.sim_url.clone()),
            ("CALENDLY_OAUTH_CLIENT_ID", "sim-client-id".into()),
            ("CALENDLY_OAUTH_CLIENT_SECRET", "sim-client-secret".into()),
            ("TOKEN_ENCRYPTION_KEY", self.token_key.clone()),
        ])
    }
}
