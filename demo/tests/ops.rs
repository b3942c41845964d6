//! The alert rules and the dashboard in `ops/` name only metrics that really exist: every
//! `calsync_*` name they mention is exported by running ingest and worker processes after a
//! scenario, and every `rabbitmq_*` name by RabbitMQ's own Prometheus plugin, on a private node
//! that carries the stack's real queues.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use calsync_demo::report::{self, Sample};
use calsync_demo::scenario;
use calsync_demo::stack::{LaunchOptions, Stack};
use calsync_testkit::cluster::RabbitCluster;

fn ops_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

/// Every `calsync_…` and `rabbitmq_…` metric name in `text` (expressions, annotations, comments).
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    for prefix in ["calsync_", "rabbitmq_"] {
        for (start, _) in text.match_indices(prefix) {
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .map_or(text.len(), |n| start + n);
            names.insert(text[start..end].to_owned());
        }
    }
    names
}

/// The metric names the rules and the dashboard use, each with the file that names it.
fn named_in_ops() -> Vec<(String, String)> {
    let files = ["prometheus/calsync-alerts.yml", "grafana/calsync-dashboard.json"];
    let mut named = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(ops_dir().join(file)).unwrap_or_else(|e| panic!("reading ops/{file}: {e}"));
        named.extend(metric_names(&text).into_iter().map(|name| (name, file.to_owned())));
    }
    named
}

/// The dashboard's queries, which must all be there to check (a panel without one is a mistake).
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(ops_dir().join("grafana/calsync-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("the dashboard has panels");
    let mut queries = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", panel["title"]));
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        queries.extend(targets.iter().map(|t| t["expr"].as_str().expect("each target has an expr").to_owned()));
    }
    queries
}

/// The queues RabbitMQ reports `rabbitmq_detailed_queue_messages` for.
fn queues_reported(samples: &[Sample]) -> BTreeSet<String> {
    samples
        .iter()
        .filter(|(name, _, _)| name == "rabbitmq_detailed_queue_messages")
        .filter_map(|(_, labels, _)| Some(labels.split("queue=\"").nth(1)?.split('"').next()?.to_owned()))
        .collect()
}

fn names(samples: &[Sample]) -> BTreeSet<&str> {
    samples.iter().map(|(name, _, _)| name.as_str()).collect()
}

#[tokio::test]
async fn every_metric_the_alert_rules_and_the_dashboard_name_is_exported_by_the_running_services() {
    let named = named_in_ops();
    assert!(named.iter().any(|(n, _)| n.starts_with("rabbitmq_")), "the backlog rule reads RabbitMQ's metrics");
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "the dashboard has its panels ({} queries)", queries.len());

    let Some(rabbit) = RabbitCluster::start_with_prometheus() else { return };
    let base = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/calsync".into());
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut database_url = url::Url::parse(&base).unwrap();
    database_url.set_path(&format!("calsync_ops_{}", &run[..12]));
    calsync_demo::stack::build_binaries().await.expect("the stack's binaries build");
    let stack = Stack::launch(LaunchOptions {
        workers: 1,
        database_url: database_url.to_string(),
        amqp_url: rabbit.amqp_url(),
        topology_prefix: "ops".into(),
        log_dir: std::env::temp_dir().join(format!("calsync-ops-{}", &run[..12])),
    })
    .await
    .expect("the stack starts");

    // Traffic, so that what only exists once it happened (Calendly calls by status, changes by
    // kind, batch sizes) is there too.
    let outcome = scenario::run(&stack, &|_| {}).await.unwrap();
    scenario::wait_for_rows(&stack, &outcome, Duration::from_secs(60)).await.unwrap();

    let http = calsync_demo::stack::http_client();
    let rabbit_url = rabbit.prometheus_url(0).expect("started with the Prometheus plugin");
    let detailed = format!("{rabbit_url}/metrics/detailed?family=queue_coarse_metrics");
    // Asked again until everything is there, with a deadline: RabbitMQ collects queue statistics
    // every few seconds (the stack's work queues appear late), and a counter exists only once it
    // was first counted — `calsync_changes_total` when the publisher's sequencer has numbered the
    // scenario's changes, which it does after their rows committed, on its own schedule.
    let started = std::time::Instant::now();
    loop {
        let exported = report::scrape(&stack).await.unwrap();
        let text = http.get(&detailed).send().await.unwrap().text().await.unwrap();
        let rabbit_samples = report::samples(&text);
        let queues = queues_reported(&rabbit_samples);
        let mut exported_names = names(&exported.ingest);
        exported_names.extend(names(&exported.workers));
        exported_names.extend(names(&rabbit_samples));
        let missing: Vec<String> = named
            .iter()
            .filter(|(name, _)| !exported_names.contains(name.as_str()))
            .map(|(name, file)| format!("{name} (ops/{file})"))
            .collect();
        let queues_there = queues.contains("ops.calsync.webhooks") && queues.contains("ops.calsync.sync");
        if missing.is_empty() && queues_there {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "after 60 s, named in ops/ but exported by nothing: {missing:#?}; RabbitMQ reported queues {queues:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The backlog rule counts queues by name (its pattern is unit-tested by promtool against
    // `calsync.webhooks` and `prod.calsync.webhooks`): the stack's real queues carry those names,
    // as the wait above saw.

    let exits = stack.shutdown().await.unwrap();
    for (name, code) in exits {
        assert_eq!(code, Some(0), "{name} stops cleanly on SIGTERM");
    }
    use sqlx::migrate::MigrateDatabase;
    sqlx::Postgres::force_drop_database(database_url.as_str()).await.unwrap();
}
