//! Keeping in step with Calendly when webhooks are not enough: subscription health, reconciliation,
//! resumable sync passes and each user's API budget, against the simulator.

mod support;

use calendly_sim::{FailNext, Faults, NewUser, Plan, SubscriptionChange};
use calsync_common::db::connections::SyncResult;
use calsync_common::queue::message::{SyncJob, SyncKind, sync_job};
use calsync_testkit::wait_until;
use sqlx::PgPool;
use support::*;
use time::OffsetDateTime;

const CHECK_EVERY_SECOND: &[&str] = &["--subscription-check-interval-secs=1", "--reconcile-interval-secs=0"];

async fn subscription_of(h: &Harness, user: &User) -> (Option<String>, Option<String>, Option<OffsetDateTime>) {
    sqlx::query_as(
        "SELECT webhook_subscription_uri, subscription_state, subscription_failing_since \
         FROM calendar_connections WHERE id = $1",
    )
    .bind(user.connection_id)
    .fetch_one(&h.pool)
    .await
    .unwrap()
}

async fn last_synced(h: &Harness, user: &User) -> Option<OffsetDateTime> {
    sqlx::query_scalar("SELECT last_synced_at FROM calendar_connections WHERE id = $1")
        .bind(user.connection_id)
        .fetch_one(&h.pool)
        .await
        .unwrap()
}

/// Runs one sync job of `kind` for `user` and waits until it has finished a pass.
async fn run_sync(h: &Harness, user: &User, kind: SyncKind) {
    let before = last_synced(h, user).await;
    h.publisher.publish(&sync_job(&SyncJob::new(user.connection_id, kind))).await.unwrap();
    wait_until(DEADLINE, "the sync pass finished", || async { last_synced(h, user).await > before }).await;
}

fn invitee_id(booking: &serde_json::Value, n: usize) -> uuid::Uuid {
    uuid_of(booking["invitees"][n]["uri"].as_str().unwrap())
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_disabled_subscription_is_replaced_and_the_bookings_it_missed_are_recovered_without_a_webhook(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    let (old, _, _) = subscription_of(&h, &ada).await;
    let old = old.unwrap();
    let disabled = SubscriptionChange { disabled: Some(true), ..Default::default() };
    h.sim.sim.set_subscription(uuid_of(&old), disabled).unwrap();
    h.book(&ada, 1);
    h.book(&ada, 2);
    assert!(h.captured().is_empty(), "a disabled subscription delivers nothing");

    h.start_worker(CHECK_EVERY_SECOND).await;

    wait_until(DEADLINE, "Ada's two missed meetings recovered", || async { h.meetings(ada.app_user).await.len() == 2 })
        .await;
    assert_eq!(h.invitees_of(ada.app_user).await.len(), 3);
    let (new, state, _) = subscription_of(&h, &ada).await;
    let new = new.unwrap();
    assert_ne!(new, old);
    assert_eq!(state.as_deref(), Some("active"));
    let ours: Vec<_> = h.sim.sim.subscriptions().into_iter().filter(|s| s["user"] == ada.uri.as_str()).collect();
    assert_eq!(ours.len(), 1, "the disabled subscription was deleted: {ours:?}");
    assert_eq!((ours[0]["uri"].as_str(), ours[0]["state"].as_str()), (Some(new.as_str()), Some("active")));
    assert_eq!(ours[0]["callback_url"], CAPTURE_URL, "the replacement points where the old one did");
    h.book(&ada, 1);
    assert_eq!(h.captured().len(), 1, "webhooks flow again");

    // The app was told the subscription failed and was repaired, and got the recovered meetings.
    let changes = h.changes(&ada).await;
    let told: Vec<&str> = changes.iter().map(String::as_str).filter(|c| c.starts_with("connection.")).collect();
    assert_eq!(
        told,
        [
            "connection.active/-/connect",
            "connection.subscription_failing/-/subscription_check",
            "connection.subscription_repaired/-/subscription_check"
        ]
    );
    let synced = |kind: &str| changes.iter().filter(|c| **c == format!("{kind}/-/sync")).count();
    assert_eq!((synced("meeting.created"), synced("invitee.created")), (2, 3));
    // The resync says what it fixed.
    let sync = calsync_common::db::connections::sync_status(&h.pool, ada.connection_id).await.unwrap().unwrap();
    assert_eq!((sync.kind.as_str(), sync.result, sync.corrected), ("resync", SyncResult::Done, 5));
    assert!(sync.finished_at.is_some_and(|f| f >= sync.started_at));
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_subscription_calendly_fails_to_deliver_to_shows_as_failing_since_then_until_it_recovers(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    let (uri, _, _) = subscription_of(&h, &ada).await;
    let subscription = uuid_of(&uri.unwrap());
    let since = OffsetDateTime::from_unix_timestamp(OffsetDateTime::now_utc().unix_timestamp() - 3 * 3600).unwrap();
    let failing = SubscriptionChange { retry_started_at: Some(Some(since)), ..Default::default() };
    h.sim.sim.set_subscription(subscription, failing).unwrap();

    let addr = h.start_worker(CHECK_EVERY_SECOND).await;

    wait_until(DEADLINE, "the subscription reported failing", || async {
        subscription_of(&h, &ada).await.1.as_deref() == Some("failing")
    })
    .await;
    assert_eq!(subscription_of(&h, &ada).await.2, Some(since));
    let connection = calsync_common::db::connections::find(&h.pool, ada.connection_id).await.unwrap().unwrap();
    let checked = connection.subscription_checked_at.expect("the check says when it looked");
    assert!(OffsetDateTime::now_utc() - checked < time::Duration::minutes(1));
    wait_until(DEADLINE, "calsync_subscriptions{state=failing} = 1", || async {
        metrics(addr).await.lines().any(|l| l == r#"calsync_subscriptions{state="failing"} 1"#)
    })
    .await;
    let lines = calsync_worker::admin::connections::connections(&h.pool).await.unwrap();
    assert!(lines[0].to_string().contains("subscription=failing-since-"), "{}", lines[0]);

    h.sim
        .sim
        .set_subscription(subscription, SubscriptionChange { retry_started_at: Some(None), ..Default::default() })
        .unwrap();
    wait_until(DEADLINE, "the subscription reported active again", || async {
        subscription_of(&h, &ada).await.1.as_deref() == Some("active")
    })
    .await;
    assert_eq!(subscription_of(&h, &ada).await.2, None);
    assert_eq!(
        h.changes(&ada).await,
        [
            "connection.active/-/connect",
            "connection.subscription_failing/-/subscription_check",
            "connection.subscription_repaired/-/subscription_check"
        ],
        "told once when it started failing and once when it recovered, however many checks ran"
    );
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_reconciliation_of_an_unchanged_account_costs_one_list_call_per_100_events(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    for _ in 0..250 {
        h.book(&ada, 1);
    }
    h.captured();
    run_sync(&h, &ada, SyncKind::Backfill).await;
    assert_eq!(h.meetings(ada.app_user).await.len(), 250);
    let calls = || ["list_events", "list_invitees", "get_event"].map(|e| h.sim.sim.calls(e));
    let before = calls();

    run_sync(&h, &ada, SyncKind::Reconcile).await;

    let after = calls();
    let spent: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    assert_eq!(spent, [3, 0, 0], "list_events, list_invitees, get_event calls of the pass");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_booking_a_cancel_and_a_group_change_whose_webhooks_never_came_are_corrected_by_the_next_reconciliation(
    pool: PgPool,
) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&["--reconcile-interval-secs=1", "--subscription-check-interval-secs=0"]).await;
    let ada = h.connect("Ada").await;
    let solo = h.book(&ada, 1);
    let group = h.book(&ada, 3);
    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;

    // Calendly changes things; none of its webhooks reach us.
    let missed = h.book_unannounced(&ada, 1);
    h.sim.sim.cancel(invitee_id(&solo, 0), Default::default()).unwrap();
    h.sim.sim.cancel(invitee_id(&group, 1), Default::default()).unwrap();
    h.captured();

    let event_uri = |b: &serde_json::Value| b["event"]["uri"].as_str().unwrap().to_owned();
    let expected = {
        let mut rows = vec![
            (event_uri(&solo), "canceled".to_owned()),
            (event_uri(&group), "active".to_owned()),
            (event_uri(&missed), "active".to_owned()),
        ];
        rows.sort();
        rows
    };
    wait_until(DEADLINE, "the missed booking and cancels reconciled", || async {
        let canceled_guests = h.invitees_of(ada.app_user).await.iter().filter(|(_, s)| s == "canceled").count();
        let mut meetings = h.meetings(ada.app_user).await;
        meetings.sort();
        meetings == expected && canceled_guests == 2
    })
    .await;
    let mut corrected: Vec<String> =
        h.changes(&ada).await.into_iter().filter(|c| c.ends_with("/sync")).map(|c| c.replace("/-/sync", "")).collect();
    corrected.sort();
    assert_eq!(
        corrected,
        ["invitee.canceled", "invitee.canceled", "invitee.created", "meeting.canceled", "meeting.created"],
        "exactly what the passes corrected, each once, however many passes ran"
    );
    wait_until(DEADLINE, "a reconciliation reported done", || async {
        let sync = calsync_common::db::connections::sync_status(&h.pool, ada.connection_id).await.unwrap();
        sync.is_some_and(|s| s.kind == "reconcile" && s.result == SyncResult::Done)
    })
    .await;
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_backfill_on_a_small_budget_continues_where_it_stopped_and_finishes_with_nothing_dead(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    for _ in 0..25 {
        h.book(&ada, 1);
    }
    h.captured();
    // 8 requests per 3-second window: the pass (26 calls) needs at least four windows.
    h.sim.sim.set_faults(Faults {
        rate_limit_per_minute: Some(8),
        rate_limit_window_secs: Some(3),
        ..Faults::default()
    });
    // Two attempts: a pass that counted each rate-limit wait as a failure would be dead at once.
    h.start_worker(&["--worker-max-attempts=2"]).await;

    run_sync(&h, &ada, SyncKind::Backfill).await;

    assert_eq!(h.meetings(ada.app_user).await.len(), 25);
    assert!(h.dead_letters().await.is_empty());
    assert!(h.sim.sim.calls("list_events") >= 2, "the pass was interrupted and resumed");
    assert!(h.sim.sim.rate_limited() <= 2, "{} answers were 429", h.sim.sim.rate_limited());
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_free_plan_burst_waits_for_the_next_window_without_a_429_storm_and_another_user_is_not_held_up(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    // Free plan: 50 requests per window; a 4-second window keeps the test short.
    h.sim.sim.set_faults(Faults { rate_limit_window_secs: Some(4), ..Faults::default() });
    let ada = h.connect_as(NewUser { plan: Plan::Free, ..NewUser::named("Ada") }).await;
    let bob = h.connect("Bob").await;
    for _ in 0..80 {
        h.book(&ada, 1);
    }
    let burst = h.captured();
    h.start_worker(&[]).await;

    let ada_ids = h.publish_all(&burst).await;
    let processed = |ids: Vec<String>| {
        let pool = h.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM webhook_inbox WHERE message_id = ANY($1) AND status = 'processed'",
            )
            .bind(ids)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    wait_until(DEADLINE, "Ada's first window used", || async { processed(ada_ids.clone()).await >= 50 }).await;
    h.book(&bob, 1);
    let bob_ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&bob_ids, &["processed"]).await;
    let ada_done_when_bob_was = processed(ada_ids.clone()).await;

    h.wait_for_inbox(&ada_ids, &["processed"]).await;
    assert!(ada_done_when_bob_was < 80, "Bob's webhook was handled while Ada's waited for her window");
    assert!(h.sim.sim.rate_limited() <= 5, "{} answers were 429", h.sim.sim.rate_limited());
    assert!(h.dead_letters().await.is_empty());
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_plan_without_webhooks_is_said_on_the_connection_and_never_fills_the_dead_letters(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let ada = h.connect_as(NewUser { webhooks_enabled: false, ..NewUser::named("Ada") }).await;
    // As the connect flow leaves it when Calendly refuses the subscription.
    calsync_common::db::connections::set_subscription(&h.pool, ada.connection_id, None, None).await.unwrap();
    let callback = format!("--calendly-webhook-callback-url={CAPTURE_URL}");
    h.start_worker(&["--subscription-check-interval-secs=1", "--reconcile-interval-secs=0", &callback]).await;

    wait_until(DEADLINE, "the refused subscription said on the connection", || async {
        let error: Option<String> = sqlx::query_scalar("SELECT last_error FROM calendar_connections WHERE id = $1")
            .bind(ada.connection_id)
            .fetch_one(&h.pool)
            .await
            .unwrap();
        error.is_some_and(|e| e.starts_with("subscription check:") && e.contains("403"))
    })
    .await;
    let checks = h.sim.sim.calls("create_subscription");
    wait_until(DEADLINE, "a later check", || async { h.sim.sim.calls("create_subscription") > checks }).await;
    assert!(h.dead_letters().await.is_empty());
    assert_eq!(h.connection_status(&ada).await, "active");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_replacement_subscription_is_in_place_before_the_old_one_goes_even_when_deleting_it_fails(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    let old = subscription_of(&h, &ada).await.0.unwrap();
    h.sim
        .sim
        .set_subscription(uuid_of(&old), SubscriptionChange { disabled: Some(true), ..Default::default() })
        .unwrap();
    h.book(&ada, 1);
    h.captured();
    // Calendly refuses every delete: a repair that deleted first would leave Ada with nothing.
    h.sim.sim.fail_next(FailNext { endpoint: "delete_subscription".into(), count: 10_000, status: 503 });

    h.start_worker(CHECK_EVERY_SECOND).await;

    wait_until(DEADLINE, "the missed booking recovered", || async { h.meetings(ada.app_user).await.len() == 1 }).await;
    let (new, state, _) = subscription_of(&h, &ada).await;
    assert_ne!(new.as_deref(), Some(old.as_str()));
    assert_eq!(state.as_deref(), Some("active"));
    let states: Vec<(String, String)> = h
        .sim
        .sim
        .subscriptions()
        .into_iter()
        .filter(|s| s["user"] == ada.uri.as_str())
        .map(|s| (s["uri"].as_str().unwrap().to_owned(), s["state"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(states.len(), 2, "the old one could not be deleted: {states:?}");
    assert!(states.contains(&(new.unwrap(), "active".to_owned())));
    h.book(&ada, 1);
    assert_eq!(h.captured().len(), 1, "webhooks flow through the replacement");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_grant_from_before_webhooks_read_was_asked_for_is_told_to_reconnect_and_keeps_syncing(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    // Every token lacks webhooks:read, as grants made before calsync asked for it do.
    h.sim.sim.set_faults(Faults {
        token: calendly_sim::TokenFaults { missing_scopes: vec!["webhooks:read".into()], ..Default::default() },
        ..Faults::default()
    });

    h.start_worker(CHECK_EVERY_SECOND).await;
    wait_until(DEADLINE, "the missing scope said on the connection", || async {
        let error: Option<String> = sqlx::query_scalar("SELECT last_error FROM calendar_connections WHERE id = $1")
            .bind(ada.connection_id)
            .fetch_one(&h.pool)
            .await
            .unwrap();
        error.is_some_and(|e| {
            e.contains("webhooks:read") && e.contains("reconnect Calendly to enable subscription health")
        })
    })
    .await;
    h.book(&ada, 1);
    let ids = h.publish_all(&h.captured()).await;

    h.wait_for_inbox(&ids, &["processed"]).await;
    assert_eq!(h.connection_status(&ada).await, "active", "an auxiliary check never parks a connection");
    assert_eq!(h.meetings(ada.app_user).await.len(), 1);
    assert!(h.dead_letters().await.is_empty());
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_event_gone_between_the_list_and_its_invitees_is_skipped_and_the_pass_finishes(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    for _ in 0..3 {
        h.book_unannounced(&ada, 1);
    }
    // An earlier pass died: the connection says so until a pass finishes.
    calsync_common::db::connections::set_last_error(&h.pool, ada.connection_id, "backfill failed: earlier")
        .await
        .unwrap();
    h.start_worker(&["--subscription-check-interval-secs=0", "--reconcile-interval-secs=0"]).await;
    // The first event's invitee list answers 404: Calendly deleted it after listing it.
    h.sim.sim.fail_next(FailNext { endpoint: "list_invitees".into(), count: 1, status: 404 });

    run_sync(&h, &ada, SyncKind::Backfill).await;

    assert_eq!(h.meetings(ada.app_user).await.len(), 2, "the other events are written");
    assert!(h.dead_letters().await.is_empty(), "one vanished event does not kill the pass");
    let error: Option<String> = sqlx::query_scalar("SELECT last_error FROM calendar_connections WHERE id = $1")
        .bind(ada.connection_id)
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(error, None, "a finished pass clears the failure of the one before it");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_subscription_check_about_an_account_the_user_switched_away_from_records_nothing(pool: PgPool) {
    use calsync_common::db::connections::{self, SubscriptionState};
    let h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    let seen = connections::find(&h.pool, ada.connection_id).await.unwrap().unwrap();
    let uri = seen.webhook_subscription_uri.clone().unwrap();
    // The app user switches to another Calendly account; the row (and, here, the URI) stays.
    let other = h.sim.sim.create_user(NewUser::named("Ada elsewhere")).unwrap();
    h.store_tokens(ada.app_user, &other, OffsetDateTime::now_utc() + time::Duration::hours(2)).await;
    connections::set_subscription(&h.pool, ada.connection_id, Some(&uri), None).await.unwrap();

    let recorded =
        connections::record_subscription_check(&h.pool, &seen, &uri, SubscriptionState::Disabled, None).await.unwrap();
    let replaced =
        connections::replace_subscription(&h.pool, &seen, Some(&uri), "https://example.com/new").await.unwrap();

    assert!(!recorded && !replaced, "a check of the old account never writes onto the new one");
    let (now_uri, state, _) = subscription_of(&h, &ada).await;
    assert_eq!((now_uri.as_deref(), state.as_deref()), (Some(uri.as_str()), Some("active")));
    h.stop().await;
}
