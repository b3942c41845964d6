//! Ingest: closed-loop throughput and open-loop latency, against two ceilings measured in the
//! same run: the same HTTP stack answering 202 without publishing, and raw confirmed publishes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use calsync_common::calendly::signature::{self, WebhookVerifier};
use calsync_common::queue::{Broker, message};

use crate::Ctx;
use crate::load::{self, SIGNING_KEY};
use crate::procs::{Memory, Proc, free_port, wait_ok};
use crate::stats::{self, ms, ratio, row};

/// The HTTP-only ceiling: axum with the same body limit, signature check and message preparation
/// as ingest, answering 202 without publishing. Runs as its own process, like ingest.
pub async fn serve_ceiling(addr: &str) -> anyhow::Result<()> {
    let verifier =
        WebhookVerifier::new(vec![secrecy::SecretString::from(SIGNING_KEY.to_owned())], Duration::from_secs(180));
    async fn receive(
        State(verifier): State<WebhookVerifier>,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, axum::Json<serde_json::Value>) {
        let header = headers.get(signature::HEADER).and_then(|v| v.to_str().ok());
        let now = time::OffsetDateTime::now_utc();
        if verifier.verify(header, &body, now.unix_timestamp()).is_err() {
            return (StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({"error": "invalid_signature"})));
        }
        let prepared = message::webhook(body.to_vec(), now);
        (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "status": "queued", "message_id": message::message_id(&prepared.body) })),
        )
    }
    let app = Router::new()
        .route("/webhooks/calendly", post(receive).layer(DefaultBodyLimit::max(256 * 1024)))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(verifier);
    axum::serve(tokio::net::TcpListener::bind(addr).await?, app).await?;
    Ok(())
}

pub async fn publish_ceiling(broker: &Broker, concurrency: usize, duration: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (broker, done) = (broker.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while started.elapsed() < duration {
                    let msg =
                        message::webhook(load::body(t as u64 * 1_000_000_000 + n), time::OffsetDateTime::now_utc());
                    if broker.publish(&msg).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

pub async fn run(ctx: &Ctx, rows: &mut Vec<stats::Row>) -> anyhow::Result<Memory> {
    let prefix = "bench-ingest";
    crate::reset_topology(ctx, prefix).await?;
    let (ingest_port, ceiling_port) = (free_port()?, free_port()?);
    let ingest = Proc::spawn(
        "calsync-ingest",
        &[
            ("INGEST_ADDR", format!("127.0.0.1:{ingest_port}")),
            ("CALENDLY_WEBHOOK_SIGNING_KEYS", SIGNING_KEY.into()),
            ("TOKEN_ENCRYPTION_KEY", calsync_common::crypto::generate_key()),
            ("AMQP_URL", ctx.amqp_url.clone()),
            ("AMQP_TOPOLOGY_PREFIX", prefix.into()),
            ("DATABASE_URL", ctx.db_url.clone()),
        ],
        &[],
    )?;
    let ceiling = Proc::spawn("calsync-bench", &[], &["http-ceiling", "--addr", &format!("127.0.0.1:{ceiling_port}")])?;
    let (ingest_url, ceiling_url) =
        (format!("http://127.0.0.1:{ingest_port}"), format!("http://127.0.0.1:{ceiling_port}"));
    wait_ok(&ctx.http, &format!("{ingest_url}/readyz")).await?;
    wait_ok(&ctx.http, &format!("{ceiling_url}/healthz")).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_mib = ingest.rss_mib();

    let broker = crate::broker(ctx, prefix, 4).await?;
    let queue = broker.topology().webhooks_queue();
    let seq = Arc::new(AtomicU64::new(0));
    let (ingest_hook, ceiling_hook) =
        (format!("{ingest_url}/webhooks/calendly"), format!("{ceiling_url}/webhooks/calendly"));

    let mut capacity = 0.0f64;
    for connections in [1usize, 16, 64] {
        // Ceilings at the same concurrency: the same number of publishes (or requests) in flight.
        let publishes = publish_ceiling(&broker, connections, ctx.duration).await;
        crate::purge(ctx, &queue).await?;
        let (http_only, _) = load::closed_loop(&ctx.http, &ceiling_hook, connections, ctx.duration, &seq).await;
        let (rps, accepted) = load::closed_loop(&ctx.http, &ingest_hook, connections, ctx.duration, &seq).await;
        let held = crate::depth(ctx, &queue).await?;
        anyhow::ensure!(held == accepted, "queue holds {held} but ingest answered 202 {accepted} times");
        crate::purge(ctx, &queue).await?;
        capacity = capacity.max(rps);
        rows.push(row(
            "ingest",
            format!("closed loop, {connections} connection(s): 202/s (queue = 202s: {held} ✓)"),
            format!("{rps:.0}/s"),
            format!("HTTP-only {http_only:.0}/s; confirmed publishes {publishes:.0}/s"),
            ratio(rps, http_only.min(publishes)),
        ));
    }
    for rate in [1000u64, 5000] {
        let (latencies, failed) = load::open_loop(&ctx.http, &ingest_hook, rate, ctx.duration, &seq).await;
        let held = crate::depth(ctx, &queue).await?;
        anyhow::ensure!(
            held as usize == latencies.len(),
            "queue holds {held} but ingest answered 202 {} times",
            latencies.len()
        );
        crate::purge(ctx, &queue).await?;
        rows.push(row(
            "ingest",
            format!("open loop {rate}/s: p50 / p99 / p99.9 ({} not 202)", failed),
            format!(
                "{} / {} / {}",
                ms(stats::percentile(&latencies, 0.5)),
                ms(stats::percentile(&latencies, 0.99)),
                ms(stats::percentile(&latencies, 0.999))
            ),
            "-",
            "-",
        ));
    }
    overload(ctx, &ingest, &ingest_hook, &queue, capacity, &seq, rows).await?;
    let peak_mib = ingest.peak_rss_mib();
    broker.close().await;
    ingest.stop().await;
    ceiling.stop().await;
    crate::reset_topology(ctx, prefix).await?;
    Ok(Memory { idle_mib, peak_mib })
}

/// An open loop at twice the best closed-loop rate: what is shed (503 at once, past
/// INGEST_MAX_IN_FLIGHT), how fast the accepted requests still are, and ingest's memory meanwhile.
async fn overload(
    ctx: &Ctx,
    ingest: &Proc,
    hook: &str,
    queue: &str,
    capacity: f64,
    seq: &Arc<AtomicU64>,
    rows: &mut Vec<stats::Row>,
) -> anyhow::Result<()> {
    let rate = (capacity * 2.0).max(100.0) as u64;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sample = async {
        let mut peak = 0.0f64;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(ingest.rss_mib());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    };
    let offered = async {
        let result = load::open_loop(&ctx.http, hook, rate, ctx.duration, seq).await;
        stop.store(true, Ordering::Relaxed);
        result
    };
    let ((latencies, failed), peak) = tokio::join!(offered, sample);
    let held = crate::depth(ctx, queue).await?;
    anyhow::ensure!(
        held as usize == latencies.len(),
        "queue holds {held} but ingest answered 202 {} times",
        latencies.len()
    );
    crate::purge(ctx, queue).await?;
    let total = latencies.len() as f64 + failed as f64;
    rows.push(row(
        "ingest",
        format!("overload: open loop at 2× capacity ({rate}/s): shed share / p99 of 202s / RSS peak (queue = 202s ✓)"),
        format!(
            "{:.1}% / {} / {peak:.1} MiB",
            100.0 * failed as f64 / total.max(1.0),
            ms(stats::percentile(&latencies, 0.99))
        ),
        "target RSS ≤ 64 MiB",
        if peak <= 64.0 { "✓" } else { "✗" },
    ));
    Ok(())
}
