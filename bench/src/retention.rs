//! Retention's cost: pruning a 1-million-row inbox (every row past its retention) alone, and the
//! worker's drain of fresh webhooks with and without that pruning running beside it (same run, same
//! table size).

use std::time::{Duration, Instant};

use time::OffsetDateTime;

use calsync_common::db::inbox::InboxStatus;
use calsync_common::db::retention::prune_inbox;
use calsync_common::queue::message;

use crate::Ctx;
use crate::stats::{self, ratio, row};
use crate::worker::{DEFAULT_BATCH, PREFIX, queue_all, start_workers};
use crate::world::World;

const OLD_ROWS: i64 = 1_000_000;
const CONCURRENCY: u16 = 256;

/// An inbox of `OLD_ROWS` processed deliveries received 60 days ago (past the default 30).
async fn old_inbox(world: &World) -> anyhow::Result<()> {
    world.truncate().await?;
    sqlx::query(
        "INSERT INTO webhook_inbox (message_id, event, created_by, received_at, status, attempts, processed_at) \
         SELECT md5(i::text), 'invitee.created', 'https://api.calendly.com/users/U' || (i % 1000), \
                now() - interval '60 days', 'processed', 1, now() - interval '60 days' \
         FROM generate_series(1, $1) i",
    )
    .bind(OLD_ROWS)
    .execute(&world.pool)
    .await?;
    sqlx::raw_sql("VACUUM ANALYZE webhook_inbox").execute(&world.pool).await?;
    Ok(())
}

/// Prunes everything past 30 days; returns rows deleted per second.
async fn prune(pool: &sqlx::PgPool) -> anyhow::Result<f64> {
    let started = Instant::now();
    let statuses = [InboxStatus::Processed, InboxStatus::Ignored];
    let deleted = prune_inbox(pool, &statuses, OffsetDateTime::now_utc() - time::Duration::days(30)).await?;
    anyhow::ensure!(deleted as i64 == OLD_ROWS, "pruned {deleted} of {OLD_ROWS}");
    Ok(deleted as f64 / started.elapsed().as_secs_f64())
}

/// Drains `bodies` (fresh webhooks) over the old inbox; with `pruning`, retention deletes the old
/// rows meanwhile. Returns the drain's webhooks per second and, when pruning, its rows per second.
async fn drain(ctx: &Ctx, world: &World, bodies: &[Vec<u8>], pruning: bool) -> anyhow::Result<(f64, Option<f64>)> {
    old_inbox(world).await?;
    crate::purge(ctx, &calsync_common::queue::Topology::new(PREFIX).webhooks_queue()).await?;
    queue_all(ctx, bodies).await?;
    let ids: Vec<String> = bodies.iter().map(|b| message::message_id(b)).collect();
    let pruner = pruning.then(|| {
        let pool = world.pool.clone();
        tokio::spawn(async move { prune(&pool).await })
    });
    let workers = start_workers(ctx, world, 1, CONCURRENCY, DEFAULT_BATCH).await?;
    let started = Instant::now();
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM webhook_inbox WHERE message_id = ANY($1) AND status = $2")
                .bind(&ids)
                .bind(InboxStatus::Processed)
                .fetch_one(&world.pool)
                .await?;
        if done as usize == ids.len() {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(900), "drained {done} of {} in 15 minutes", ids.len());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rate = ids.len() as f64 / started.elapsed().as_secs_f64();
    for w in workers {
        w.stop().await;
    }
    let pruned = match pruner {
        Some(task) => Some(task.await??),
        None => None,
    };
    Ok((rate, pruned))
}

pub async fn run(ctx: &Ctx, world: &World, rows: &mut Vec<stats::Row>) -> anyhow::Result<()> {
    crate::reset_topology(ctx, PREFIX).await?;
    crate::broker(ctx, PREFIX, 1).await?.close().await;
    world.set_latency(ctx, 0).await?;

    old_inbox(world).await?;
    let alone = prune(&world.pool).await?;
    rows.push(row(
        "retention",
        format!("prune a {OLD_ROWS}-row inbox past its retention, batches of 1000, nothing else running"),
        format!("{alone:.0} rows/s"),
        "-",
        "-",
    ));

    let bodies = world.generate(ctx, ctx.webhooks, 10).await?;
    let (quiet, _) = drain(ctx, world, &bodies, false).await?;
    let bodies = world.generate(ctx, ctx.webhooks, 10).await?;
    let (busy, pruned) = drain(ctx, world, &bodies, true).await?;
    rows.push(row(
        "retention",
        format!(
            "drain {} webhooks, API 0 ms, 1 process × {CONCURRENCY}, over a {OLD_ROWS}-row inbox: pruning it meanwhile",
            bodies.len()
        ),
        format!("{busy:.0}/s (pruned {:.0} rows/s)", pruned.unwrap_or_default()),
        format!("not pruning, same run {quiet:.0}/s"),
        ratio(busy, quiet),
    ));
    world.truncate().await?;
    crate::reset_topology(ctx, PREFIX).await?;
    Ok(())
}
