//! Failover on a real three-node RabbitMQ cluster that this test starts itself (never the machine's
//! own node): under 100 webhooks/s and steady bookings, the node ingest is connected to — made the
//! leader of `calsync.webhooks` too — is killed with SIGKILL (ingest must accept again within 5 s)
//! and restarted, then the simulator books while two of three nodes are down. Every webhook ingest accepted ends
//! as exactly one set of rows, nothing is dead, ingest never answers 202 without a majority, and
//! everything recovers without restarting calsync.

use std::time::{Duration, Instant};

use calsync_common::calendly::signature;
use calsync_common::queue::message;
use calsync_demo::report::{samples, sum};
use calsync_demo::scenario::DemoUser;
use calsync_demo::stack::{LaunchOptions, Stack};
use calsync_testkit::cluster::RabbitCluster;
use serde_json::{Value, json};
use time::OffsetDateTime;

async fn readyz(stack: &Stack) -> Value {
    let url = format!("{}/readyz", stack.endpoints.ingest_url);
    stack.http.get(url).send().await.unwrap().json().await.unwrap()
}

async fn ingest_accepted(stack: &Stack) -> f64 {
    let url = format!("{}/metrics", stack.endpoints.ingest_url);
    let text = stack.http.get(url).send().await.unwrap().text().await.unwrap();
    sum(&samples(&text), "calsync_ingest_requests_total", &["outcome=\"accepted\""])
}

async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Booking `n` (one invitee) for one of the users, at the simulator: its webhook goes to ingest.
async fn book(stack: &Stack, users: &[DemoUser], n: usize) {
    let start = OffsetDateTime::now_utc() + time::Duration::days(1) + time::Duration::minutes(n as i64);
    stack.book(&users[n % users.len()], &format!("Meeting {n}"), start, &["Guest"]).await.unwrap();
}

struct Answer {
    sent_at: Instant,
    accepted: bool,
    message_id: String,
}

/// Posts signed webhooks of an account nobody connected to ingest, one every 10 ms, for `span`.
async fn webhook_load(http: reqwest::Client, url: String, key: String, run: String, span: Duration) -> Vec<Answer> {
    let started = Instant::now();
    let mut answers = Vec::new();
    let mut n = 0;
    while started.elapsed() < span {
        n += 1;
        let body = format!(
            r#"{{"created_at":"2026-12-03T00:00:00.000000Z","created_by":"https://api.calendly.com/users/nobody-{run}","event":"invitee.created","payload":{{"uri":"https://api.calendly.com/scheduled_events/L{n}/invitees/I{n}","event":"https://api.calendly.com/scheduled_events/L{n}"}}}}"#
        );
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let sent_at = Instant::now();
        let answer = http
            .post(&url)
            .header("content-type", "application/json")
            .header(signature::HEADER, signature::sign(key.as_bytes(), now, body.as_bytes()))
            .body(body.clone())
            .send()
            .await;
        let accepted = answer.is_ok_and(|a| a.status() == 202);
        answers.push(Answer { sent_at, accepted, message_id: message::message_id(body.as_bytes()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    answers
}

/// The longest stretch from `killed_at` on in which ingest accepted nothing: from the last 202
/// before a run of refusals to the next 202 (or the end of the load, when none came).
fn longest_without_202(answers: &[Answer], killed_at: Instant) -> Duration {
    let mut last_accepted = killed_at;
    let mut longest = Duration::ZERO;
    for answer in answers.iter().filter(|a| a.sent_at >= killed_at) {
        if answer.accepted {
            longest = longest.max(answer.sent_at - last_accepted);
            last_accepted = answer.sent_at;
        }
    }
    let end = answers.last().map_or(killed_at, |a| a.sent_at);
    longest.max(end - last_accepted)
}

async fn wait_until<F, Fut>(deadline: Duration, what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    calsync_testkit::wait_until(deadline, what, check).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_nodes_of_a_three_node_cluster_loses_no_accepted_webhook_and_duplicates_none() {
    let Some(cluster) = tokio::task::spawn_blocking(|| RabbitCluster::start(3)).await.unwrap() else { return };
    calsync_demo::stack::build_binaries().await.expect("the stack's binaries build");
    let base = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/calsync".into());
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut database_url = url::Url::parse(&base).unwrap();
    database_url.set_path(&format!("calsync_cluster_{}", &run[..12]));
    let log_dir = std::env::temp_dir().join(format!("calsync-cluster-{}", &run[..12]));
    let stack = Stack::launch(LaunchOptions {
        workers: 2,
        database_url: database_url.to_string(),
        amqp_url: cluster.amqp_url(),
        topology_prefix: format!("cluster-{}", &run[..12]),
        log_dir: log_dir.clone(),
    })
    .await
    .expect("the stack starts on the cluster");
    let mut users = Vec::new();
    for name in ["Ada", "Bob"] {
        let email = format!("{}-{}@example.com", name.to_lowercase(), &run[..6]);
        let created = stack.sim_post("/_sim/users", json!({ "name": name, "email": email })).await.unwrap();
        let user = DemoUser {
            name: name.into(),
            email,
            app_user: uuid::Uuid::new_v4(),
            calendly_uri: created["uri"].as_str().unwrap().to_owned(),
        };
        stack.connect(&user).await.unwrap();
        users.push(user);
    }
    let pool = stack.pool().unwrap();
    let mut booked = 0usize;

    // 1. The node ingest is on, made the leader of calsync.webhooks too, is killed (SIGKILL) under
    //    100 webhooks/s and steady bookings, and later restarted.
    for _ in 0..20 {
        booked += 1;
        book(&stack, &users, booked).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let node = readyz(&stack).await["broker_node"].as_str().unwrap().to_owned();
    let victim = cluster.node_of_port(node.rsplit(':').next().unwrap().parse().unwrap()).unwrap();
    let webhooks_queue = format!("cluster-{}.calsync.webhooks", &run[..12]);
    tokio::task::block_in_place(|| cluster.make_leader(&webhooks_queue, victim));
    let refused_before = stack.sim_counters().await.unwrap()["delivery_attempts_failed"].as_u64().unwrap();
    let load = tokio::spawn(webhook_load(
        stack.http.clone(),
        format!("{}/webhooks/calendly", stack.endpoints.ingest_url),
        stack.webhook_signing_key.clone().unwrap(),
        run[..12].to_owned(),
        Duration::from_secs(14),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| cluster.kill(victim));
    for _ in 0..40 {
        booked += 1;
        book(&stack, &users, booked).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let answers = load.await.unwrap();
    wait_until(Duration::from_secs(30), "ingest ready on another node", || async {
        readyz(&stack).await["ready"] == true
    })
    .await;
    let refused = stack.sim_counters().await.unwrap()["delivery_attempts_failed"].as_u64().unwrap() - refused_before;
    let moved_to = readyz(&stack).await["broker_node"].as_str().unwrap().to_owned();
    assert_ne!(moved_to, node, "ingest moved to another node");
    let window = longest_without_202(&answers, killed_at);
    let accepted_ids: Vec<String> = answers.iter().filter(|a| a.accepted).map(|a| a.message_id.clone()).collect();
    eprintln!(
        "node kill: ingest and the queue's leader on {node}; ingest moved to {moved_to}; longest stretch without a 202 \
         {window:?} ({} of {} webhooks accepted); {refused} simulator delivery attempts refused and retried",
        accepted_ids.len(),
        answers.len()
    );
    assert!(
        window < Duration::from_secs(5),
        "ingest answered no 202 for {window:?} after its node, the queue's leader, died (target: under 5 s)"
    );
    // Nothing accepted is lost: every accepted webhook (of an account nobody connected) is recorded.
    wait_until(Duration::from_secs(120), "every accepted webhook of the load is recorded", || async {
        let recorded: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM webhook_inbox WHERE status = 'unmatched' AND message_id = ANY($1)",
        )
        .bind(&accepted_ids)
        .fetch_one(&pool)
        .await
        .unwrap();
        recorded == accepted_ids.len() as i64
    })
    .await;
    tokio::task::block_in_place(|| cluster.restart(victim));
    wait_until(Duration::from_secs(120), "every booking is a meeting", || async {
        count(&pool, "SELECT count(*) FROM meetings").await == booked as i64
    })
    .await;

    // 2. Two of three nodes down: no majority, so nothing may be accepted; then recovery.
    let others: Vec<usize> = (0..3).filter(|n| *n != victim).collect();
    let accepted_before = ingest_accepted(&stack).await;
    tokio::task::block_in_place(|| {
        cluster.kill(others[0]);
        cluster.kill(others[1]);
    });
    let during = booked;
    for _ in 0..5 {
        booked += 1;
        book(&stack, &users, booked).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // the simulator retries its deliveries meanwhile
    assert_eq!(ingest_accepted(&stack).await, accepted_before, "no 202 while the cluster has no majority");
    tokio::task::block_in_place(|| {
        cluster.restart(others[0]);
        cluster.restart(others[1]);
    });
    // Reconciliation may bring their meetings in before Calendly's retries deliver the webhooks
    // themselves: wait for both.
    wait_until(Duration::from_secs(180), "the bookings made without a majority arrive too", || async {
        count(&pool, "SELECT count(*) FROM meetings").await == booked as i64
            && count(&pool, "SELECT count(*) FROM webhook_inbox WHERE status = 'processed'").await == booked as i64
    })
    .await;
    assert!(booked > during);

    // Exactly one set of rows per accepted webhook, nothing dead.
    let accepted = ingest_accepted(&stack).await;
    assert_eq!(count(&pool, "SELECT count(*) FROM meeting_invitees").await, booked as i64);
    assert_eq!(count(&pool, "SELECT count(*) FROM webhook_inbox WHERE status = 'processed'").await, booked as i64);
    assert!(accepted >= booked as f64, "every delivery accepted once Calendly retried ({accepted} for {booked})");
    assert_eq!(stack.dead_letters().await.unwrap(), 0);
    let sim = stack.sim_counters().await.unwrap();
    eprintln!(
        "cluster run: {booked} bookings, {accepted} accepted, {} delivery attempts refused (503 or unreachable)",
        sim["delivery_attempts_failed"]
    );
    let exits = stack.shutdown().await.unwrap();
    assert!(exits.iter().all(|(_, code)| *code == Some(0)), "{exits:?}");
    pool.close().await;
    use sqlx::migrate::MigrateDatabase;
    sqlx::Postgres::force_drop_database(database_url.as_str()).await.unwrap();
    calsync_demo::stack::reset_topology(&cluster.amqp_url(), &format!("cluster-{}", &run[..12])).await.unwrap();
    // The processes' logs are only worth keeping when the test fails.
    let _ = std::fs::remove_dir_all(&log_dir);
}
