//! Living within Calendly's API budget: what a reconciliation pass of an unchanged account costs,
//! and a burst of webhooks for one free-plan user (50 requests a minute) — its 429s, its drain
//! time against the budget's own lower bound, and another user's latency meanwhile.

use std::time::{Duration, Instant};

use serde_json::json;
use time::OffsetDateTime;

use calsync_common::db::connections::Connection;
use calsync_common::queue::Broker;
use calsync_common::queue::message::{self, SyncJob, SyncKind};

use crate::Ctx;
use crate::procs::{Proc, wait_ok};
use crate::stats::{self, ms, percentile, row};
use crate::world::World;

const PREFIX: &str = "bench-budget";
/// Events of the reconciled account (the figure).
const RECONCILED_EVENTS: usize = 250;
/// Webhooks of the free-plan burst, each about its own event.
const BURST: usize = 120;
const FREE_PLAN_PER_MINUTE: usize = 50;

async fn last_synced(world: &World, connection: &Connection) -> anyhow::Result<Option<OffsetDateTime>> {
    Ok(sqlx::query_scalar("SELECT last_synced_at FROM calendar_connections WHERE id = $1")
        .bind(connection.id)
        .fetch_one(&world.pool)
        .await?)
}

/// Queues a sync job and waits for its pass to finish.
async fn sync(world: &World, broker: &Broker, connection: &Connection, kind: SyncKind) -> anyhow::Result<()> {
    let before = last_synced(world, connection).await?;
    broker.publish(&message::sync_job(&SyncJob::new(connection.id, kind))).await?;
    let started = Instant::now();
    while last_synced(world, connection).await? == before {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(300), "the {} pass did not finish", kind.as_str());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn calls(world: &World, ctx: &Ctx) -> anyhow::Result<f64> {
    let counters: serde_json::Value =
        ctx.http.get(format!("{}/_sim/counters", world.sim_url)).send().await?.json().await?;
    Ok(counters["calls"].as_object().map_or(0.0, |all| all.values().filter_map(|v| v.as_f64()).sum()))
}

/// Processed webhooks among `ids`, and the latest commit among them.
async fn processed(world: &World, ids: &[String]) -> anyhow::Result<(i64, Option<OffsetDateTime>)> {
    Ok(sqlx::query_as(
        "SELECT count(*), max(processed_at) FROM webhook_inbox WHERE message_id = ANY($1) AND status = 'processed'",
    )
    .bind(ids)
    .fetch_one(&world.pool)
    .await?)
}

pub async fn run(ctx: &Ctx, world: &mut World, rows: &mut Vec<stats::Row>) -> anyhow::Result<()> {
    crate::reset_topology(ctx, PREFIX).await?;
    // Every user on their plan's real limit (the other sections lift it).
    world.set_faults(ctx, json!({})).await?;
    let reconciled = world.connect(ctx, "reconciled", "paid").await?;
    let free = world.connect(ctx, "free-plan", "free").await?;
    let other = world.connect(ctx, "other-user", "paid").await?;
    let uri = |c: &Connection| c.calendly_user_uri.clone().unwrap_or_default();
    world.book(ctx, &uri(&reconciled), RECONCILED_EVENTS).await?;
    let burst = world.book(ctx, &uri(&free), BURST).await?;
    let others = world.book(ctx, &uri(&other), 30).await?;

    let mut env = world.worker_env(ctx, PREFIX, 32)?;
    env.extend([("RECONCILE_INTERVAL_SECS", "0".to_owned()), ("SUBSCRIPTION_CHECK_INTERVAL_SECS", "0".to_owned())]);
    let addr = env.iter().find(|(k, _)| *k == "WORKER_ADDR").map(|(_, v)| v.clone()).unwrap_or_default();
    let worker = Proc::spawn("calsync-worker", &env, &[])?;
    wait_ok(&ctx.http, &format!("http://{addr}/healthz")).await?;
    let broker = crate::broker(ctx, PREFIX, 2).await?;

    // A reconciliation pass over an account whose 250 events are all stored already.
    sync(world, &broker, &reconciled, SyncKind::Backfill).await?;
    let before = calls(world, ctx).await?;
    sync(world, &broker, &reconciled, SyncKind::Reconcile).await?;
    let spent = calls(world, ctx).await? - before;
    rows.push(row(
        "budget",
        format!("API calls per reconciliation pass, unchanged account with {RECONCILED_EVENTS} events"),
        format!("{spent:.0}"),
        "target ≤ 3 (+ any token refresh)",
        if spent <= 3.0 { "✓" } else { "✗" },
    ));

    // The burst: 120 webhooks for one free-plan user at once; another user's webhooks meanwhile.
    let limited_before = world.counter(ctx, &["rate_limited"]).await?;
    let published = OffsetDateTime::now_utc();
    let mut burst_ids = Vec::new();
    for body in &burst {
        burst_ids.push(message::message_id(body));
        broker.publish(&message::webhook(body.clone(), OffsetDateTime::now_utc())).await?;
    }
    let mut other_ids = Vec::new();
    let started = Instant::now();
    let drained_at = loop {
        let (done, last) = processed(world, &burst_ids).await?;
        if done as usize == burst_ids.len() {
            break last.unwrap_or(published);
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "burst: {done} of {BURST} after 10 minutes");
        // One of the other user's webhooks every 5 s while the burst drains.
        if let Some(body) = others.get(other_ids.len())
            && started.elapsed() >= Duration::from_secs(5 * other_ids.len() as u64)
        {
            other_ids.push(message::message_id(body));
            broker.publish(&message::webhook(body.clone(), OffsetDateTime::now_utc())).await?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let limited = world.counter(ctx, &["rate_limited"]).await? - limited_before;
    let drain = (drained_at - published).as_seconds_f64();
    let lower_bound = (BURST.div_ceil(FREE_PLAN_PER_MINUTE) - 1) as f64 * 60.0;
    let mut latencies: Vec<Duration> = sqlx::query_as::<_, (OffsetDateTime, OffsetDateTime)>(
        "SELECT received_at, processed_at FROM webhook_inbox WHERE message_id = ANY($1) AND status = 'processed'",
    )
    .bind(&other_ids)
    .fetch_all(&world.pool)
    .await?
    .into_iter()
    .map(|(received, done)| (done - received).unsigned_abs())
    .collect();
    latencies.sort();
    broker.close().await;
    worker.stop().await;
    crate::reset_topology(ctx, PREFIX).await?;

    rows.push(row(
        "budget",
        format!("free-plan burst: {BURST} webhooks on {BURST} events for one user (50 requests/min): 429s received"),
        format!("{limited:.0}"),
        "target ≤ 5",
        if limited <= 5.0 { "✓" } else { "✗" },
    ));
    rows.push(row(
        "budget",
        "free-plan burst: time to drain",
        format!("{drain:.1} s"),
        format!("budget's lower bound {lower_bound:.0} s"),
        format!("{:.2}×", drain / lower_bound),
    ));
    rows.push(row(
        "budget",
        format!("another user's webhook during the burst: p50 / max latency ({} webhooks)", latencies.len()),
        format!("{} / {}", ms(percentile(&latencies, 0.5)), ms(latencies.last().copied().unwrap_or_default())),
        "not delayed by the burst",
        "-",
    ));
    Ok(())
}
