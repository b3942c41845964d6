//! The whole path with real binaries as processes: the simulator delivers signed webhooks over HTTP
//! to ingest, two workers turn them into rows. Asserts the rows, the dead letters, and that the
//! metrics endpoints agree with what happened.

use std::time::Duration;

use calsync_demo::report::{self, sum};
use calsync_demo::scenario;
use calsync_demo::stack::{LaunchOptions, Stack};

#[tokio::test]
async fn booked_canceled_and_rescheduled_meetings_reach_the_database_under_the_right_user() {
    let base = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/calsync".into());
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut database_url = url::Url::parse(&base).unwrap();
    database_url.set_path(&format!("calsync_e2e_{}", &run[..12]));
    let stack_amqp = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let prefix = format!("e2e-{}", &run[..12]);
    // The binaries this test runs are built here: a test run of this package alone would otherwise
    // start whatever an earlier build left behind.
    calsync_demo::stack::build_binaries().await.expect("the stack's binaries build");
    let stack = Stack::launch(LaunchOptions {
        workers: 2,
        database_url: database_url.to_string(),
        amqp_url: stack_amqp.clone(),
        topology_prefix: prefix.clone(),
        log_dir: std::env::temp_dir().join(format!("calsync-e2e-{}", &run[..12])),
    })
    .await
    .expect("the stack starts");

    let mut outcome = scenario::run(&stack, &|_| {}).await.unwrap();
    scenario::wait_for_rows(&stack, &outcome, Duration::from_secs(60)).await.unwrap();
    // What no webhook announces: a disabled subscription and a lost delivery, repaired by the
    // workers' own checks.
    scenario::drift(&stack, &mut outcome, &|_| {}).await.unwrap();
    scenario::wait_for_rows(&stack, &outcome, Duration::from_secs(60)).await.unwrap();
    scenario::replaced_subscription(&stack, &outcome).await.unwrap();

    assert_eq!(stack.dead_letters().await.unwrap(), 0);
    let pool = stack.pool().unwrap();
    let sim = stack.sim_counters().await.unwrap();
    let delivered = sim["deliveries_succeeded"].as_f64().unwrap();
    // 7 invitees booked + 1 cancel + 2 for the reschedule + 1 no-show.
    assert_eq!(delivered, 11.0);
    // The meetings can be complete before the last delivery's inbox row is: a delivery whose rows
    // another one (or the repair's resync) already wrote may still be in flight, or waiting out a
    // retry. Each must end processed, once.
    let processed = || async {
        let processed: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_inbox WHERE status = 'processed'")
            .fetch_one(&pool)
            .await
            .unwrap();
        processed
    };
    calsync_testkit::wait_until(Duration::from_secs(60), "every delivered webhook processed", || async {
        processed().await >= 11
    })
    .await;
    let inbox_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_inbox").fetch_one(&pool).await.unwrap();
    assert_eq!(processed().await, 11);
    assert_eq!(inbox_rows, 11);
    // Give the last deliveries' metrics a moment to be recorded after their commit.
    let mut metrics = report::scrape(&stack).await.unwrap();
    for _ in 0..50 {
        if report::webhooks_processed(&metrics.workers) >= delivered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        metrics = report::scrape(&stack).await.unwrap();
    }
    assert_eq!(
        sum(&metrics.ingest, "calsync_ingest_requests_total", &["outcome=\"accepted\""]),
        delivered,
        "ingest accepted every delivery"
    );
    assert_eq!(sum(&metrics.ingest, "calsync_ingest_requests_total", &["outcome=\"unauthorized\""]), 0.0);
    assert_eq!(report::webhooks_processed(&metrics.workers), delivered, "the workers processed each once");
    assert_eq!(sum(&metrics.workers, "calsync_webhook_end_to_end_seconds_count", &[]), delivered);
    assert!(sum(&metrics.workers, "calsync_worker_deliveries_total", &["outcome=\"processed\""]) > 0.0);

    let exits = stack.shutdown().await.unwrap();
    for (name, code) in exits {
        assert_eq!(code, Some(0), "{name} stops cleanly on SIGTERM");
    }
    use sqlx::migrate::MigrateDatabase;
    pool.close().await;
    sqlx::Postgres::force_drop_database(database_url.as_str()).await.unwrap();
    calsync_demo::stack::reset_topology(&stack_amqp, &prefix).await.unwrap();
}
