//! `calsync-worker import-connections` moving an existing integration's users in: rows per second
//! against the simulator at 50 ms per Calendly call, and the calls it spends per row. The ceiling
//! is what that latency allows at the command's concurrency, given the calls it made one after
//! another per row (measured in the same run).

use std::time::Instant;

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::{Value, json};

use calsync_testkit::seed::{SeedDatabase, SeedRow};

use crate::procs::bin;
use crate::stats::{Row, ratio, row};
use crate::world::World;
use crate::{Ctx, reset_topology};

const LATENCY_MS: u64 = 50;
const PREFIX: &str = "bench-import";

pub async fn run(ctx: &Ctx, world: &World, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let n = (ctx.webhooks / 20).clamp(100, 1_000);
    world.set_latency(ctx, 0).await?;
    for concurrency in [8u16, 32] {
        let seed = seed(ctx, world, n, concurrency).await?;
        world.set_latency(ctx, LATENCY_MS).await?;
        let before = world_calls(ctx, world).await?;
        let started = Instant::now();
        let output = tokio::process::Command::new(bin("calsync-worker")?)
            .args(["import-connections", "--concurrency", &concurrency.to_string()])
            .envs(world.worker_env(ctx, PREFIX, 16)?)
            .env("IMPORT_SOURCE_DATABASE_URL", &seed.url)
            .env("CALENDLY_WEBHOOK_CALLBACK_URL", "http://127.0.0.1:9/webhooks/calendly")
            .env("RUST_LOG", "warn")
            .output()
            .await?;
        let took = started.elapsed();
        world.set_latency(ctx, 0).await?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let expected = format!("imported {n}, needs_reauth 0, skipped 0, failed 0");
        anyhow::ensure!(
            output.status.success() && stdout.contains(&expected),
            "the import did not import every row: {}{}",
            stdout.lines().last().unwrap_or_default(),
            String::from_utf8_lossy(&output.stderr)
        );
        let spent = world_calls(ctx, world).await?.since(&before);
        let per_row = |calls: f64| calls / n as f64;
        // Calls one row makes one after another: `/users/me` (again after a refresh), the refresh,
        // the subscription. Revocations and budget rows are not on a row's path.
        let sequential = per_row(spent.users_me + spent.token + spent.create_subscription);
        let ceiling = f64::from(concurrency) / (sequential * LATENCY_MS as f64 / 1000.0);
        let rate = n as f64 / took.as_secs_f64();
        rows.push(row(
            "import",
            format!("{n} seed rows, {LATENCY_MS} ms per Calendly call, --concurrency {concurrency}"),
            format!("{rate:.1} rows/s ({:.1} s)", took.as_secs_f64()),
            format!("{ceiling:.1} rows/s (latency bound)"),
            ratio(rate, ceiling),
        ));
        rows.push(row(
            "import",
            format!("Calendly calls per row (--concurrency {concurrency})"),
            format!(
                "{:.2} ({:.2} users/me, {:.2} token, {:.2} subscription, {:.2} other)",
                per_row(spent.total),
                per_row(spent.users_me),
                per_row(spent.token),
                per_row(spent.create_subscription),
                per_row(spent.total - spent.users_me - spent.token - spent.create_subscription)
            ),
            "-",
            "-",
        ));
        seed.drop_now().await;
        sqlx::query("DELETE FROM calendar_connections WHERE imported_at IS NOT NULL").execute(&world.pool).await?;
        reset_topology(ctx, PREFIX).await?;
    }
    Ok(())
}

/// `n` simulated users as the old integration left them: a token pair each, every fourth access
/// token expired (the old system stopped refreshing), every tenth row from before the seed's fix
/// (no URIs).
async fn seed(ctx: &Ctx, world: &World, n: usize, run: u16) -> anyhow::Result<SeedDatabase> {
    let seed = SeedDatabase::create(&ctx.db_url).await;
    let made: Vec<anyhow::Result<SeedRow>> = futures_util::stream::iter(0..n)
        .map(|i| async move {
            let name = format!("import{run}-{i}");
            let user = world
                .sim_post(
                    "/_sim/users",
                    json!({ "name": name, "email": format!("{name}@example.com"), "plan": "paid" }),
                    ctx,
                )
                .await?;
            let uri = user["uri"].as_str().context("uri")?;
            let id = uri.rsplit('/').next().unwrap_or_default();
            let tokens = world.sim_post(&format!("/_sim/users/{id}/tokens"), json!({}), ctx).await?;
            if i % 4 == 0 {
                world.sim_post(&format!("/_sim/users/{id}/expire_tokens"), json!({}), ctx).await?;
            }
            let token = |k: &str| tokens[k].as_str().map(str::to_owned).context("token");
            let row = SeedRow::calendly(uuid::Uuid::new_v4(), &token("access_token")?, &token("refresh_token")?);
            Ok(if i % 10 == 0 {
                row
            } else {
                row.with_uris(uri, user["current_organization"].as_str().context("org")?)
            })
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let rows = made.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    seed.insert(&rows).await;
    Ok(seed)
}

/// The simulator's call counters that matter here.
struct Calls {
    total: f64,
    users_me: f64,
    token: f64,
    create_subscription: f64,
}

impl Calls {
    fn since(&self, before: &Calls) -> Calls {
        Calls {
            total: self.total - before.total,
            users_me: self.users_me - before.users_me,
            token: self.token - before.token,
            create_subscription: self.create_subscription - before.create_subscription,
        }
    }
}

async fn world_calls(ctx: &Ctx, world: &World) -> anyhow::Result<Calls> {
    let counters: Value = ctx.http.get(format!("{}/_sim/counters", world.sim_url)).send().await?.json().await?;
    let calls = counters["calls"].as_object().context("calls")?;
    let get = |k: &str| calls.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    Ok(Calls {
        total: calls.values().filter_map(Value::as_f64).sum(),
        users_me: get("users_me"),
        token: get("token"),
        create_subscription: get("create_subscription"),
    })
}
