//! The change feed's cost and pace: the worker's drain with the feed's triggers on vs off (same
//! run, same webhooks) and with the push side held off, each with its CPU per webhook; the push
//! side alone and whether it keeps up with what the drain commits (its backlog); the least any feed
//! could cost here (its changes inserted bare and published, nothing else); and `GET /changes`
//! pages per second at `limit=1000`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::{Connection as _, PgConnection};
use tokio_util::sync::CancellationToken;

use calsync_common::db::changes;
use calsync_common::queue::message;

use crate::Ctx;
use crate::procs::{CpuMeter, IngestArgs, Who, machine_broker_pid, micros, share_text, start_ingest};
use crate::stats::{self, ratio, row};
use crate::worker::{
    DEFAULT_BATCH, PREFIX, Split, cpu_split, cpu_split_per, drain_meter, drains_at_0ms, queue_all, start_workers,
};
use crate::world::World;

const CONCURRENCY: u16 = 256;
const API_TOKEN: &str = "bench-internal-token";

/// The feed's triggers on or off (off = the drain as it was before the feed).
async fn set_feed(world: &World, on: bool) -> anyhow::Result<()> {
    let verb = if on { "ENABLE" } else { "DISABLE" };
    for table in ["meetings", "meeting_invitees"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE {table} {verb} TRIGGER USER")))
            .execute(&world.pool)
            .await?;
    }
    Ok(())
}

/// How a drain runs the feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// Triggers disabled: the drain as it was before the feed.
    Off,
    /// Everything on, as in production: the worker also numbers and publishes.
    On,
    /// Triggers on, but the bench holds the publisher's lock during the drain, so no worker numbers
    /// or publishes: what the feed costs the drain itself. The push side then catches up alone.
    PushHeld,
}

/// One drain of `bodies`; with the feed on, also how the push side kept up.
struct Drain {
    rate: f64,
    seconds: f64,
    changes: i64,
    max_backlog: i64,
    /// From the last commit of the drain until everything was published.
    catch_up: Duration,
    /// Where the drain's CPU went, per webhook (the push side's catch-up after it not included).
    split: Split,
    /// [`Feed::PushHeld`]: the push side alone, from its takeover to the last change published.
    push_alone: Option<(Duration, Split)>,
}

/// The least a change can cost here under the feed's contract — a row in the transaction that
/// makes the change and one confirmed message per change — measured on a held-off drain's own
/// changes after its workers stopped, with nothing else done ([`ratio_pairs`]). CPU per change, in
/// µs.
struct Floor {
    /// PostgreSQL's part of inserting the change bare: one INSERT per writer batch, as a writer
    /// that knew its changes would issue it, with no trigger, no check of what changed and no
    /// numbering.
    insert: f64,
    /// The bench's part of publishing it as the push side does (JSON body, `publish_in_order` in
    /// rounds of the publisher's batch), with nothing read, numbered or marked between rounds.
    publisher: f64,
    /// RabbitMQ's part of that publish: routing and confirming a persistent message no queue is
    /// bound to, which no publisher of one message per change can make cheaper.
    rabbitmq: f64,
}

/// How often the floor's insert and publish go over the changes: one pass takes a few hundred ms,
/// and `/proc` counts CPU in 10 ms ticks.
const FLOOR_PASSES: usize = 2;

/// Measures [`Floor`] on the changes in `change_log` (every one published by now), which
/// `deliveries` webhooks made.
async fn floor(ctx: &Ctx, world: &World, deliveries: usize) -> anyhow::Result<Floor> {
    let mut recorded = Vec::new();
    let mut conn = world.pool.acquire().await?;
    let mut from = changes::Cursor::from(0);
    loop {
        let page = changes::after(&mut conn, from, 1000).await?;
        let Some(last) = page.last() else { break };
        from = last.cursor;
        recorded.extend(page);
    }
    drop(conn);
    let insert = insert_floor(ctx, &recorded, deliveries).await?;
    let (publisher, rabbitmq) = publish_floor(ctx, &recorded).await?;
    Ok(Floor { insert, publisher, rabbitmq })
}

/// PostgreSQL's CPU per change to insert `recorded` into a copy of `change_log` (its indexes and
/// defaults, no trigger), in the changes a writer batch of [`DEFAULT_BATCH`] deliveries holds.
async fn insert_floor(ctx: &Ctx, recorded: &[changes::Change], deliveries: usize) -> anyhow::Result<f64> {
    let mut conn = PgConnection::connect(&ctx.db_url).await?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut conn).await?;
    sqlx::query("DROP TABLE IF EXISTS bench_floor").execute(&mut conn).await?;
    sqlx::query("CREATE TABLE bench_floor (LIKE change_log INCLUDING ALL)").execute(&mut conn).await?;
    let per_batch = (recorded.len() * DEFAULT_BATCH / deliveries.max(1)).max(1);
    let meter = CpuMeter::start(vec![Who::Pid(Some(backend as u32))]);
    // One transaction: no commit is charged to the floor (the writer commits its batch anyway).
    let mut tx = conn.begin().await?;
    for _ in 0..FLOOR_PASSES {
        for batch in recorded.chunks(per_batch) {
            sqlx::query(
                "INSERT INTO bench_floor (user_id, kind, meeting_id, calendly_event_uri, invitee_id, status, cause) \
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::uuid[], $6::text[], $7::text[])",
            )
            .bind(batch.iter().map(|c| c.user_id).collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.kind.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.meeting_id).collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.calendly_event_uri.as_deref()).collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.invitee_id).collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.status.as_deref()).collect::<Vec<_>>())
            .bind(batch.iter().map(|c| c.cause.as_str()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    let used = meter.used()[0];
    sqlx::query("DROP TABLE bench_floor").execute(&mut conn).await?;
    conn.close().await?;
    micros(used, (recorded.len() * FLOOR_PASSES) as u64).context("PostgreSQL's backend CPU could not be read")
}

/// The bench's and RabbitMQ's CPU per change to publish `recorded` to `calsync.changes` as the
/// push side does, and nothing else.
async fn publish_floor(ctx: &Ctx, recorded: &[changes::Change]) -> anyhow::Result<(f64, f64)> {
    let broker = crate::broker(ctx, PREFIX, 1).await?;
    let exchange = broker.topology().changes_exchange();
    let meter = CpuMeter::start(vec![Who::Pid(Some(std::process::id())), Who::Pid(machine_broker_pid())]);
    for _ in 0..FLOOR_PASSES {
        for round in recorded.chunks(calsync_worker::change_publisher::BATCH as usize) {
            let messages: Vec<_> = round.iter().map(message::change).collect();
            broker.publish_in_order(&exchange, &messages).await?;
        }
    }
    let used = meter.used();
    broker.close().await;
    let n = (recorded.len() * FLOOR_PASSES) as u64;
    let publisher = micros(used[0], n).context("the bench's CPU could not be read")?;
    let rabbitmq = micros(used[1], n).context("RabbitMQ's CPU could not be read")?;
    Ok((publisher, rabbitmq))
}

async fn drain(ctx: &Ctx, world: &World, bodies: &[Vec<u8>], feed: Feed) -> anyhow::Result<Drain> {
    set_feed(world, feed != Feed::Off).await?;
    world.truncate().await?;
    crate::purge(ctx, &calsync_common::queue::Topology::new(PREFIX).webhooks_queue()).await?;
    queue_all(ctx, bodies).await?;
    let mut holder = match feed {
        Feed::PushHeld => {
            let mut holder = PgConnection::connect(&ctx.db_url).await?;
            sqlx::query("SELECT pg_advisory_lock($1)").bind(changes::PUBLISHER_LOCK).execute(&mut holder).await?;
            Some(holder)
        }
        Feed::Off | Feed::On => None,
    };
    let max_backlog = Arc::new(AtomicI64::new(0));
    let stop = CancellationToken::new();
    // Only while the push side keeps pace: held off, the backlog is every change so far, and
    // counting it ten times a second would charge the drain for the bench's own queries.
    let sampler = (feed == Feed::On).then(|| {
        let (pool, max_backlog, stop) = (world.pool.clone(), max_backlog.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(mut conn) = pool.acquire().await
                    && let Ok(backlog) = changes::unpublished(&mut conn).await
                {
                    max_backlog.fetch_max(backlog, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let workers = start_workers(ctx, world, 1, CONCURRENCY, DEFAULT_BATCH).await?;
    let (meter, started) = (drain_meter(&workers, world), Instant::now());
    let seconds = world.wait_processed(bodies.len(), Duration::from_secs(900)).await?;
    let split = cpu_split(&meter, workers.len(), bodies.len() as u64, started.elapsed().as_secs_f64());
    let drained = Instant::now();
    // Every change is committed by now (the drain is over).
    let changes: i64 = sqlx::query_scalar("SELECT count(*) FROM change_log").fetch_one(&world.pool).await?;
    let mut push_alone = None;
    if let Some(holder) = holder.take() {
        holder.close().await?;
        wait_for_publisher(world, drained).await?;
        let (meter, took_over) = (drain_meter(&workers, world), Instant::now());
        wait_published(world, drained).await?;
        let split = cpu_split_per(&meter, workers.len(), changes as u64, "change", took_over.elapsed().as_secs_f64());
        push_alone = Some((took_over.elapsed(), split));
    } else {
        wait_published(world, drained).await?;
    }
    let catch_up = drained.elapsed();
    stop.cancel();
    if let Some(sampler) = sampler {
        sampler.await?;
    }
    for w in workers {
        w.stop().await;
    }
    let max_backlog = max_backlog.load(Ordering::Relaxed);
    Ok(Drain { rate: bodies.len() as f64 / seconds, seconds, changes, max_backlog, catch_up, split, push_alone })
}

/// Until a worker holds the publisher's lock (it tries every few seconds).
async fn wait_for_publisher(world: &World, since: Instant) -> anyhow::Result<()> {
    while calsync_testkit::advisory_lock_holders(&world.pool, changes::PUBLISHER_LOCK).await == 0 {
        anyhow::ensure!(since.elapsed() < Duration::from_secs(60), "no worker took the publisher's lock in a minute");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Until every committed change is published.
async fn wait_published(world: &World, since: Instant) -> anyhow::Result<()> {
    let mut conn = world.pool.acquire().await?;
    while changes::unpublished(&mut conn).await? > 0 {
        anyhow::ensure!(since.elapsed() < Duration::from_secs(300), "the publisher did not catch up in 5 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `--only changes-pairs`: the drain with the feed off and, right beside it, with the feed on (as in
/// production), `pairs` times, and the median of the ratios. The order is reversed every other pair
/// (off, on, held off; then held off, on, off) so that whatever a drain leaves the disk to do does not
/// always land on the same side.
///
/// Each pair also drains with the push side held off, then times the push side alone: the feed's
/// parts are the held-off drain (recording the changes) and the push side's CPU per change ×
/// changes per delivery (numbering, reading, publishing). Where the machine is as busy in every
/// drain, the feed-off CPU per delivery ÷ their sum is the ratio the parts add up to (checked
/// against the feed-on drain measured beside it) — and, with PostgreSQL's part of the push side
/// left out, what it would be were numbering and reading free. After the held-off drain the bench
/// also inserts its changes bare and publishes them with nothing else done ([`Floor`]): feed-off
/// CPU ÷ (feed off + that) is about the most any feed keeping the contract could reach here: an
/// estimate, by the same reading of CPU as time (which holds where every drain keeps the machine
/// equally busy).
pub async fn ratio_pairs(ctx: &Ctx, world: &World, rows: &mut Vec<stats::Row>, pairs: usize) -> anyhow::Result<()> {
    let bodies = drains_at_0ms(ctx, world).await?;
    let (mut ratios, mut reaches, mut reaches_free) = (Vec::new(), Vec::new(), Vec::new());
    let (mut leasts, mut leasts_broker) = (Vec::new(), Vec::new());
    for pair in 1..=pairs {
        let order =
            if pair % 2 == 1 { [Feed::Off, Feed::On, Feed::PushHeld] } else { [Feed::PushHeld, Feed::On, Feed::Off] };
        let (mut drains, mut held_floor) = (Vec::new(), None);
        for feed in order {
            drains.push((feed, drain(ctx, world, &bodies, feed).await?));
            // On the held-off drain's own changes, while `change_log` holds them (the next drain
            // empties it) and its workers have stopped.
            if feed == Feed::PushHeld {
                held_floor = Some(floor(ctx, world, bodies.len()).await?);
            }
        }
        let take = |feed: Feed| drains.iter().find(|(f, _)| *f == feed).map(|(_, d)| d).expect("drained");
        let (off, on, held) = (take(Feed::Off), take(Feed::On), take(Feed::PushHeld));
        ratios.push(on.rate / off.rate);
        let first = if pair % 2 == 1 { "off" } else { "held off" };
        eprintln!(
            "  pair {pair}/{pairs} ({first} first): {:.0}/s vs {:.0}/s = {}",
            on.rate,
            off.rate,
            ratio(on.rate, off.rate)
        );
        rows.push(row(
            "changes",
            format!(
                "pair {pair}/{pairs} ({first} first): drain {} webhooks, API 0 ms, 1 process × {CONCURRENCY}, batch \
                 {DEFAULT_BATCH}, feed on; {}",
                bodies.len(),
                on.split
            ),
            format!("{:.0}/s", on.rate),
            format!("feed off {:.0}/s; {}", off.rate, off.split),
            ratio(on.rate, off.rate),
        ));
        let Some((_, push)) = &held.push_alone else { continue };
        let per_delivery = held.changes as f64 / bodies.len() as f64;
        let parts = (off.split.total(), held.split.total(), push.total(), push.worker.zip(push.rabbitmq));
        let (Some(off_cpu), Some(held_cpu), Some(push_cpu), Some((push_worker, push_rabbitmq))) = parts else {
            continue;
        };
        let reach = off_cpu / (held_cpu + per_delivery * push_cpu);
        let reach_free = off_cpu / (held_cpu + per_delivery * (push_worker + push_rabbitmq));
        reaches.push(reach);
        reaches_free.push(reach_free);
        eprintln!(
            "    the parts add up to {:.0}%, {:.0}% were numbering and reading free",
            100.0 * reach,
            100.0 * reach_free
        );
        rows.push(row(
            "changes",
            format!(
                "pair {pair}/{pairs}: what the parts add up to, feed-off CPU ÷ (push held off + {per_delivery:.2} changes \
                 × push side alone), per delivery; were numbering and reading free (PostgreSQL's part left out)"
            ),
            format!(
                "{off_cpu:.0} µs ÷ ({held_cpu:.0} + {per_delivery:.2} × {push_cpu:.0} µs) = {:.0}%; {:.0}%",
                100.0 * reach,
                100.0 * reach_free
            ),
            format!("push held off {:.0}/s, {}; push side alone: {push}", held.rate, held.split),
            share_text(Some(reach)),
        ));
        let Some(floor) = &held_floor else { continue };
        // Feed off plus the least the feed's changes cost: what the best feed could reach, by the
        // same reading of CPU as time as the parts above. 90 % allows feed off ÷ 9 per delivery.
        let least = per_delivery * (floor.insert + floor.publisher + floor.rabbitmq);
        let least_broker = per_delivery * (floor.insert + floor.rabbitmq);
        let (best, best_broker) = (off_cpu / (off_cpu + least), off_cpu / (off_cpu + least_broker));
        leasts.push(best);
        leasts_broker.push(best_broker);
        eprintln!(
            "    the least the feed could cost: {least:.0} µs per delivery ({:.0}% of feed off); {least_broker:.0} µs \
             ({:.0}%) with the publisher free",
            100.0 * best,
            100.0 * best_broker
        );
        rows.push(row(
            "changes",
            format!(
                "pair {pair}/{pairs}: the least any feed could cost here, feed-off CPU ÷ (feed off + {per_delivery:.2} \
                 changes × (bare insert + publish + RabbitMQ)), per delivery; and were the publisher free"
            ),
            format!(
                "{off_cpu:.0} µs ÷ ({off_cpu:.0} + {per_delivery:.2} × ({:.0} + {:.0} + {:.0} µs)) = {:.0}%; {:.0}%",
                floor.insert,
                floor.publisher,
                floor.rabbitmq,
                100.0 * best,
                100.0 * best_broker
            ),
            format!("90 % allows {:.0} µs per delivery; the least is {least:.0} µs", off_cpu / 9.0),
            share_text(Some(best)),
        ));
    }
    set_feed(world, true).await?;
    rows.push(stats::median_row("changes", "drain with the feed on ÷ without it", ratios, stats::Unit::Percent, 0.9));
    if reaches.len() == pairs {
        let what = "what the parts add up to (push held off + push side alone)";
        rows.push(stats::median_row("changes", what, reaches, stats::Unit::Percent, 0.9));
        let what = "the same, were numbering and reading free";
        rows.push(stats::median_row("changes", what, reaches_free, stats::Unit::Percent, 0.9));
    }
    if leasts.len() == pairs {
        let what = "the least any feed could cost (bare insert + publish + RabbitMQ per change)";
        rows.push(stats::median_row("changes", what, leasts, stats::Unit::Percent, 0.9));
        let what = "the same, were the publisher free (bare insert + RabbitMQ)";
        rows.push(stats::median_row("changes", what, leasts_broker, stats::Unit::Percent, 0.9));
    }
    crate::reset_topology(ctx, PREFIX).await
}

/// `GET /changes?limit=1000` read from the start to the end, again and again, for the run's duration.
async fn pages_per_second(ctx: &Ctx, world: &World) -> anyhow::Result<(f64, i64)> {
    let args = IngestArgs {
        amqp_url: ctx.amqp_url.clone(),
        prefix: PREFIX,
        signing_key: "bench-unused-key",
        token_key: world.token_key.clone(),
        extra: vec![("INTERNAL_API_TOKEN", API_TOKEN.into())],
    };
    let (ingest, url) = start_ingest(ctx, args).await?;
    let started = Instant::now();
    let (mut pages, mut cursor) = (0i64, String::new());
    let mut changes_read = 0i64;
    while started.elapsed() < ctx.duration {
        let page: serde_json::Value = ctx
            .http
            .get(format!("{url}/changes?limit=1000&after={cursor}"))
            .bearer_auth(API_TOKEN)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let n = page["changes"].as_array().map_or(0, Vec::len);
        pages += 1;
        changes_read += n as i64;
        // At the end: start over, as a new reader would.
        cursor = if n == 0 { String::new() } else { page["next_cursor"].as_str().unwrap_or_default().to_owned() };
    }
    let rate = pages as f64 / started.elapsed().as_secs_f64();
    ingest.stop().await;
    Ok((rate, changes_read))
}

pub async fn run(ctx: &Ctx, world: &World, rows: &mut Vec<stats::Row>) -> anyhow::Result<()> {
    let bodies = drains_at_0ms(ctx, world).await?;
    // Alternated, twice each, so a slow disk moment does not land on one side only.
    let (mut off, mut on, mut held) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..2 {
        off.push(drain(ctx, world, &bodies, Feed::Off).await?);
        on.push(drain(ctx, world, &bodies, Feed::On).await?);
        held.push(drain(ctx, world, &bodies, Feed::PushHeld).await?);
    }
    set_feed(world, true).await?;
    fn best(runs: &[Drain]) -> &Drain {
        runs.iter().max_by(|a, b| a.rate.total_cmp(&b.rate)).expect("two runs")
    }
    let (off_best, on_best, held_best) = (best(&off), best(&on), best(&held));
    rows.push(row(
        "changes",
        format!(
            "drain {} webhooks, API 0 ms, 1 process × {CONCURRENCY}, batch {DEFAULT_BATCH}: feed on (best of 2); {}",
            bodies.len(),
            on_best.split
        ),
        format!("{:.0}/s", on_best.rate),
        format!("feed off, same run {:.0}/s (target ≥ 90 %); {}", off_best.rate, off_best.split),
        ratio(on_best.rate, off_best.rate),
    ));
    rows.push(row(
        "changes",
        format!(
            "the same drain with the push side held off (the bench holds its lock: changes recorded, none numbered or published) (best of 2); {}",
            held_best.split
        ),
        format!("{:.0}/s", held_best.rate),
        format!("feed off, same run {:.0}/s", off_best.rate),
        ratio(held_best.rate, off_best.rate),
    ));
    if let Some((took, split)) = &held_best.push_alone {
        rows.push(row(
            "changes",
            format!(
                "then the push side alone, once let go: numbers and publishes those {} changes; {split}",
                held_best.changes
            ),
            format!("{:.0} changes/s", held_best.changes as f64 / took.as_secs_f64()),
            "-",
            "-",
        ));
    }
    let last = on.last().expect("two runs");
    let committed = last.changes as f64 / last.seconds;
    let published = last.changes as f64 / (last.seconds + last.catch_up.as_secs_f64());
    rows.push(row(
        "changes",
        format!(
            "push side during that drain: {} changes, max backlog {}, caught up {:.1} s after the last commit",
            last.changes,
            last.max_backlog,
            last.catch_up.as_secs_f64()
        ),
        format!("{published:.0} changes/s published"),
        format!("{committed:.0} changes/s committed"),
        ratio(published, committed),
    ));
    let (pages, read) = pages_per_second(ctx, world).await?;
    rows.push(row(
        "changes",
        format!("GET /changes?limit=1000 over {} changes ({read} read)", last.changes),
        format!("{pages:.0} pages/s"),
        "-",
        "-",
    ));
    crate::reset_topology(ctx, PREFIX).await?;
    Ok(())
}
