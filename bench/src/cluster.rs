//! Ingest on a three-node RabbitMQ cluster started for the run (its own node names, ports and data;
//! never the machine's node): throughput against raw confirmed publishes to the same cluster, and
//! what a node kill under steady load costs (sent, 202, 503, lost, duplicated, longest 503 window).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use calsync_testkit::cluster::RabbitCluster;

use crate::Ctx;
use crate::load::{self, SIGNING_KEY};
use crate::procs::{IngestArgs, start_ingest};
use crate::stats::{ratio, row};

pub async fn run(ctx: &Ctx, rows: &mut Vec<crate::stats::Row>) -> anyhow::Result<()> {
    let Some(cluster) = tokio::task::spawn_blocking(|| RabbitCluster::start(3)).await? else {
        rows.push(row("cluster", "skipped: rabbitmq-server is not installed", "-", "-", "-"));
        return Ok(());
    };
    let prefix = "bench-cluster";
    let args = IngestArgs {
        amqp_url: cluster.amqp_url(),
        prefix,
        signing_key: SIGNING_KEY,
        token_key: calsync_common::crypto::generate_key(),
        extra: Vec::new(),
    };
    let (ingest, base) = start_ingest(ctx, args).await?;
    let hook = format!("{base}/webhooks/calendly");
    let seq = Arc::new(AtomicU64::new(0));
    let on_cluster = Ctx {
        http: ctx.http.clone(),
        amqp_url: cluster.amqp_url(),
        db_url: ctx.db_url.clone(),
        duration: ctx.duration,
        webhooks: ctx.webhooks,
        concurrencies: ctx.concurrencies.clone(),
    };
    let broker = crate::broker(&on_cluster, prefix, 4).await?;
    let queue = broker.topology().webhooks_queue();

    // Throughput: 64 connections, against confirmed publishes to the same quorum queue.
    let (publishes, _) = crate::ingest::publish_ceiling(&broker, 64, ctx.duration).await;
    let (rps, tally) = load::closed_loop(&hook, 64, ctx.duration, &seq).await;
    let accepted = tally.accepted();
    let inspect = |n: usize| Ctx { amqp_url: cluster.node_url(n), ..clone_ctx(&on_cluster) };
    let held = crate::depth(&inspect(0), &queue).await?;
    anyhow::ensure!(held >= accepted, "the cluster holds {held} but ingest answered 202 {accepted} times");
    crate::purge(&inspect(0), &queue).await?;
    rows.push(row(
        "cluster",
        "ingest on 3 nodes, closed loop 64 connections: 202/s",
        format!("{rps:.0}/s"),
        format!("confirmed publishes to the cluster {publishes:.0}/s"),
        ratio(rps, publishes),
    ));

    // A node kill under an open loop of 500/s: the node ingest is on dies a third of the way in.
    let node: serde_json::Value = ctx.http.get(format!("{base}/readyz")).send().await?.json().await?;
    let node = node["broker_node"].as_str().unwrap_or_default().to_owned();
    let victim = node.rsplit(':').next().and_then(|p| p.parse().ok()).and_then(|p| cluster.node_of_port(p));
    let victim = victim.ok_or_else(|| anyhow::anyhow!("ingest reports no broker node"))?;
    let rate = 500;
    let offered = load::open_loop(&ctx.http, &hook, rate, ctx.duration * 3, &seq);
    let killer = async {
        tokio::time::sleep(ctx.duration).await;
        tokio::task::block_in_place(|| cluster.kill(victim));
        // The longest stretch without a node, as ingest's readiness sees it.
        let readyz = format!("{base}/readyz");
        calsync_testkit::longest_unready(ctx.duration, || async {
            ctx.http.get(&readyz).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await
    };
    let ((latencies, tally), longest) = tokio::join!(offered, killer);
    let refused = tally.failed();
    let live = (0..3).find(|n| *n != victim).unwrap_or(0);
    let held = crate::depth(&inspect(live), &queue).await? as usize;
    let accepted = latencies.len();
    rows.push(row(
        "cluster",
        format!("node kill under {rate}/s: sent / 202 / 503 / lost / duplicated; longest 503 window"),
        format!(
            "{} / {accepted} / {refused} / {} / {}; {longest:.0?}",
            accepted as u64 + refused,
            accepted.saturating_sub(held),
            held.saturating_sub(accepted)
        ),
        "target lost 0",
        if held >= accepted { "✓" } else { "✗" },
    ));
    broker.close().await;
    ingest.stop().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}

fn clone_ctx(ctx: &Ctx) -> Ctx {
    Ctx {
        http: ctx.http.clone(),
        amqp_url: ctx.amqp_url.clone(),
        db_url: ctx.db_url.clone(),
        duration: ctx.duration,
        webhooks: ctx.webhooks,
        concurrencies: ctx.concurrencies.clone(),
    }
}
