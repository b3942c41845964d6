//! Retention against real PostgreSQL: each kind of row kept just inside its limit and deleted just
//! outside it, a duplicate of a recent delivery still recognised after a pass, a large inbox pruned
//! in batches while deliveries keep committing, and a limit too short for Calendly refused.

mod support;

use std::time::Duration;

use clap::Parser;
use sqlx::PgPool;
use support::*;
use time::OffsetDateTime;
use uuid::Uuid;

use calsync_worker::retention::{self, Policy};

/// The defaults: processed / ignored 30 days, unmatched 7 (`INBOX_REPLAY_DAYS`), parked 30, dead
/// 30, changes 7.
fn policy() -> Policy {
    Policy::from_days(30, 7, 30, 30, 7)
}

async fn inbox_row(pool: &PgPool, id: &str, status: &str, age: time::Duration) {
    sqlx::query(
        "INSERT INTO webhook_inbox (message_id, event, created_by, received_at, status, attempts, body) \
         VALUES ($1, 'invitee.created', 'https://api.calendly.com/users/U', $2, $3, 1, '\\x7b7d')",
    )
    .bind(id)
    .bind(OffsetDateTime::now_utc() - age)
    .bind(status)
    .execute(pool)
    .await
    .unwrap();
}

async fn change_row(pool: &PgPool, age: time::Duration) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO change_log (user_id, kind, status, cause, occurred_at) \
         VALUES (gen_random_uuid(), 'meeting.created', 'active', 'webhook', $1) RETURNING change_id",
    )
    .bind(OffsetDateTime::now_utc() - age)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn inbox_ids(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT message_id FROM webhook_inbox ORDER BY message_id").fetch_all(pool).await.unwrap()
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn each_kind_of_row_is_kept_just_inside_its_limit_and_deleted_just_outside_it(pool: PgPool) {
    let hour = time::Duration::hours(1);
    let days = |n: i64| time::Duration::days(n);
    for (status, limit) in [("processed", 30), ("ignored", 30), ("unmatched", 7), ("awaiting_reauth", 30), ("dead", 30)]
    {
        inbox_row(&pool, &format!("{status}-inside"), status, days(limit) - hour).await;
        inbox_row(&pool, &format!("{status}-outside"), status, days(limit) + hour).await;
    }
    let kept_change = change_row(&pool, days(7) - hour).await;
    change_row(&pool, days(7) + hour).await;
    calsync_common::db::changes::sequence_all(&pool).await.unwrap();

    let deleted = retention::run_once(&pool, &policy()).await.unwrap();

    assert_eq!(
        inbox_ids(&pool).await,
        ["awaiting_reauth-inside", "dead-inside", "ignored-inside", "processed-inside", "unmatched-inside"]
    );
    let changes: Vec<Uuid> = sqlx::query_scalar("SELECT change_id FROM change_log").fetch_all(&pool).await.unwrap();
    assert_eq!(changes, [kept_change]);
    assert_eq!((deleted.webhook_inbox, deleted.change_log), (5, 1));
    // A second pass finds nothing more.
    assert_eq!(retention::run_once(&pool, &policy()).await.unwrap(), retention::Deleted::default());
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_redelivery_of_a_recent_delivery_is_still_a_duplicate_after_a_retention_pass(pool: PgPool) {
    let (h, ada) = Harness::with_worker_and_user(pool, "Ada").await;
    h.book(&ada, 1);
    h.book(&ada, 1);
    let bodies = h.captured();
    let ids = h.publish_all(&bodies).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    // One delivery is a day old (Calendly may still retry it), the other three days.
    for (id, age) in [(&ids[0], 1), (&ids[1], 3)] {
        sqlx::query("UPDATE webhook_inbox SET received_at = now() - make_interval(days => $2) WHERE message_id = $1")
            .bind(id)
            .bind(age)
            .execute(&h.pool)
            .await
            .unwrap();
    }
    let changes_before = h.count("SELECT count(*) FROM change_log").await;

    let deleted = retention::run_once(&h.pool, &Policy::from_days(2, 7, 30, 30, 7)).await.unwrap();
    h.publish(&bodies[0]).await;
    calsync_testkit::wait_until(DEADLINE, "the redelivery is settled", || async {
        h.topology.depth(&h.topology.topology.webhooks_queue()).await == 0
    })
    .await;

    assert_eq!(deleted.webhook_inbox, 1, "only the three-day-old delivery is gone");
    assert_eq!(inbox_ids(&h.pool).await, [ids[0].clone()]);
    assert_eq!(h.meetings(ada.app_user).await.len(), 2);
    assert_eq!(h.count("SELECT count(*) FROM change_log").await, changes_before, "the duplicate told the app nothing");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn pruning_a_large_inbox_in_batches_never_makes_a_delivery_wait_a_second_for_a_lock(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    const OLD: i64 = 60_000;
    sqlx::query(
        "INSERT INTO webhook_inbox (message_id, event, created_by, received_at, status, attempts) \
         SELECT 'old-' || n, 'invitee.created', 'https://api.calendly.com/users/U', now() - interval '40 days', \
             'processed', 1 FROM generate_series(1, $1) n",
    )
    .bind(OLD)
    .execute(&h.pool)
    .await
    .unwrap();
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    for _ in 0..40 {
        h.book(&ada, 1);
    }
    let bodies = h.captured();

    // Redeliveries of old deliveries touch the rows being pruned, each holding its row a moment,
    // and give up (an error) if they wait a second for a lock.
    let stop = tokio_util::sync::CancellationToken::new();
    let redeliveries = {
        let (pool, stop) = (h.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                let mut tx = pool.begin_with("BEGIN; SET LOCAL lock_timeout = '1s'").await.unwrap();
                sqlx::query("UPDATE webhook_inbox SET attempts = attempts + 1 WHERE message_id = $1")
                    .bind(format!("old-{}", 1 + (n * 997) % OLD))
                    .execute(&mut *tx)
                    .await
                    .expect("a delivery never waits a second for a lock");
                tokio::time::sleep(Duration::from_millis(20)).await;
                tx.commit().await.unwrap();
            }
            n
        })
    };
    // One redelivery is stuck for three seconds on a row in the middle of what is pruned.
    let mut stuck = h.pool.begin().await.unwrap();
    sqlx::query("UPDATE webhook_inbox SET attempts = attempts + 1 WHERE message_id = $1")
        .bind(format!("old-{}", OLD / 2))
        .execute(&mut *stuck)
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        stuck.commit().await.unwrap();
    });
    let pruning = {
        let pool = h.pool.clone();
        tokio::spawn(async move { retention::run_once(&pool, &policy()).await.unwrap() })
    };
    let ids = h.publish_all(&bodies).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    let deleted = pruning.await.unwrap();
    release.await.unwrap();
    stop.cancel();
    let touched = redeliveries.await.unwrap();
    // Rows a redelivery held at that moment (the stuck one at least) were skipped, not waited for:
    // the next pass takes them.
    let second = retention::run_once(&h.pool, &policy()).await.unwrap();

    assert!(touched > 0);
    assert!(second.webhook_inbox >= 1, "the stuck row was skipped, not waited for");
    assert_eq!(deleted.webhook_inbox + second.webhook_inbox, OLD as u64);
    assert_eq!(h.count("SELECT count(*) FROM webhook_inbox WHERE message_id LIKE 'old-%'").await, 0);
    assert_eq!(h.meetings(ada.app_user).await.len(), 40, "every delivery committed meanwhile");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn the_scheduling_worker_prunes_on_its_interval_and_counts_what_it_deleted(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    inbox_row(&h.pool, "old", "processed", time::Duration::days(31)).await;
    inbox_row(&h.pool, "recent", "processed", time::Duration::days(29)).await;

    let addr = h.start_worker(&["--retention-interval-secs=1"]).await;

    calsync_testkit::wait_until(DEADLINE, "the old delivery pruned", || async {
        inbox_ids(&h.pool).await == ["recent"]
    })
    .await;
    let http = calsync_common::http::client_builder().build().unwrap();
    let metrics = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(r#"calsync_retention_deleted_total{table="webhook_inbox"}"#) && !l.ends_with(" 0")),
        "{}",
        metrics.lines().filter(|l| l.contains("retention")).collect::<Vec<_>>().join("\n")
    );
    h.stop().await;
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    settings: calsync_worker::settings::WorkerSettings,
}

#[test]
fn an_inbox_retention_shorter_than_calendlys_retry_horizon_is_refused_with_the_reason() {
    let settings = |days: &str| {
        Cli::try_parse_from(["calsync-worker", "--token-encryption-key=x", &format!("--inbox-retention-days={days}")])
            .unwrap()
            .settings
    };
    let refused = settings("1").validate().unwrap_err().to_string();
    assert!(refused.contains("INBOX_RETENTION_DAYS") && refused.contains("at least 2"), "{refused}");
    assert!(settings("2").validate().is_ok());
}

/// Runs `rabbitmqctl` (the machine's, as root) with `args`.
fn rabbitmqctl(args: &[String]) {
    let status = std::process::Command::new("rabbitmqctl").arg("-q").args(args).status().expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn the_printed_policy_expires_dead_letters_in_an_existing_calsync_dead_and_the_queue_is_declared_as_before(
    pool: PgPool,
) {
    use calsync_common::queue::{Outgoing, RetryTarget, Topology};
    use calsync_worker::admin::dead_letter_policy::{rabbitmqctl_args, vhost_of};

    // An existing deployment: calsync.dead declared (by the harness) without any TTL.
    let mut h = Harness::new(pool).await;
    let dead = h.topology.topology.dead_queue();
    // The command's policy, with a one-second TTL in place of DEAD_RETENTION_DAYS.
    let vhost = vhost_of(&calsync_testkit::amqp_url()).unwrap();
    let args = rabbitmqctl_args(&h.topology.topology, &vhost, Duration::from_secs(1)).unwrap();
    rabbitmqctl(&args);
    // A worker starting declares the topology again: not refused.
    h.start_worker(&[]).await;

    let letter = Outgoing {
        routing_key: Topology::dead_routing_key(RetryTarget::Webhooks),
        body: b"{}".to_vec(),
        properties: lapin::BasicProperties::default().with_delivery_mode(2),
    };
    h.publisher.publish(&letter).await.unwrap();
    let expired = calsync_testkit::wait_until(DEADLINE, "the dead letter expired", || async {
        h.topology.depth(&dead).await == 0
    });
    expired.await;

    rabbitmqctl(&["clear_policy".into(), "-p".into(), vhost, args[3].clone()]);
    h.stop().await;
}
