//! Backfill jobs from `calsync.sync`, and what the worker shows operators.

mod support;

use calendly_sim::{Booking, NewInvitee};
use calsync_common::queue::message::{SyncJob, SyncKind, sync_job};
use sqlx::PgPool;
use support::*;
use time::OffsetDateTime;

fn book_at(h: &Harness, user: &User, start: OffsetDateTime, invitees: usize) {
    h.sim
        .sim
        .book(Booking {
            user: user.uri.clone(),
            name: None,
            start_time: Some(start),
            duration_minutes: Some(30),
            invitees: (0..invitees)
                .map(|n| NewInvitee { name: format!("G {n}"), email: format!("g{n}@example.com") })
                .collect(),
            location: None,
            co_hosts: Vec::new(),
            webhook_lost: false,
        })
        .unwrap();
}

/// Waits until a pass over `user`'s connection has finished (`last_synced_at` set).
async fn wait_for_a_finished_pass(h: &Harness, user: &User) {
    calsync_testkit::wait_until(DEADLINE, "a sync pass to finish (last_synced_at set)", || async {
        sqlx::query_scalar::<_, Option<OffsetDateTime>>("SELECT last_synced_at FROM calendar_connections WHERE id = $1")
            .bind(user.connection_id)
            .fetch_one(&h.pool)
            .await
            .unwrap()
            .is_some()
    })
    .await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_backfill_writes_every_event_from_the_look_back_window_forward_with_all_invitees(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&["--sync-lookback-days=30"]).await;
    let (ada, bob) = (h.connect("Ada").await, h.connect("Bob").await);
    let now = OffsetDateTime::now_utc();
    book_at(&h, &ada, now - time::Duration::days(40), 1); // before the window
    for n in 0..120 {
        book_at(&h, &ada, now - time::Duration::days(20) + time::Duration::hours(n), 1); // two pages of events
    }
    book_at(&h, &ada, now + time::Duration::days(400), 150); // far future, invitees over two pages
    book_at(&h, &bob, now, 1); // someone else's
    h.captured();

    h.publisher.publish(&sync_job(&SyncJob::new(ada.connection_id, SyncKind::Backfill))).await.unwrap();

    wait_for_a_finished_pass(&h, &ada).await;
    assert_eq!(h.meetings(ada.app_user).await.len(), 121);
    assert_eq!(h.meetings(bob.app_user).await.len(), 0);
    assert_eq!(h.count("SELECT count(*) FROM meeting_invitees").await, 120 + 150);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn readiness_and_metrics_report_the_work_done(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let addr = h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 1);
    let http = calsync_common::http::client_builder().build().unwrap();

    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;

    calsync_testkit::wait_until(DEADLINE, "worker ready", || async {
        http.get(format!("http://{addr}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let metrics = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        r#"calsync_worker_deliveries_total{event="invitee.created",outcome="processed"}"#,
        "calsync_worker_processing_seconds_count",
        "calsync_webhook_end_to_end_seconds_count",
        r#"calsync_calendly_requests_total{endpoint="get_event",status="200"}"#,
    ] {
        assert!(metrics.lines().any(|l| l.starts_with(name)), "{name} missing from /metrics");
    }
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn reconciliation_recovers_a_booking_whose_webhook_never_arrived_and_two_workers_schedule_it_once(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let addr = h.start_worker(&["--reconcile-interval-secs=1"]).await;
    h.start_worker(&["--reconcile-interval-secs=1"]).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 2);
    h.captured(); // the webhooks are lost on the way: never delivered

    calsync_testkit::wait_until(DEADLINE, "the missed booking reconciled", || async {
        h.meetings(ada.app_user).await.len() == 1 && h.count("SELECT count(*) FROM meeting_invitees").await == 2
    })
    .await;

    // One scheduler however many workers: over a 3 s window, about one job per second (two
    // schedulers would queue about six).
    let http = calsync_common::http::client_builder().build().unwrap();
    let scheduled = || async {
        let text = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find(|l| l.starts_with("calsync_scheduler_jobs_total{job=\"reconcile\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = scheduled().await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await; // the measurement window itself
    let during = scheduled().await - before;
    assert!((2.0..=4.0).contains(&during), "{during} jobs scheduled in 3 s at one per second");

    // The scheduler's lock session dies (as with its process): scheduling goes on.
    let holders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND ((classid::bigint << 32) | objid::bigint) = $1) AS killed",
    )
    // The scheduler's key (worker/src/scheduler.rs); the change publisher holds a lock of its own.
    .bind(0x6361_6c73_796e_6301_i64)
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(holders, 1, "exactly one worker held the scheduler lock");
    let after_kill = scheduled().await;
    calsync_testkit::wait_until(DEADLINE, "scheduling to resume after the scheduler's session died", || async {
        scheduled().await >= after_kill + 2.0
    })
    .await;
    h.stop().await;
}

/// Backends of this test's database waiting for a lock another transaction holds.
async fn waiting_for_locks(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Deliveries (webhooks and sync jobs alike) that failed and were put back for another attempt.
async fn retried_deliveries(addr: std::net::SocketAddr) -> f64 {
    metrics(addr)
        .await
        .lines()
        .filter(|l| l.starts_with("calsync_worker_deliveries_total{") && l.contains(r#"outcome="retry""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The interleaving the demo ran into: a sync pass has written a meeting (its transaction holds
/// the meeting's row) while a webhook batch holding the connection row waits for that meeting;
/// when the pass then counts what it corrected on the connection row, neither can go on, and
/// PostgreSQL kills one (40P01) for a retry. The test pins the pass between the two writes by
/// holding an invitee row it must update, so the interleaving happens on every run.
#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_sync_pass_and_a_webhook_batch_writing_the_same_meeting_at_once_both_succeed_at_their_first_attempt(
    pool: PgPool,
) {
    let mut h = Harness::new(pool).await;
    let addr = h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    let booked = h.book(&ada, 2);
    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    // The second invitee cancels; its webhook is held back until the pass is mid-write.
    let second = booked["invitees"][1]["uri"].as_str().unwrap().to_owned();
    h.sim.sim.cancel(uuid_of(&second), Default::default()).unwrap();
    let cancel = h.captured();
    assert_eq!(cancel.len(), 1, "one invitee.canceled webhook");

    let mut invitee_row = h.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM meeting_invitees WHERE calendly_invitee_uri = $1 FOR UPDATE")
        .bind(&second)
        .execute(&mut *invitee_row)
        .await
        .unwrap();
    h.publisher.publish(&sync_job(&SyncJob::new(ada.connection_id, SyncKind::Resync))).await.unwrap();
    calsync_testkit::wait_until(DEADLINE, "the sync pass to wait for the invitee row", || async {
        waiting_for_locks(&h.pool).await == 1
    })
    .await;
    let ids = h.publish_all(&cancel).await;
    calsync_testkit::wait_until(DEADLINE, "the webhook's batch to wait behind the sync pass", || async {
        waiting_for_locks(&h.pool).await == 2
    })
    .await;
    invitee_row.commit().await.unwrap();

    h.wait_for_inbox(&ids, &["processed"]).await;
    wait_for_a_finished_pass(&h, &ada).await;
    assert_eq!(retried_deliveries(addr).await, 0.0, "a deadlock (40P01) sent the webhook or the sync job back");
    assert_eq!(metric(addr, "calsync_worker_batch_fallbacks_total").await, 0.0);
    let statuses: Vec<String> = h.invitees_of(ada.app_user).await.into_iter().map(|(_, status)| status).collect();
    assert_eq!(statuses.iter().filter(|s| *s == "canceled").count(), 1, "{statuses:?}");
    h.stop().await;
}
