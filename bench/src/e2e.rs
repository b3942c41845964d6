//! End to end: signed POST to ingest → meeting row committed, at a fixed rate, API at 50 ms.

use std::collections::HashMap;
use std::time::Duration;

use time::OffsetDateTime;

use calsync_common::calendly::signature;
use calsync_common::db::inbox::InboxStatus;
use calsync_common::queue::message;

use crate::Ctx;
use crate::procs::{IngestArgs, Proc, start_ingest};
use crate::stats::{self, ms, row};
use crate::world::{SIM_SIGNING_KEY, World};

const PREFIX: &str = "bench-e2e";

pub async fn run(ctx: &Ctx, world: &World, rows: &mut Vec<stats::Row>, rate: u64) -> anyhow::Result<()> {
    crate::reset_topology(ctx, PREFIX).await?;
    world.truncate().await?;
    world.set_latency(ctx, 50).await?;
    let worker = Proc::spawn("calsync-worker", &world.worker_env(ctx, PREFIX, 64)?, &[])?;
    let args = IngestArgs {
        amqp_url: ctx.amqp_url.clone(),
        prefix: PREFIX,
        signing_key: SIM_SIGNING_KEY,
        token_key: world.token_key.clone(),
        extra: Vec::new(),
    };
    let (ingest, url) = start_ingest(ctx, args).await?;
    let total = (rate * ctx.duration.as_secs()) as usize;
    let bodies = world.generate(ctx, total, 1).await?;

    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, body) in bodies.into_iter().enumerate() {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let (http, hook) = (ctx.http.clone(), format!("{url}/webhooks/calendly"));
        tasks.push(tokio::spawn(async move {
            let sent = OffsetDateTime::now_utc();
            let sig = signature::sign(SIM_SIGNING_KEY.as_bytes(), sent.unix_timestamp(), &body);
            let ok = http
                .post(hook)
                .header(signature::HEADER, sig)
                .body(body.clone())
                .send()
                .await
                .is_ok_and(|r| r.status() == 202);
            (message::message_id(&body), sent, ok)
        }));
    }
    let mut sent_at = HashMap::new();
    for t in tasks {
        let (id, sent, ok) = t.await?;
        anyhow::ensure!(ok, "ingest refused a webhook during the end-to-end run");
        sent_at.insert(id, sent);
    }
    world.wait_processed(sent_at.len(), Duration::from_secs(300)).await?;
    let committed: Vec<(String, OffsetDateTime)> =
        sqlx::query_as("SELECT message_id, processed_at FROM webhook_inbox WHERE status = $1")
            .bind(InboxStatus::Processed)
            .fetch_all(&world.pool)
            .await?;
    let mut latencies: Vec<Duration> = committed
        .iter()
        .filter_map(|(id, at)| sent_at.get(id).map(|s| Duration::try_from(*at - *s).unwrap_or(Duration::ZERO)))
        .collect();
    latencies.sort();
    rows.push(row(
        "end to end",
        format!("POST → rows committed, {rate}/s for {}s, API 50 ms: p50 / p99", ctx.duration.as_secs()),
        format!("{} / {}", ms(stats::percentile(&latencies, 0.5)), ms(stats::percentile(&latencies, 0.99))),
        "API latency 50 ms (target p99 ≤ API + 20 ms)",
        format!("p99 = API + {}", ms(stats::percentile(&latencies, 0.99).saturating_sub(Duration::from_millis(50)))),
    ));
    worker.stop().await;
    ingest.stop().await;
    world.set_latency(ctx, 0).await?;
    crate::reset_topology(ctx, PREFIX).await?;
    Ok(())
}
