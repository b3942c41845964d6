//! What traces cost: ingest's throughput and a worker's drain with spans exported over OTLP/HTTP
//! to a local sink vs traces off, in the same run, alternating (off, on, off, on) so drift on a
//! shared machine falls on both sides.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::routing::post;

use crate::Ctx;
use crate::load::{self, SIGNING_KEY};
use crate::procs::{IngestArgs, start_ingest};
use crate::stats::{self, ratio, row};
use crate::worker::{DEFAULT_BATCH, PREFIX, queue_all, start_workers_with};
use crate::world::World;

const CONNECTIONS: usize = 64;
const CONCURRENCY: u16 = 64;

/// An OTLP/HTTP collector stand-in: accepts every export, counts requests and bytes.
struct Sink {
    url: String,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

async fn sink() -> anyhow::Result<Sink> {
    let (requests, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (r, b) = (requests.clone(), bytes.clone());
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| async move {
            r.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(body.len() as u64, Ordering::Relaxed);
            ""
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(Sink { url, requests, bytes })
}

fn otel(on: bool, sink: &Sink) -> Vec<(&'static str, String)> {
    if on { vec![("OTEL_EXPORTER_OTLP_ENDPOINT", sink.url.clone())] } else { Vec::new() }
}

async fn ingest_rate(ctx: &Ctx, env: Vec<(&'static str, String)>, seq: &Arc<AtomicU64>) -> anyhow::Result<f64> {
    let prefix = "bench-traces";
    crate::reset_topology(ctx, prefix).await?;
    let args = IngestArgs {
        amqp_url: ctx.amqp_url.clone(),
        prefix,
        signing_key: SIGNING_KEY,
        token_key: calsync_common::crypto::generate_key(),
        extra: env,
    };
    let (ingest, url) = start_ingest(ctx, args).await?;
    let (rps, _) = load::closed_loop(&format!("{url}/webhooks/calendly"), CONNECTIONS, ctx.duration, seq).await;
    ingest.stop().await;
    crate::reset_topology(ctx, prefix).await?;
    Ok(rps)
}

async fn drain_rate(
    ctx: &Ctx,
    world: &World,
    bodies: &[Vec<u8>],
    env: Vec<(&'static str, String)>,
) -> anyhow::Result<f64> {
    world.truncate().await?;
    crate::purge(ctx, &calsync_common::queue::Topology::new(PREFIX).webhooks_queue()).await?;
    queue_all(ctx, bodies).await?;
    let workers = start_workers_with(ctx, world, 1, CONCURRENCY, DEFAULT_BATCH, &env).await?;
    let seconds = world.wait_processed(bodies.len(), Duration::from_secs(900)).await?;
    for w in workers {
        w.stop().await;
    }
    Ok(bodies.len() as f64 / seconds)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

pub async fn run(ctx: &Ctx, world: &World, rows: &mut Vec<stats::Row>) -> anyhow::Result<()> {
    let sink = sink().await?;
    let seq = Arc::new(AtomicU64::new(5_000_000_000));
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..4 {
        let traced = round % 2 == 1;
        let rate = ingest_rate(ctx, otel(traced, &sink), &seq).await?;
        if traced { on.push(rate) } else { off.push(rate) }
    }
    let exported = (sink.requests.load(Ordering::Relaxed), sink.bytes.load(Ordering::Relaxed));
    rows.push(row(
        "traces",
        format!("ingest closed loop, {CONNECTIONS} connections: 202/s with traces exported / off (alternating, 2 runs each; {} OTLP requests, {:.1} MiB)", exported.0, exported.1 as f64 / 1048576.0),
        format!("{:.0}/s / {:.0}/s", mean(&on), mean(&off)),
        format!("off: {}", off.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")),
        ratio(mean(&on), mean(&off)),
    ));

    world.set_latency(ctx, 0).await?;
    // The workers' topology, declared (this section may run alone).
    crate::broker(ctx, PREFIX, 1).await?.close().await;
    let bodies = world.generate(ctx, ctx.webhooks, 10).await?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..4 {
        let traced = round % 2 == 1;
        let rate = drain_rate(ctx, world, &bodies, otel(traced, &sink)).await?;
        if traced { on.push(rate) } else { off.push(rate) }
    }
    rows.push(row(
        "traces",
        format!(
            "worker drain of {} webhooks, API 0 ms, concurrency {CONCURRENCY}: with traces exported / off (alternating, 2 runs each)",
            bodies.len()
        ),
        format!("{:.0}/s / {:.0}/s", mean(&on), mean(&off)),
        format!("off: {}", off.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")),
        ratio(mean(&on), mean(&off)),
    ));
    Ok(())
}
