//! Failure paths: token races, revoked grants, Calendly faults, poison messages, forged URIs.
//! Each test tries to lose a delivery or write into the wrong account, and checks it could not.

mod support;

use std::time::Duration;

use calendly_sim::{FailNext, Faults, TokenFaults};
use calsync_common::queue::message::{DEATH_REASON_HEADER, str_header};
use sqlx::PgPool;
use support::*;
use time::OffsetDateTime;

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn three_workers_and_thirty_deliveries_with_an_expiring_token_refresh_it_exactly_once(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    // Expires within the 5-minute margin: every delivery wants a refresh.
    h.store_tokens(ada.app_user, &ada.calendly, OffsetDateTime::now_utc() + time::Duration::minutes(1)).await;
    for _ in 0..30 {
        h.book(&ada, 1);
    }
    let bodies = h.captured();
    for _ in 0..3 {
        h.start_worker(&[]).await;
    }

    let ids = h.publish_all(&bodies).await;
    h.wait_for_inbox(&ids, &["processed"]).await;

    assert_eq!(h.sim.sim.token_grants("refresh_token"), 1, "one refresh for one expiry");
    assert_eq!(h.sim.sim.refresh_token_reuse_attempts(), 0, "no worker presented a used refresh token");
    assert_eq!(h.meetings(ada.app_user).await.len(), 30);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_access_token_rejected_with_401_is_refreshed_once_and_the_delivery_succeeds(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 1);
    // Calendly considers the stored token expired although our expiry says otherwise.
    h.sim.sim.expire_tokens(&ada.uri).unwrap();

    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;

    assert_eq!(h.sim.sim.token_grants("refresh_token"), 1);
    assert_eq!(h.meetings(ada.app_user).await.len(), 1);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_revoked_refresh_token_parks_deliveries_as_awaiting_reauth_and_a_reconnect_replays_them(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    h.store_tokens(ada.app_user, &ada.calendly, OffsetDateTime::now_utc() - time::Duration::minutes(1)).await;
    h.sim.sim.revoke_tokens(&ada.uri).unwrap();
    h.book(&ada, 1);
    h.book(&ada, 1);

    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["awaiting_reauth"]).await;

    let (status, is_active, last_error): (String, bool, Option<String>) =
        sqlx::query_as("SELECT status, is_active, last_error FROM calendar_connections WHERE id = $1")
            .bind(ada.connection_id)
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(status, "needs_reauth");
    assert!(is_active, "the account stays linked to its user");
    assert!(last_error.unwrap().contains("invalid_grant"));
    assert_eq!(h.count("SELECT count(*) FROM meetings").await, 0);
    assert_eq!(
        h.changes(&ada).await,
        ["connection.active/-/connect", "connection.needs_reauth/invalid_grant/refresh"],
        "the app is told once that the user must reconnect, and why"
    );

    // The user reconnects: fresh tokens, then the parked deliveries are replayed.
    h.store_tokens(ada.app_user, &ada.calendly, OffsetDateTime::now_utc() + time::Duration::hours(2)).await;
    let replayed = calsync_common::replay::replay_parked(&h.pool, &h.publisher, &ada.uri, 7).await.unwrap();

    assert_eq!(replayed, 2);
    h.wait_for_inbox(&ids, &["processed"]).await;
    assert_eq!(h.meetings(ada.app_user).await.len(), 2);
    let changes = h.changes(&ada).await;
    assert_eq!(changes[2], "connection.active/-/connect", "the reconnect is told");
    assert_eq!(changes.iter().filter(|c| c.starts_with("meeting.created/")).count(), 2);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn unmatched_deliveries_are_replayed_for_the_user_who_then_connects_that_account(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 1);
    let bodies = h.captured();
    sqlx::query("DELETE FROM calendar_connections").execute(&h.pool).await.unwrap();
    let ids = h.publish_all(&bodies).await;
    h.wait_for_inbox(&ids, &["unmatched"]).await;

    let new_owner = uuid::Uuid::new_v4();
    h.store_tokens(new_owner, &ada.calendly, OffsetDateTime::now_utc() + time::Duration::hours(2)).await;
    calsync_common::replay::replay_parked(&h.pool, &h.publisher, &ada.uri, 7).await.unwrap();

    h.wait_for_inbox(&ids, &["processed"]).await;
    assert_eq!(h.meetings(new_owner).await.len(), 1);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn with_30_percent_5xx_and_10_percent_429_everything_is_processed_and_nothing_is_dead(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let (ada, bob) = (h.connect("Ada").await, h.connect("Bob").await);
    for _ in 0..15 {
        h.book(&ada, 1);
        h.book(&bob, 1);
    }
    let bodies = h.captured();
    h.sim.sim.set_faults(Faults { error_rate: 0.3, rate_429: 0.1, ..Faults::default() });

    let ids = h.publish_all(&bodies).await;
    // Each injected 429 spends the user's budget for a second across the fleet, so on a loaded
    // machine an unlucky delivery can run out of in-process retries several times and pass through
    // the 1 s, 5 s, 30 s and 60 s tiers: wait for those, not for a fast machine.
    let through_four_tiers = calsync_common::retry::REDELIVERY_DELAYS[..4].iter().sum::<Duration>() * 2;
    h.wait_for_inbox_within(through_four_tiers, &ids, &["processed"]).await;

    assert_eq!(h.meetings(ada.app_user).await.len(), 15);
    assert_eq!(h.meetings(bob.app_user).await.len(), 15);
    assert!(h.dead_letters().await.is_empty());
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_poison_body_is_dead_lettered_with_its_reason_while_later_deliveries_flow(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 1);
    let good = h.captured();

    let poison = h.publish(b"{\"not\": \"a webhook\"").await;
    let ids = h.publish_all(&good).await;

    h.wait_for_inbox(&ids, &["processed"]).await;
    h.wait_for_inbox(std::slice::from_ref(&poison), &["dead"]).await;
    calsync_testkit::wait_until(DEADLINE, "the dead letter", || async {
        h.topology.depth(&h.topology.topology.dead_queue()).await == 1
    })
    .await;
    let dead = h.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].delivery.data, b"{\"not\": \"a webhook\"".to_vec());
    let reason = str_header(&dead[0].delivery.properties, DEATH_REASON_HEADER).unwrap();
    assert!(reason.contains("not a Calendly webhook envelope"), "{reason}");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_event_uri_on_another_origin_is_dead_lettered_and_no_token_is_sent_there(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_addr = trap.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((_socket, _)) = trap.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let body = serde_json::json!({
        "event": "invitee.created", "created_at": "2025-12-17T01:59:35.000000Z", "created_by": ada.uri,
        "payload": { "uri": format!("http://{trap_addr}/scheduled_events/E/invitees/I"), "status": "active",
                     "event": format!("http://{trap_addr}/scheduled_events/E"), "updated_at": "2025-12-17T01:59:35.000000Z" }
    });

    let id = h.publish(body.to_string().as_bytes()).await;

    h.wait_for_inbox(&[id], &["dead"]).await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing connected to the foreign host");
    assert_eq!(h.count("SELECT count(*) FROM meetings").await, 0);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_body_naming_one_user_but_pointing_at_another_users_event_writes_nothing(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let (ada, bob) = (h.connect("Ada").await, h.connect("Bob").await);
    h.book(&bob, 1);
    let bobs = h.captured().remove(0);
    // Same payload, but claiming to come from Ada's subscription.
    let mut forged: serde_json::Value = serde_json::from_slice(&bobs).unwrap();
    forged["created_by"] = serde_json::Value::String(ada.uri.clone());

    let id = h.publish(forged.to_string().as_bytes()).await;

    h.wait_for_inbox(&[id], &["dead"]).await;
    assert_eq!(h.count("SELECT count(*) FROM meetings").await, 0, "Ada's token cannot read Bob's event (403)");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn calendly_failing_beyond_the_in_process_budget_is_retried_later_through_a_delay_queue(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 1);
    // More failures than one attempt's in-process retries (5 to 8 calls in 5 s) absorb, fewer than two.
    h.sim.sim.fail_next(FailNext { endpoint: "get_event".into(), count: 10, status: 503 });

    let ids = h.publish_all(&h.captured()).await;

    h.wait_for_inbox(&ids, &["processed"]).await;
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM webhook_inbox").fetch_one(&h.pool).await.unwrap();
    assert!(attempts >= 2, "processed on a delayed redelivery (attempt {attempts})");
    assert!(h.dead_letters().await.is_empty());
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn after_the_maximum_attempts_a_delivery_is_dead_lettered_says_why_and_can_be_replayed(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&["--worker-max-attempts=2"]).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 1);
    h.sim.sim.set_faults(Faults { error_rate: 1.0, ..Faults::default() });

    let ids = h.publish_all(&h.captured()).await;

    h.wait_for_inbox(&ids, &["dead"]).await;
    let last_error: Option<String> =
        sqlx::query_scalar("SELECT last_error FROM webhook_inbox").fetch_one(&h.pool).await.unwrap();
    assert!(last_error.unwrap().contains("gave up after 2 attempts"));
    calsync_testkit::wait_until(Duration::from_secs(10), "dead letter queued", || async {
        h.topology.depth(&h.topology.topology.dead_queue()).await == 1
    })
    .await;

    // The operator fixes the cause and replays the dead letters: the delivery then succeeds.
    h.sim.sim.set_faults(Faults::default());
    let moved = calsync_worker::admin::replay_dead::replay_dead(&h.pool, &h.publisher).await.unwrap();
    assert_eq!(moved, 1);
    h.wait_for_inbox(&ids, &["processed"]).await;
    assert_eq!(h.meetings(ada.app_user).await.len(), 1);
    assert_eq!(h.topology.depth(&h.topology.topology.dead_queue()).await, 0);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_disconnect_racing_a_delivery_leaves_no_meeting_and_parks_the_delivery(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 1);
    let bodies = h.captured();
    // A disconnect is under way: it holds the connection row.
    let mut disconnect = h.hold_connection_row(&ada).await;

    let ids = h.publish_all(&bodies).await;
    // The worker has resolved the user and fetched the event; its write waits for the row.
    calsync_testkit::wait_until(DEADLINE, "the worker waits on the connection row", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&h.pool)
        .await
        .unwrap()
            >= 1
    })
    .await;
    sqlx::query(
        "UPDATE calendar_connections SET status = 'disconnected', is_active = false, access_token = NULL, \
         refresh_token = NULL WHERE id = $1",
    )
    .bind(ada.connection_id)
    .execute(&mut *disconnect)
    .await
    .unwrap();
    disconnect.commit().await.unwrap();

    h.wait_for_inbox(&ids, &["unmatched"]).await;
    assert_eq!(h.count("SELECT count(*) FROM meetings").await, 0, "nothing written for an account no longer linked");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_refresh_answered_with_an_absurd_lifetime_keeps_the_new_tokens_and_the_user_connected(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    // One slot: if the broken answer took it (a panic left the message unacked), nothing else would
    // ever be processed.
    h.start_worker(&["--worker-concurrency=1", "--worker-max-attempts=1"]).await;
    let (ada, bob) = (h.connect("Ada").await, h.connect("Bob").await);
    h.store_tokens(ada.app_user, &ada.calendly, OffsetDateTime::now_utc() - time::Duration::minutes(1)).await;
    h.book(&ada, 1);
    let ada_bodies = h.captured();
    h.book(&bob, 1);
    let bob_bodies = h.captured();
    // Ada's token must be refreshed, and the token endpoint answers a lifetime of 31 million years.
    // Calendly has consumed the old refresh token by then: the new pair is the only one left.
    h.sim.sim.set_faults(Faults {
        token: TokenFaults { expires_in: Some(1_000_000_000_000_000), ..TokenFaults::default() },
        ..Faults::default()
    });

    let ada_ids = h.publish_all(&ada_bodies).await;
    h.wait_for_inbox(&ada_ids, &["processed"]).await;
    let bob_ids = h.publish_all(&bob_bodies).await;
    h.wait_for_inbox(&bob_ids, &["processed"]).await;

    assert_eq!(h.connection_status(&ada).await, "active", "the user is not asked to reconnect");
    let expires_at: OffsetDateTime =
        sqlx::query_scalar("SELECT token_expires_at FROM calendar_connections WHERE id = $1")
            .bind(ada.connection_id)
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert!(
        expires_at < OffsetDateTime::now_utc() + time::Duration::hours(3),
        "the absurd lifetime is not believed: {expires_at}"
    );
    // The stored refresh token is the new one: the next refresh works.
    h.sim.sim.set_faults(Faults::default());
    h.sim.sim.expire_tokens(&ada.uri).unwrap();
    h.book(&ada, 1);
    let later = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&later, &["processed"]).await;
    assert_eq!(h.meetings(ada.app_user).await.len(), 2);
    assert_eq!(h.sim.sim.refresh_token_reuse_attempts(), 0);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_grant_missing_a_scope_makes_the_connection_need_reauth_naming_it_and_parks_the_delivery(pool: PgPool) {
    let (h, ada) = Harness::with_worker_and_user(pool, "Ada").await;
    h.book(&ada, 1);
    let bodies = h.captured();
    h.sim.sim.set_faults(Faults {
        token: TokenFaults { missing_scopes: vec!["scheduled_events:read".into()], ..TokenFaults::default() },
        ..Faults::default()
    });

    let ids = h.publish_all(&bodies).await;
    h.wait_for_inbox(&ids, &["awaiting_reauth"]).await;

    assert_eq!(h.connection_status(&ada).await, "needs_reauth");
    let last_error: Option<String> = sqlx::query_scalar("SELECT last_error FROM calendar_connections WHERE id = $1")
        .bind(ada.connection_id)
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert!(last_error.unwrap().contains("scheduled_events:read"), "the missing scope is named");
    assert_eq!(
        h.changes(&ada).await,
        ["connection.active/-/connect", "connection.needs_reauth/insufficient_scope/refresh"]
    );
    assert!(h.dead_letters().await.is_empty(), "not dead: a reconnect with the scope replays it");
    assert_eq!(h.meetings(ada.app_user).await.len(), 0);
    h.stop().await;
}
