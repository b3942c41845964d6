//! Infrastructure outages on the worker's side: nothing is dead-lettered because PostgreSQL was
//! away, however long, and work resumes by itself when it is back.

mod support;

use std::time::Duration;

use calsync_testkit::TcpProxy;
use sqlx::PgPool;
use support::*;

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_database_outage_longer_than_the_whole_retry_ladder_dead_letters_nothing(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let proxy = TcpProxy::start(calsync_testkit::postgres_addr(&h.db_url)).await;
    let through = format!("--database-url={}", proxy.url_through(&h.db_url));
    // Two attempts: without the pause, the second failure would dead-letter every delivery.
    let addr = h.start_worker(&[&through, "--worker-max-attempts=2"]).await;
    let ada = h.connect("Ada").await;
    for _ in 0..5 {
        h.book(&ada, 1);
    }
    let bodies = h.captured();
    let http = calsync_common::http::client_builder().build().unwrap();
    calsync_testkit::wait_until(DEADLINE, "the worker ready and consuming", || async {
        http.get(format!("http://{addr}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;

    proxy.cut();
    let ids = h.publish_all(&bodies).await;
    calsync_testkit::wait_until(DEADLINE, "readyz to say the database is down", || async {
        let ready: serde_json::Value =
            http.get(format!("http://{addr}/readyz")).send().await.unwrap().json().await.unwrap();
        ready["database"] == "down"
    })
    .await;
    // The outage itself, longer than the whole retry ladder: two attempts, each failing only after
    // the pool's 3 s connect timeout, with a 1 s delay between them.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(h.topology.depth(&h.topology.topology.dead_queue()).await, 0, "nothing dead during the outage");
    let waiting = h.topology.depth(&h.topology.topology.webhooks_queue()).await;
    assert_eq!(waiting, 5, "every delivery waits in the queue, the consumer paused");

    proxy.restore();
    h.wait_for_inbox(&ids, &["processed"]).await;

    assert_eq!(h.meetings(ada.app_user).await.len(), 5);
    assert!(h.dead_letters().await.is_empty());
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM webhook_inbox").fetch_all(&h.pool).await.unwrap();
    assert!(attempts.iter().all(|a| *a == 1), "the outage counted no attempt: {attempts:?}");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_statement_or_lock_timeout_fails_the_delivery_instead_of_passing_for_a_database_outage(pool: PgPool) {
    use calsync_worker::error::ProcessError;
    // 57014: a statement canceled by its timeout.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL statement_timeout = '50ms'").execute(&mut *tx).await.unwrap();
    let canceled = sqlx::query("SELECT pg_sleep(30)").execute(&mut *tx).await.unwrap_err();
    drop(tx);
    // 55P03: a row lock not granted within lock_timeout.
    sqlx::query("CREATE TABLE held (id int PRIMARY KEY)").execute(&pool).await.unwrap();
    sqlx::query("INSERT INTO held VALUES (1)").execute(&pool).await.unwrap();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM held FOR UPDATE").execute(&mut *holder).await.unwrap();
    let mut waiter = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '50ms'").execute(&mut *waiter).await.unwrap();
    let not_granted = sqlx::query("SELECT id FROM held FOR SHARE").execute(&mut *waiter).await.unwrap_err();

    for (error, code) in [(canceled, "57014"), (not_granted, "55P03")] {
        let sqlstate = error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(sqlstate.as_deref(), Some(code));
        let disposition = ProcessError::from(error);
        assert!(
            matches!(disposition, ProcessError::Transient { .. }),
            "{code} must count as a failed attempt of this delivery (never requeued forever): {disposition:?}"
        );
    }
}
