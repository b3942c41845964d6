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
    let uri = |c: &Connection| c.calendly_user_uri.clone().unwrap_or_default();
    world.book(ctx, &uri(&reconciled), RECONCILED_EVENTS).await?;

    let workers = spawn_workers(ctx, world, 1).await?;
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

    broker.close().await;
    for worker in workers {
        worker.stop().await;
    }
    for processes in [1, 3] {
        burst(ctx, world, processes, rows).await?;
    }
    costs(world, rows).await?;
    crate::reset_topology(ctx, PREFIX).await?;
    Ok(())
}

/// `processes` workers of 32 slots each, without the periodic passes.
async fn spawn_workers(ctx: &Ctx, world: &World, processes: usize) -> anyhow::Result<Vec<Proc>> {
    let mut workers = Vec::new();
    for _ in 0..processes {
        let mut env = world.worker_env(ctx, PREFIX, 32)?;
        env.extend([("RECONCILE_INTERVAL_SECS", "0".to_owned()), ("SUBSCRIPTION_CHECK_INTERVAL_SECS", "0".to_owned())]);
        let addr = env.iter().find(|(k, _)| *k == "WORKER_ADDR").map(|(_, v)| v.clone()).unwrap_or_default();
        workers.push(Proc::spawn("calsync-worker", &env, &[])?);
        wait_ok(&ctx.http, &format!("http://{addr}/healthz")).await?;
    }
    Ok(workers)
}

/// The burst: 120 webhooks for one free-plan user at once, drained by `processes` workers;
/// another user's webhooks meanwhile.
async fn burst(ctx: &Ctx, world: &mut World, processes: usize, rows: &mut Vec<stats::Row>) -> anyhow::Result<()> {
    let uri = |c: &Connection| c.calendly_user_uri.clone().unwrap_or_default();
    let free = world.connect(ctx, &format!("free-plan-{processes}"), "free").await?;
    let other = world.connect(ctx, &format!("other-user-{processes}"), "paid").await?;
    let burst = world.book(ctx, &uri(&free), BURST).await?;
    let others = world.book(ctx, &uri(&other), 30).await?;
    let workers = spawn_workers(ctx, world, processes).await?;
    let broker = crate::broker(ctx, PREFIX, 2).await?;

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
    for worker in workers {
        worker.stop().await;
    }
    let workers = if processes == 1 { "1 worker".to_owned() } else { format!("{processes} workers") };

    rows.push(row(
        "budget",
        format!(
            "free-plan burst, {workers} × 32: {BURST} webhooks on {BURST} events for one user (50 requests/min): 429s"
        ),
        format!("{limited:.0}"),
        "target ≤ 5",
        if limited <= 5.0 { "✓" } else { "✗" },
    ));
    rows.push(row(
        "budget",
        format!("free-plan burst, {workers}: time to drain"),
        format!("{drain:.1} s"),
        format!("budget's lower bound {lower_bound:.0} s"),
        format!("{:.2}×", drain / lower_bound),
    ));
    rows.push(row(
        "budget",
        format!("another user's webhook during the burst, {workers}: p50 / max latency ({} webhooks)", latencies.len()),
        format!("{} / {}", ms(percentile(&latencies, 0.5)), ms(latencies.last().copied().unwrap_or_default())),
        "not delayed by the burst",
        "-",
    ));
    Ok(())
}

/// What the budget costs each Calendly call (also alone: `--only budget-cost`).
pub async fn costs(world: &World, rows: &mut Vec<stats::Row>) -> anyhow::Result<()> {
    cost(world, rows).await?;
    gathered_takes(world, rows).await
}

/// Tasks taking and settling at once: a worker's slots.
const COST_TASKS: usize = 32;
const COST_CALLS_PER_TASK: usize = 300;

/// Mean latency of `op` run `COST_CALLS_PER_TASK` times by each of `COST_TASKS` tasks at once.
async fn mean_latency<F, Fut>(op: F) -> anyhow::Result<Duration>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..COST_TASKS)
        .map(|task| {
            let op = op.clone();
            tokio::spawn(async move {
                for _ in 0..COST_CALLS_PER_TASK {
                    op(task).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed() * COST_TASKS as u32 / (COST_TASKS * COST_CALLS_PER_TASK) as u32)
}

/// What the fleet-wide budget adds to each Calendly call: one statement before (take) and one
/// after (settle), against two bare round trips to the same database in the same run.
async fn cost(world: &World, rows: &mut Vec<stats::Row>) -> anyhow::Result<()> {
    use calsync_common::calendly::rate::RateLimit;
    use calsync_common::db::budgets::{self, Taken};
    // A window no call here can spend: the cost, not the waiting, is measured.
    let answer = RateLimit { limit: 1_000_000, remaining: 999_999, reset: Duration::from_secs(60) };
    let pool = world.pool.clone();
    let ceiling = mean_latency(move |_| {
        let pool = pool.clone();
        async move {
            for _ in 0..2 {
                sqlx::query("SELECT 1").execute(&pool).await?;
            }
            Ok(())
        }
    })
    .await?;
    for (label, shared) in [("one user (every task on one row)", true), ("32 users (a row each)", false)] {
        let pool = world.pool.clone();
        let latency = mean_latency(move |task| {
            let pool = pool.clone();
            let key = if shared { "api:bench-cost".to_owned() } else { format!("api:bench-cost-{task}") };
            async move {
                let window = budgets::Window { limit: 1_000_000, length: Duration::from_secs(60), known: false };
                match budgets::take(&pool, &key, window).await? {
                    Taken::Granted { window, .. } => budgets::settle(&pool, &key, window, answer).await?,
                    Taken::Spent { .. } => anyhow::bail!("the bench's window was spent"),
                }
                Ok(())
            }
        })
        .await?;
        rows.push(row(
            "budget",
            format!("fleet-wide budget per Calendly call, {COST_TASKS} at once, {label}: 2 round trips"),
            format!("{:.0} µs", latency.as_secs_f64() * 1e6),
            format!("2 × SELECT 1, same run {:.0} µs", ceiling.as_secs_f64() * 1e6),
            format!("{:.1}×", latency.as_secs_f64() / ceiling.as_secs_f64()),
        ));
    }
    Ok(())
}

/// Takes in flight at once, as in the worker drain (one process × 256).
const TAKERS: usize = 256;
/// Calendly users they take for.
const TAKE_USERS: usize = 64;
const TAKES_PER_TAKER: usize = 200;
/// Alternations of the two ways, so both see the same machine.
const TAKE_ROUNDS: usize = 3;

/// What the worker's way of taking from the budget costs the two cores: a round trip per take
/// (`budgets::take`: `take_api_budgets` of one request, each call its own) against the takes of the
/// calls in flight gathered into one round trip (`Budgets::reserve_for`, what the worker does),
/// with 256 takers on 64 users — CPU of PostgreSQL and of this process per take, alternated so
/// both ways see the same machine.
async fn gathered_takes(world: &World, rows: &mut Vec<stats::Row>) -> anyhow::Result<()> {
    use calsync_common::db::budgets::{self, Window};
    use calsync_worker::budget::{Budget, Budgets};

    use crate::procs::{CpuMeter, Who, micros_per};

    let window = Window { limit: 1_000_000, length: Duration::from_secs(60), known: true };
    let budgets_handle = Budgets::new(world.pool.clone());
    let mut totals = [(Duration::ZERO, Duration::ZERO, Duration::ZERO); 2];
    for round in 0..TAKE_ROUNDS {
        // A window no take here can spend; a fresh set of rows for each round.
        sqlx::query("DELETE FROM api_budgets WHERE budget_key LIKE '%bench-take-%'").execute(&world.pool).await?;
        for (way, total) in totals.iter_mut().enumerate() {
            let meter = CpuMeter::start(vec![Who::Comm("postgres"), Who::Pid(Some(std::process::id()))]);
            let started = Instant::now();
            let takers: Vec<_> = (0..TAKERS)
                .map(|taker| {
                    let (pool, handle) = (world.pool.clone(), budgets_handle.clone());
                    let account = format!("bench-take-{round}-{way}-{}", taker % TAKE_USERS);
                    tokio::spawn(async move {
                        for _ in 0..TAKES_PER_TAKER {
                            if way == 0 {
                                budgets::take(&pool, &format!("api:{account}"), window).await?;
                            } else {
                                let _permit = handle
                                    .reserve_for(Budget::Api, &account)
                                    .await
                                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                            }
                        }
                        anyhow::Ok(())
                    })
                })
                .collect();
            for taker in takers {
                taker.await??;
            }
            let used = meter.used();
            total.0 += started.elapsed();
            total.1 += used[0].unwrap_or_default();
            total.2 += used[1].unwrap_or_default();
        }
    }
    let takes = (TAKERS * TAKES_PER_TAKER * TAKE_ROUNDS) as u64;
    let figure = |(elapsed, pg, own): (Duration, Duration, Duration)| {
        format!(
            "{:.0} takes/s; CPU per take: PostgreSQL {} / taker {}",
            takes as f64 / elapsed.as_secs_f64(),
            micros_per(Some(pg), takes),
            micros_per(Some(own), takes)
        )
    };
    let cpu = |(_, pg, own): (Duration, Duration, Duration)| (pg + own).as_secs_f64();
    rows.push(row(
        "budget",
        format!(
            "budget takes, {TAKERS} at once on {TAKE_USERS} users, gathered into one round trip (the worker's way), \
             {TAKE_ROUNDS} rounds alternated"
        ),
        figure(totals[1]),
        format!("a round trip per take, same run: {}", figure(totals[0])),
        format!("{:.0}% of the CPU", 100.0 * cpu(totals[1]) / cpu(totals[0])),
    ));
    Ok(())
}
