//! Worker: drain rate of K pre-queued webhooks at several concurrencies, 1 and 2 processes, with
//! the simulator at 0 and 50 ms; the ceiling is raw upserts of the same rows with the same pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use calsync_common::calendly::types::{Invitee, ScheduledEvent, WebhookEnvelope};
use calsync_common::db::inbox::{self, InboxRecord, InboxStatus};
use calsync_common::db::{connections, meetings};
use calsync_common::meeting::{Meeting, MeetingInvitee};
use calsync_common::queue::message;

use crate::Ctx;
use crate::procs::{CpuMeter, Memory, Proc, Who, machine_broker_pid, micros, micros_text, share_text, wait_ok};
use crate::stats::{self, ratio, row};
use crate::world::{USERS, World};

pub const PREFIX: &str = "bench-worker";
/// `WORKER_BATCH_SIZE`'s default, used wherever the batch size is not what is measured.
pub const DEFAULT_BATCH: usize = 64;
const CURVE_CONCURRENCY: u16 = 256;

/// The write transaction of one delivery, without AMQP or HTTP: share-lock the connection, upsert
/// meeting and invitee (event snapshot from the payload), record the inbox row, commit.
/// The worker's pool size for `concurrency` (the same formula as `WorkerSettings::db_pool_size`).
pub fn pool_size(concurrency: u16) -> u32 {
    (u32::from(concurrency) / 4).clamp(4, 16)
}

async fn upsert_ceiling(world: &World, bodies: &[Vec<u8>], concurrency: u16) -> anyhow::Result<f64> {
    world.truncate().await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(pool_size(concurrency))
        .connect_with((*world.pool.connect_options()).clone())
        .await?;
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(bodies)
        .map(|body| {
            let pool = pool.clone();
            async move {
                let envelope: WebhookEnvelope = serde_json::from_slice(body)?;
                let invitee: Invitee = serde_json::from_value(envelope.payload.clone())?;
                let event: ScheduledEvent = serde_json::from_value(envelope.payload["scheduled_event"].clone())?;
                let connection = &world.connections[&envelope.created_by];
                let id = message::message_id(body);
                let mut tx = pool.begin().await?;
                anyhow::ensure!(connections::lock_if_linked(&mut tx, connection).await?);
                let meeting =
                    meetings::upsert_meeting(&mut tx, connection.user_id, &Meeting::from_event(&event)).await?;
                let invitee = MeetingInvitee::of_event(&event, &invitee)?;
                meetings::upsert_invitees(&mut tx, &[(meeting, &invitee)]).await?;
                let record = InboxRecord {
                    message_id: &id,
                    event: Some(&envelope.event),
                    created_by: Some(&envelope.created_by),
                    received_at: time::OffsetDateTime::now_utc(),
                    status: InboxStatus::Processed,
                    attempts: 1,
                    last_error: None,
                    body,
                    traceparent: None,
                };
                inbox::record(&mut *tx, &record).await?;
                tx.commit().await?;
                Ok(())
            }
        })
        .buffer_unordered(usize::from(concurrency))
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    for r in results {
        r?;
    }
    pool.close().await;
    Ok(bodies.len() as f64 / elapsed)
}

pub async fn queue_all(ctx: &Ctx, bodies: &[Vec<u8>]) -> anyhow::Result<()> {
    let broker = crate::broker(ctx, PREFIX, 4).await?;
    let sent = Arc::new(AtomicUsize::new(0));
    let results: Vec<Result<(), calsync_common::queue::PublishError>> = futures_util::stream::iter(bodies)
        .map(|b| {
            let (broker, sent) = (broker.clone(), sent.clone());
            async move {
                broker.publish(&message::webhook(b.clone(), time::OffsetDateTime::now_utc())).await?;
                sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    broker.close().await;
    for r in results {
        r?;
    }
    let depth = crate::depth(ctx, &calsync_common::queue::Topology::new(PREFIX).webhooks_queue()).await?;
    anyhow::ensure!(depth as usize == bodies.len(), "queued {depth} of {}", bodies.len());
    Ok(())
}

pub async fn start_workers(
    ctx: &Ctx,
    world: &World,
    processes: usize,
    concurrency: u16,
    batch: usize,
) -> anyhow::Result<Vec<Proc>> {
    start_workers_with(ctx, world, processes, concurrency, batch, &[]).await
}

/// [`start_workers`] with more environment variables (traces on, say).
pub async fn start_workers_with(
    ctx: &Ctx,
    world: &World,
    processes: usize,
    concurrency: u16,
    batch: usize,
    extra: &[(&'static str, String)],
) -> anyhow::Result<Vec<Proc>> {
    let mut procs = Vec::new();
    for _ in 0..processes {
        let mut env = world.worker_env(ctx, PREFIX, concurrency)?;
        env.push(("WORKER_BATCH_SIZE", batch.to_string()));
        env.extend(extra.iter().cloned());
        let addr = env.iter().find(|(k, _)| *k == "WORKER_ADDR").map(|(_, v)| v.clone()).unwrap_or_default();
        let env: Vec<(&str, String)> = env;
        procs.push((Proc::spawn("calsync-worker", &env, &[])?, addr));
    }
    for (_, addr) in &procs {
        wait_ok(&ctx.http, &format!("http://{addr}/healthz")).await?;
    }
    Ok(procs.into_iter().map(|(p, _)| p).collect())
}

/// Whose CPU a drain is charged with: the worker processes, PostgreSQL, RabbitMQ, the simulator.
pub(crate) fn drain_meter(workers: &[Proc], world: &World) -> CpuMeter {
    let mut who: Vec<Who> = workers.iter().map(|w| Who::Pid(w.child.id())).collect();
    who.extend([Who::Comm("postgres"), Who::Pid(machine_broker_pid()), Who::Pid(world.sim.child.id())]);
    CpuMeter::start(who)
}

/// The CPU split of a drain of `n` deliveries: µs per delivery for the workers (together),
/// PostgreSQL, RabbitMQ and the simulator, and the machine's busy share of its cores.
pub(crate) fn cpu_split(meter: &CpuMeter, workers: usize, n: u64, seconds: f64) -> Split {
    cpu_split_per(meter, workers, n, "delivery", seconds)
}

/// [`cpu_split`] per `n` units of another name (changes published, say).
pub(crate) fn cpu_split_per(meter: &CpuMeter, workers: usize, n: u64, unit: &'static str, seconds: f64) -> Split {
    let used = meter.used();
    let worker_cpu = used[..workers].iter().copied().sum::<Option<std::time::Duration>>();
    Split {
        unit,
        worker: micros(worker_cpu, n),
        postgres: micros(used[workers], n),
        rabbitmq: micros(used[workers + 1], n),
        simulator: micros(used[workers + 2], n),
        busy: meter.busy_share(seconds),
    }
}

/// Where a stretch's CPU went, per unit of work, in µs (`None`: not known).
pub(crate) struct Split {
    unit: &'static str,
    pub worker: Option<f64>,
    pub postgres: Option<f64>,
    pub rabbitmq: Option<f64>,
    pub simulator: Option<f64>,
    /// The machine's busy share of its cores meanwhile.
    pub busy: Option<f64>,
}

impl Split {
    /// Every metered process together.
    pub fn total(&self) -> Option<f64> {
        Some(self.worker? + self.postgres? + self.rabbitmq? + self.simulator?)
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPU per {}: worker(s) {} / PostgreSQL {} / RabbitMQ {} / simulator {}; machine busy {}",
            self.unit,
            micros_text(self.worker),
            micros_text(self.postgres),
            micros_text(self.rabbitmq),
            micros_text(self.simulator),
            share_text(self.busy)
        )
    }
}

pub async fn run(ctx: &Ctx, world: &World, rows: &mut Vec<stats::Row>) -> anyhow::Result<Memory> {
    crate::reset_topology(ctx, PREFIX).await?;
    let idle = start_workers(ctx, world, 1, 32, DEFAULT_BATCH).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_mib = idle[0].rss_mib();
    for p in idle {
        p.stop().await;
    }

    let bodies = world.generate(ctx, ctx.webhooks, 10).await?;
    let mut ceilings = Vec::new();
    for &c in &ctx.concurrencies {
        ceilings.push((c, upsert_ceiling(world, &bodies, c).await?));
    }
    let mut peak_mib: f64 = 0.0;
    for latency in [0u64, 50] {
        world.set_latency(ctx, latency).await?;
        for processes in [1usize, 2] {
            for &(c, ceiling) in &ceilings {
                world.truncate().await?;
                crate::purge(ctx, &calsync_common::queue::Topology::new(PREFIX).webhooks_queue()).await?;
                queue_all(ctx, &bodies).await?;
                let calls_before = world.counter(ctx, &["calls", "get_event"]).await?;
                let workers = start_workers(ctx, world, processes, c, DEFAULT_BATCH).await?;
                let (meter, started) = (drain_meter(&workers, world), Instant::now());
                let seconds = world.wait_processed(bodies.len(), Duration::from_secs(900)).await?;
                let split = cpu_split(&meter, workers.len(), bodies.len() as u64, started.elapsed().as_secs_f64());
                for w in &workers {
                    peak_mib = peak_mib.max(w.peak_rss_mib());
                }
                for w in workers {
                    w.stop().await;
                }
                let calls = world.counter(ctx, &["calls", "get_event"]).await? - calls_before;
                let rate = bodies.len() as f64 / seconds;
                let (ceiling_text, ratio_text) = if latency == 0 {
                    (format!("upserts {ceiling:.0}/s (pool {})", pool_size(c)), ratio(rate, ceiling))
                } else {
                    (
                        format!(
                            "{} in flight / {latency} ms = {:.0}/s",
                            c as usize * processes,
                            (c as usize * processes) as f64 * 1000.0 / latency as f64
                        ),
                        ratio(rate, (c as usize * processes) as f64 * 1000.0 / latency as f64),
                    )
                };
                rows.push(row(
                    "worker",
                    format!("drain {} webhooks, API {latency} ms, {processes} process(es) × concurrency {c}; API calls/webhook {:.2}; {split}", bodies.len(), calls / bodies.len() as f64),
                    format!("{rate:.0}/s"),
                    ceiling_text,
                    ratio_text,
                ));
            }
        }
    }

    // The batch-size curve: one process at concurrency 256 (a batch never holds more deliveries than
    // are in flight), API at 0 ms, against one transaction per delivery at the same concurrency.
    world.set_latency(ctx, 0).await?;
    let single = upsert_ceiling(world, &bodies, CURVE_CONCURRENCY).await?;
    for batch in [1usize, 8, 64, 256] {
        let drain = drain_batched(ctx, world, &bodies, batch).await?;
        peak_mib = peak_mib.max(drain.peak_mib);
        rows.push(row(
            "worker",
            format!(
                "drain {} webhooks, API 0 ms, 1 process × concurrency {CURVE_CONCURRENCY}, WORKER_BATCH_SIZE {batch}; {}",
                bodies.len(),
                drain.split
            ),
            format!("{:.0}/s", drain.rate),
            format!("one transaction per delivery {single:.0}/s (target ≥ 2.5×)"),
            ratio(drain.rate, single),
        ));
    }

    // Refreshes per expiry: every token expires within the margin, 2 processes race for them.
    world.set_latency(ctx, 0).await?;
    sqlx::query("UPDATE calendar_connections SET token_expires_at = now() + interval '1 minute'")
        .execute(&world.pool)
        .await?;
    let sample: Vec<Vec<u8>> = bodies.iter().take(2000.min(bodies.len())).cloned().collect();
    world.truncate().await?;
    queue_all(ctx, &sample).await?;
    let (grants_before, reuse_before) = (
        world.counter(ctx, &["token_grants", "refresh_token"]).await?,
        world.counter(ctx, &["refresh_token_reuse_attempts"]).await?,
    );
    let workers = start_workers(ctx, world, 2, 64, DEFAULT_BATCH).await?;
    world.wait_processed(sample.len(), Duration::from_secs(300)).await?;
    for w in workers {
        w.stop().await;
    }
    let grants = world.counter(ctx, &["token_grants", "refresh_token"]).await? - grants_before;
    let reuse = world.counter(ctx, &["refresh_token_reuse_attempts"]).await? - reuse_before;
    rows.push(row(
        "worker",
        format!(
            "token refreshes per expiry ({USERS} expiring connections, {} webhooks, 2 processes × 64)",
            sample.len()
        ),
        format!("{:.2} (refresh-token reuse: {reuse:.0})", grants / USERS as f64),
        "exactly 1",
        if grants as usize == USERS && reuse == 0.0 { "✓" } else { "✗" },
    ));
    crate::reset_topology(ctx, PREFIX).await?;
    Ok(Memory { idle_mib, peak_mib })
}

/// One drain of the batch-size curve: what it reached and whose CPU it took.
struct Drain {
    rate: f64,
    split: Split,
    peak_mib: f64,
}

/// Drains `bodies` through one worker process at the curve's concurrency with `batch`, API at 0 ms.
async fn drain_batched(ctx: &Ctx, world: &World, bodies: &[Vec<u8>], batch: usize) -> anyhow::Result<Drain> {
    world.truncate().await?;
    crate::purge(ctx, &calsync_common::queue::Topology::new(PREFIX).webhooks_queue()).await?;
    queue_all(ctx, bodies).await?;
    let workers = start_workers(ctx, world, 1, CURVE_CONCURRENCY, batch).await?;
    let (meter, started) = (drain_meter(&workers, world), Instant::now());
    let seconds = world.wait_processed(bodies.len(), Duration::from_secs(900)).await?;
    let split = cpu_split(&meter, workers.len(), bodies.len() as u64, started.elapsed().as_secs_f64());
    let peak_mib = workers.iter().map(Proc::peak_rss_mib).fold(0.0, f64::max);
    for w in workers {
        w.stop().await;
    }
    Ok(Drain { rate: bodies.len() as f64 / seconds, split, peak_mib })
}

/// A fresh topology for drains (a broker declares what they purge), the simulator at 0 ms, and the
/// webhooks every drain then pre-queues.
pub async fn drains_at_0ms(ctx: &Ctx, world: &World) -> anyhow::Result<Vec<Vec<u8>>> {
    crate::reset_topology(ctx, PREFIX).await?;
    crate::broker(ctx, PREFIX, 1).await?.close().await;
    world.set_latency(ctx, 0).await?;
    world.generate(ctx, ctx.webhooks, 10).await
}

/// The worker's target (≥ 2.5× one transaction per delivery) read as pairs: each batched drain
/// right after its own ceiling, `pairs` times, so a ceiling that drifts with the disk between
/// minutes moves both sides of its ratio. One row per pair, then the median and range.
pub async fn ratio_pairs(ctx: &Ctx, world: &World, rows: &mut Vec<stats::Row>, pairs: usize) -> anyhow::Result<()> {
    let bodies = drains_at_0ms(ctx, world).await?;
    let mut ratios = Vec::new();
    for pair in 1..=pairs {
        let single = upsert_ceiling(world, &bodies, CURVE_CONCURRENCY).await?;
        let drain = drain_batched(ctx, world, &bodies, DEFAULT_BATCH).await?;
        ratios.push(drain.rate / single);
        eprintln!("  pair {pair}/{pairs}: {:.0}/s vs {single:.0}/s = {:.2}×", drain.rate, drain.rate / single);
        rows.push(row(
            "worker",
            format!(
                "pair {pair}/{pairs}: drain {} webhooks, API 0 ms, 1 process × concurrency {CURVE_CONCURRENCY}, \
                 WORKER_BATCH_SIZE {DEFAULT_BATCH}, right after its ceiling; {}",
                bodies.len(),
                drain.split
            ),
            format!("{:.0}/s", drain.rate),
            format!("one transaction per delivery {single:.0}/s"),
            format!("{:.2}×", drain.rate / single),
        ));
    }
    rows.push(stats::median_row("worker", "batched drain ÷ its ceiling", ratios, stats::Unit::Times, 2.5));
    crate::reset_topology(ctx, PREFIX).await?;
    Ok(())
}
