//! A user's Calendly grant is never lost through a fault of ours: a refresh whose database write
//! fails keeps its new pair, and a token this worker cannot decrypt is a configuration error that
//! retries and says so, never a reason to make the user reconnect.

mod support;

use std::time::Duration;

use calendly_sim::Faults;
use sqlx::PgPool;
use support::*;
use time::OffsetDateTime;

async fn connection_status(h: &Harness, user: &User) -> String {
    sqlx::query_scalar("SELECT status FROM calendar_connections WHERE id = $1")
        .bind(user.connection_id)
        .fetch_one(&h.pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_refresh_whose_database_write_fails_keeps_the_new_tokens_and_the_user_connected(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    h.store_tokens(ada.app_user, &ada.calendly, OffsetDateTime::now_utc() - time::Duration::minutes(1)).await;
    h.book(&ada, 1);
    let first = h.captured();
    // A slow token endpoint: the refresh's transaction sits idle, holding the row lock, long enough
    // for the test to kill its database session.
    h.sim.sim.set_faults(Faults { latency_ms: 1500, ..Faults::default() });
    h.start_worker(&[]).await;
    let ids = h.publish_all(&first).await;
    let database: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&h.pool).await.unwrap();
    calsync_testkit::wait_until(DEADLINE, "the refreshing session, killed", || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT coalesce(bool_or(pg_terminate_backend(pid)), false) FROM pg_stat_activity \
             WHERE datname = $1 AND state = 'idle in transaction' AND query ILIKE '%FOR UPDATE%'",
        )
        .bind(&database)
        .fetch_one(&h.pool)
        .await
        .unwrap()
    })
    .await;
    h.sim.sim.set_faults(Faults::default());

    h.wait_for_inbox(&ids, &["processed"]).await;
    assert_eq!(connection_status(&h, &ada).await, "active");
    // The stored refresh token is the new one: the next expiry refreshes without invalid_grant.
    sqlx::query("UPDATE calendar_connections SET token_expires_at = now() - interval '1 minute' WHERE id = $1")
        .bind(ada.connection_id)
        .execute(&h.pool)
        .await
        .unwrap();
    h.book(&ada, 1);
    let second = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&second, &["processed"]).await;

    assert_eq!(h.sim.sim.token_grants("refresh_token"), 2);
    assert_eq!(h.sim.sim.refresh_token_reuse_attempts(), 0, "the consumed refresh token was never presented again");
    assert_eq!(connection_status(&h, &ada).await, "active");
    assert_eq!(h.meetings(ada.app_user).await.len(), 2);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_token_the_worker_cannot_decrypt_retries_says_so_in_readyz_and_is_processed_once_the_key_is_back(
    pool: PgPool,
) {
    let mut h = Harness::new(pool).await;
    let ada = h.connect("Ada").await; // tokens encrypted with h.key
    h.book(&ada, 1);
    let bodies = h.captured();
    // A rotation rolled out half-way: this worker knows only the new key.
    let new_key = calsync_common::crypto::generate_key();
    let without_old = format!("--token-encryption-key={new_key}");
    let addr = h.start_worker(&[&without_old, "--worker-max-attempts=50"]).await;
    let ids = h.publish_all(&bodies).await;
    let http = calsync_common::http::client_builder().build().unwrap();
    let readyz = format!("http://{addr}/readyz");
    calsync_testkit::wait_until(DEADLINE, "readyz to report the key problem", || async {
        let ready: serde_json::Value = http.get(&readyz).send().await.unwrap().json().await.unwrap();
        ready["token_keys"] != "ok"
    })
    .await;
    let response = http.get(&readyz).send().await.unwrap();
    assert_eq!(response.status(), 503, "not ready while stored tokens do not decrypt");
    let ready: serde_json::Value = response.json().await.unwrap();
    assert!(ready["token_keys"].as_str().unwrap().contains("neither the current nor a previous key"), "{ready}");
    let metrics = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("calsync_token_decrypt_failures_total"), "the failures are counted");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.inbox_status(&ids[0]).await, None, "not parked, not dead: waiting in a delay queue");
    assert_eq!(connection_status(&h, &ada).await, "active", "the user is not asked to reconnect");

    // The operator adds the old key back; the retried delivery goes through.
    let previous = format!("--token-encryption-previous-keys={}", h.key);
    h.start_worker(&[&without_old, &previous]).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    assert_eq!(h.meetings(ada.app_user).await.len(), 1);
    h.stop().await;
}
