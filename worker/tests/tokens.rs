//! A user's Calendly grant is never lost through a fault of ours: a refresh whose database write
//! fails keeps its new pair, and a token this worker cannot decrypt is a configuration error that
//! retries and says so, never a reason to make the user reconnect.

mod support;

use std::time::Duration;

use calendly_sim::{Faults, TokenFaults};
use calsync_testkit::TcpProxy;
use sqlx::PgPool;
use support::*;
use time::OffsetDateTime;

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_refresh_whose_database_write_fails_keeps_the_new_tokens_and_the_user_connected(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let proxy = TcpProxy::start(calsync_testkit::postgres_addr(&h.db_url)).await;
    let through = format!("--database-url={}", proxy.url_through(&h.db_url));
    let ada = h.connect("Ada").await;
    h.store_tokens(ada.app_user, &ada.calendly, OffsetDateTime::now_utc() - time::Duration::minutes(1)).await;
    h.book(&ada, 1);
    let first = h.captured();
    // A slow token endpoint: the database goes away while Calendly is issuing the new pair, so the
    // write of that pair fails (Calendly has already consumed the old refresh token).
    h.sim
        .sim
        .set_faults(Faults { token: TokenFaults { latency_ms: 1500, ..TokenFaults::default() }, ..Faults::default() });
    h.start_worker(&[&through]).await;
    let ids = h.publish_all(&first).await;
    calsync_testkit::wait_until(DEADLINE, "the refresh to reach Calendly", || async {
        h.sim.sim.counters_json()["calls"]["token"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    proxy.cut();
    calsync_testkit::wait_until(DEADLINE, "Calendly to issue the new pair", || async {
        h.sim.sim.token_grants("refresh_token") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // the database stays away a little longer
    proxy.restore();
    h.sim.sim.set_faults(Faults::default());

    h.wait_for_inbox(&ids, &["processed"]).await;
    assert_eq!(h.connection_status(&ada).await, "active");
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
    assert_eq!(h.connection_status(&ada).await, "active");
    assert_eq!(h.meetings(ada.app_user).await.len(), 2);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_slow_refresh_for_one_user_never_costs_another_user_a_pool_connection(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    // 16 deliveries at once on a pool of 4 connections.
    h.start_worker(&["--worker-concurrency=16"]).await;
    let (ada, bob) = (h.connect("Ada").await, h.connect("Bob").await);
    h.store_tokens(ada.app_user, &ada.calendly, OffsetDateTime::now_utc() - time::Duration::minutes(1)).await;
    for _ in 0..8 {
        h.book(&ada, 1);
    }
    let ada_bodies = h.captured();
    for _ in 0..8 {
        h.book(&bob, 1);
    }
    let bob_bodies = h.captured();
    // Ada's refresh takes 5 s at Calendly; every one of her deliveries waits for it.
    h.sim
        .sim
        .set_faults(Faults { token: TokenFaults { latency_ms: 5000, ..TokenFaults::default() }, ..Faults::default() });

    let ada_ids = h.publish_all(&ada_bodies).await;
    calsync_testkit::wait_until(DEADLINE, "Ada's refresh to be under way", || async {
        h.sim.sim.counters_json()["calls"]["token"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    let bob_ids = h.publish_all(&bob_bodies).await;
    h.wait_for_inbox(&bob_ids, &["processed"]).await;

    let ada_done: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_inbox WHERE message_id = ANY($1)")
        .bind(&ada_ids)
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(ada_done, 0, "Bob's deliveries finished while Ada's refresh was still at Calendly");
    let bob_attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM webhook_inbox WHERE message_id = ANY($1)")
        .bind(&bob_ids)
        .fetch_all(&h.pool)
        .await
        .unwrap();
    assert!(bob_attempts.iter().all(|a| *a == 1), "no pool timeout, no retry: {bob_attempts:?}");
    h.wait_for_inbox(&ada_ids, &["processed"]).await;
    assert_eq!(h.sim.sim.token_grants("refresh_token"), 1, "still one refresh for one expiry");
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
    assert_eq!(h.connection_status(&ada).await, "active", "the user is not asked to reconnect");

    // The operator adds the old key back; the retried delivery goes through.
    let previous = format!("--token-encryption-previous-keys={}", h.key);
    h.start_worker(&[&without_old, &previous]).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    assert_eq!(h.meetings(ada.app_user).await.len(), 1);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_delivery_resolved_before_its_connection_changed_hands_never_refreshes_the_new_accounts_token(pool: PgPool) {
    let h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    let expired = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    h.store_tokens(ada.app_user, &ada.calendly, expired).await;
    // A delivery resolved the connection while it was Ada's Calendly account…
    let resolved = calsync_common::db::connections::find(&h.pool, ada.connection_id).await.unwrap().unwrap();
    // …then the same app user reconnected another Calendly account (the row is reused).
    let other = h.sim.sim.create_user(calendly_sim::NewUser::named("Other")).unwrap();
    h.store_tokens(ada.app_user, &other, expired).await;
    let before = h.sim.sim.token_grants("refresh_token");

    let result = h.deps().calls.tokens().access_token(&resolved).await;

    let error = result.err().expect("no token for a connection that changed hands");
    assert!(error.to_string().contains("changed hands"), "{error}");
    assert_eq!(h.sim.sim.token_grants("refresh_token"), before, "the new account's refresh token was not used");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_token_copied_from_another_row_parks_only_that_connection_and_the_worker_stays_ready(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let addr = h.start_worker(&[]).await;
    let (ada, bob) = (h.connect("Ada").await, h.connect("Bob").await);
    // Ada's access token replaced by Bob's ciphertext, which is bound to Bob's row only.
    sqlx::query(
        "UPDATE calendar_connections a SET access_token = b.access_token FROM calendar_connections b \
         WHERE a.id = $1 AND b.id = $2",
    )
    .bind(ada.connection_id)
    .bind(bob.connection_id)
    .execute(&h.pool)
    .await
    .unwrap();
    h.book(&ada, 1);
    h.book(&bob, 1);

    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed", "awaiting_reauth"]).await;

    assert_eq!(h.inbox_status(&ids[0]).await.as_deref(), Some("awaiting_reauth"), "Ada's delivery is parked");
    assert_eq!(h.inbox_status(&ids[1]).await.as_deref(), Some("processed"), "Bob's goes through");
    assert_eq!(h.connection_status(&ada).await, "needs_reauth");
    assert_eq!(h.connection_status(&bob).await, "active");
    let error: String = sqlx::query_scalar("SELECT last_error FROM calendar_connections WHERE id = $1")
        .bind(ada.connection_id)
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert!(error.starts_with("integrity:"), "{error}");
    assert_eq!((h.meetings(ada.app_user).await.len(), h.meetings(bob.app_user).await.len()), (0, 1));
    assert_eq!(h.changes(&ada).await, ["connection.active/-/connect", "connection.needs_reauth/integrity/refresh"]);
    let http = calsync_common::http::client_builder().build().unwrap();
    let ready = http.get(format!("http://{addr}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "one row's bad token is not the worker's problem");
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["token_keys"], "ok");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_reauth_verdict_about_a_token_the_row_no_longer_holds_leaves_the_row_active(pool: PgPool) {
    let h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    let seen = calsync_common::db::connections::find(&h.pool, ada.connection_id).await.unwrap().unwrap();
    // The row got a new pair meanwhile (a refresh, or the user reconnecting).
    h.store_tokens(ada.app_user, &ada.calendly, OffsetDateTime::now_utc() + time::Duration::hours(2)).await;

    let moved = calsync_common::db::connections::mark_needs_reauth(
        &h.pool,
        &seen,
        seen.access_token.as_deref(),
        calsync_common::db::changes::ReauthReason::InvalidGrant,
        "refresh token rejected",
    )
    .await
    .unwrap();

    assert!(!moved);
    assert_eq!(h.connection_status(&ada).await, "active", "the new pair is not condemned by the old one's verdict");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_row_a_late_stored_refresh_brings_back_to_active_gets_its_parked_deliveries_replayed(pool: PgPool) {
    use calsync_common::db::connections::{self, ACCESS_TOKEN, REFRESH_TOKEN, binding};
    let mut h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    let seen = connections::find(&h.pool, ada.connection_id).await.unwrap().unwrap();
    // Someone presented the refresh token a concurrent refresh had just consumed: needs_reauth...
    assert!(
        connections::mark_needs_reauth(
            &h.pool,
            &seen,
            seen.access_token.as_deref(),
            calsync_common::db::changes::ReauthReason::InvalidGrant,
            "invalid_grant"
        )
        .await
        .unwrap()
    );
    h.start_worker(&["--subscription-check-interval-secs=1", "--reconcile-interval-secs=0"]).await;
    h.book(&ada, 1);
    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["awaiting_reauth"]).await;
    // ...then that refresh's own pair is stored after all, which revives the row.
    let pair = h.sim.sim.grant_tokens(&ada.uri).unwrap();
    let access = h.cipher.encrypt(pair["access_token"].as_str().unwrap(), binding(ada.connection_id, ACCESS_TOKEN));
    let refresh = h.cipher.encrypt(pair["refresh_token"].as_str().unwrap(), binding(ada.connection_id, REFRESH_TOKEN));
    let expires = OffsetDateTime::now_utc() + time::Duration::hours(2);
    let revived = connections::store_refreshed(
        &h.pool,
        ada.connection_id,
        seen.refresh_token.as_deref(),
        &access,
        &refresh,
        expires,
    )
    .await
    .unwrap();
    assert!(revived);
    assert_eq!(h.connection_status(&ada).await, "active");

    // No reconnect: the next periodic check of the connection replays what was parked.
    h.wait_for_inbox(&ids, &["processed"]).await;
    assert_eq!(h.meetings(ada.app_user).await.len(), 1);
    h.stop().await;
}
