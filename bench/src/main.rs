//! `calsync-bench`: measures ingest, the worker pool and the whole path on this machine, each
//! figure beside a ceiling measured in the same run, and prints a Markdown table.
//!
//! Run with `cargo run --release -p calsync-bench` (needs the local PostgreSQL and RabbitMQ).

mod budget;
mod changes;
mod cluster;
mod e2e;
mod import;
mod ingest;
mod load;
mod procs;
mod retention;
mod stats;
mod traces;
mod worker;
mod world;

use std::time::Duration;

use clap::{Parser, Subcommand};
use lapin::options::{QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;

use calsync_common::queue::{Broker, BrokerConfig, Topology};

#[derive(Parser)]
#[command(name = "calsync-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Webhooks pre-queued for each worker drain run.
    #[arg(long, default_value_t = 20_000)]
    webhooks: usize,
    /// Seconds per throughput/latency measurement.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Worker concurrencies to measure.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    concurrency: Vec<u16>,
    /// A few seconds per figure and 2,000 webhooks: for checking the harness, not for numbers.
    #[arg(long)]
    quick: bool,
    /// Sections to run (all by default): ingest, cluster, worker, changes, e2e, budget, retention, traces, import;
    /// `budget-cost` runs only the budget section's cost per call; `worker-pairs` the worker's
    /// batched drain right after its ceiling, `--pairs` times; `ingest-pairs` ingest's closed loop
    /// right after its confirmed-publish ceiling, `--pairs` times at each concurrency, beside its parts
    /// run together (an HTTP-only round trip then a raw publish per connection); `changes-pairs`
    /// the drain with the change feed off and on side by side, `--pairs` times.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ingest,cluster,worker,changes,e2e,budget,retention,traces,import"
    )]
    only: Vec<String>,
    /// Ceiling-then-figure pairs of `worker-pairs`, `ingest-pairs` and `changes-pairs`.
    #[arg(long, default_value_t = 5)]
    pairs: usize,
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// The benchmark's own database, recreated on every run.
    #[arg(long, env = "BENCH_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/calsync_bench")]
    database_url: String,
}

#[derive(Subcommand)]
enum Command {
    /// (internal) The HTTP-only ceiling server.
    #[command(hide = true)]
    HttpCeiling {
        #[arg(long)]
        addr: String,
    },
}

pub struct Ctx {
    pub http: reqwest::Client,
    pub amqp_url: String,
    pub db_url: String,
    pub duration: Duration,
    pub webhooks: usize,
    pub concurrencies: Vec<u16>,
}

pub async fn broker(ctx: &Ctx, prefix: &str, channels: usize) -> anyhow::Result<Broker> {
    let broker = Broker::start(BrokerConfig {
        url: secrecy::SecretString::from(ctx.amqp_url.clone()),
        topology: Topology::new(prefix),
        publish_channels: channels,
        confirm_timeout: Duration::from_secs(10),
        connection_name: "calsync-bench".into(),
    });
    anyhow::ensure!(broker.wait_ready(Duration::from_secs(10)).await, "RabbitMQ not reachable");
    Ok(broker)
}

async fn channel(ctx: &Ctx) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let conn = lapin::Connection::connect(&ctx.amqp_url, lapin::ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

pub async fn depth(ctx: &Ctx, queue: &str) -> anyhow::Result<u64> {
    let (conn, channel) = channel(ctx).await?;
    let options = QueueDeclareOptions { passive: true, ..Default::default() };
    let n = channel.queue_declare(queue.into(), options, FieldTable::default()).await?.message_count();
    let _ = conn.close(200, "ok".into()).await;
    Ok(u64::from(n))
}

pub async fn purge(ctx: &Ctx, queue: &str) -> anyhow::Result<()> {
    let (conn, channel) = channel(ctx).await?;
    channel.queue_purge(queue.into(), QueuePurgeOptions::default()).await?;
    let _ = conn.close(200, "ok".into()).await;
    Ok(())
}

/// Deletes every exchange and queue under `prefix`. Tried again (on a new connection) for a while:
/// RabbitMQ 3.10 can fail a quorum queue's deletion with INTERNAL_ERROR when it comes right after a
/// purge of a long log — its segment writer crashes on the directory being removed and restarts
/// (rabbitmq/ra#484, fixed in later Ra releases) — and the next attempt succeeds.
pub async fn reset_topology(ctx: &Ctx, prefix: &str) -> anyhow::Result<()> {
    let mut attempt = 1;
    loop {
        let deleted = async {
            let (conn, channel) = channel(ctx).await?;
            Topology::new(prefix).delete(&channel).await?;
            let _ = conn.close(200, "ok".into()).await;
            anyhow::Ok(())
        };
        match deleted.await {
            Ok(()) => return Ok(()),
            Err(error) if attempt < 5 => {
                eprintln!("  note: deleting the {prefix} topology failed ({error}); trying again");
                tokio::time::sleep(Duration::from_secs(2 * attempt)).await;
                attempt += 1;
            }
            Err(error) => return Err(error.context(format!("deleting the {prefix} topology, {attempt} attempts"))),
        }
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0));
    format!("{cores} cores ({cpu}), {mem} RAM")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::HttpCeiling { addr }) = cli.command {
        return ingest::serve_ceiling(&addr).await;
    }
    let ctx = Ctx {
        http: calsync_common::http::client_builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(30))
            .build()?,
        amqp_url: cli.amqp_url,
        db_url: cli.database_url,
        duration: Duration::from_secs(if cli.quick { 2 } else { cli.seconds }),
        webhooks: if cli.quick { 2_000 } else { cli.webhooks },
        concurrencies: if cli.quick { vec![16, 64] } else { cli.concurrency },
    };
    eprintln!("machine: {}", machine());
    let mut rows = Vec::new();
    let section = |name: &str| cli.only.iter().any(|s| s == name);
    let mut memories = Vec::new();
    if section("ingest") {
        eprintln!("▸ ingest");
        memories.push(("calsync-ingest", ingest::run(&ctx, &mut rows).await?));
    }
    if section("ingest-pairs") {
        eprintln!("▸ ingest: closed loop ÷ its confirmed-publish ceiling, {} pairs", cli.pairs);
        ingest::ratio_pairs(&ctx, &mut rows, cli.pairs.max(1)).await?;
    }
    if section("cluster") {
        eprintln!("▸ cluster");
        cluster::run(&ctx, &mut rows).await?;
    }
    let needs_world = [
        "worker",
        "worker-pairs",
        "changes",
        "changes-pairs",
        "e2e",
        "budget",
        "budget-cost",
        "retention",
        "traces",
        "import",
    ];
    if needs_world.iter().any(|name| section(name)) {
        let mut world = world::World::setup(&ctx).await?;
        if section("worker") {
            eprintln!("▸ worker");
            memories.push(("calsync-worker", worker::run(&ctx, &world, &mut rows).await?));
        }
        if section("worker-pairs") {
            eprintln!("▸ worker: batched drain ÷ its ceiling, {} pairs", cli.pairs);
            worker::ratio_pairs(&ctx, &world, &mut rows, cli.pairs.max(1)).await?;
        }
        if section("changes") {
            eprintln!("▸ change feed");
            changes::run(&ctx, &world, &mut rows).await?;
        }
        if section("changes-pairs") {
            eprintln!("▸ change feed: drain with the feed on ÷ without it, {} pairs", cli.pairs);
            changes::ratio_pairs(&ctx, &world, &mut rows, cli.pairs.max(1)).await?;
        }
        if section("e2e") {
            eprintln!("▸ end to end");
            e2e::run(&ctx, &world, &mut rows, 200).await?;
        }
        if section("budget") {
            eprintln!("▸ Calendly API budget (the burst takes over two minutes: real 60 s windows)");
            budget::run(&ctx, &mut world, &mut rows).await?;
        }
        if section("budget-cost") && !section("budget") {
            eprintln!("▸ Calendly API budget: cost per call");
            budget::costs(&world, &mut rows).await?;
        }
        if section("retention") {
            eprintln!("▸ retention");
            retention::run(&ctx, &world, &mut rows).await?;
        }
        if section("traces") {
            eprintln!("▸ traces on vs off");
            traces::run(&ctx, &world, &mut rows).await?;
        }
        if section("import") {
            eprintln!("▸ import of an existing integration's connections");
            import::run(&ctx, &world, &mut rows).await?;
        }
        world.sim.stop().await;
    }
    for (binary, memory) in memories {
        rows.push(stats::row(
            "memory",
            format!("{binary} RSS idle / peak"),
            format!("{:.1} / {:.1} MiB", memory.idle_mib, memory.peak_mib),
            "target idle ≤ 30 MB",
            "-",
        ));
    }
    println!("machine: {}\n", machine());
    stats::print(&rows);
    Ok(())
}
