//! One API budget per Calendly user across the fleet (ARCHITECTURE.md, "Calendly API budget"):
//! the shared window in PostgreSQL, three worker processes draining one free-plan burst, and the
//! token endpoint's own budget.

mod support;

use std::time::Duration;

use calendly_sim::{Faults, NewUser, Plan};
use calsync_common::calendly::rate::RateLimit;
use calsync_common::db::budgets::{self, Taken, Window};
use calsync_testkit::wait_until;
use calsync_worker::budget::Budget;
use sqlx::PgPool;
use support::*;

const MINUTE: Duration = Duration::from_secs(60);
/// The API's window before any answer: the free plan's, a guess.
const ASSUMED: Window = Window { limit: 50, length: MINUTE, known: false };

fn answer(limit: u32, remaining: u32, reset_secs: u64) -> RateLimit {
    RateLimit { limit, remaining, reset: Duration::from_secs(reset_secs) }
}

async fn granted(pool: &PgPool, key: &str) -> i64 {
    match budgets::take(pool, key, ASSUMED).await.unwrap() {
        Taken::Granted { window, .. } => window,
        Taken::Spent { wait } => panic!("{key}: spent for another {wait:?}"),
    }
}

async fn spent(pool: &PgPool, key: &str) -> Duration {
    match budgets::take(pool, key, ASSUMED).await.unwrap() {
        Taken::Granted { .. } => panic!("{key}: granted past its window's limit"),
        Taken::Spent { wait } => wait,
    }
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn two_hundred_takers_at_once_on_many_connections_get_exactly_the_windows_fifty(pool: PgPool) {
    // Collected: every taker is spawned before the first is awaited.
    let takers: Vec<_> = (0..200)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { budgets::take(&pool, "api:ada", ASSUMED).await.unwrap() })
        })
        .collect();
    let mut granted = 0;
    for taker in takers {
        if matches!(taker.await.unwrap(), Taken::Granted { .. }) {
            granted += 1;
        }
    }
    assert_eq!(granted, 50, "a free plan's window, assumed until Calendly answers");
    // Another user's window is untouched.
    assert!(matches!(budgets::take(&pool, "api:bob", ASSUMED).await.unwrap(), Taken::Granted { .. }));
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn eighty_takes_of_one_window_in_one_call_grant_the_first_fifty_in_the_order_asked(pool: PgPool) {
    let mut wanted: Vec<(&str, Window)> = vec![("api:ada", ASSUMED); 80];
    wanted.insert(30, ("api:bob", ASSUMED));
    let taken = budgets::take_all(&pool, &wanted).await.unwrap();
    assert_eq!(taken.len(), 81);
    let ada: Vec<&Taken> = taken.iter().enumerate().filter(|(i, _)| *i != 30).map(|(_, t)| t).collect();
    for (n, take) in ada.iter().enumerate() {
        match take {
            Taken::Granted { seen, .. } => assert_eq!(seen.used as usize, n + 1, "take {n} counted in order"),
            Taken::Spent { wait } => {
                assert!(n >= 50, "take {n} refused inside the window's fifty");
                assert!(*wait <= Duration::from_secs(1), "an assumed window is looked at again soon: {wait:?}");
            }
        }
    }
    assert_eq!(ada.iter().filter(|t| matches!(t, Taken::Granted { .. })).count(), 50);
    assert!(matches!(taken[30], Taken::Granted { seen, .. } if seen.used == 1), "bob's own window: {:?}", taken[30]);
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn two_hundred_calls_reserving_at_once_through_one_workers_gathered_takes_get_exactly_the_windows_fifty(
    pool: PgPool,
) {
    let budgets = calsync_worker::budget::Budgets::new(pool.clone());
    let callers: Vec<_> = (0..200)
        .map(|i| {
            let budgets = budgets.clone();
            // Every fourth call is another user's: gathered with ada's, counted in its own window.
            let account =
                if i % 4 == 0 { "https://api.calendly.com/users/bob" } else { "https://api.calendly.com/users/ada" };
            tokio::spawn(async move { (account, budgets.reserve_for(Budget::Api, account).await.unwrap().is_ok()) })
        })
        .collect();
    let (mut ada, mut bob) = (0, 0);
    for caller in callers {
        match caller.await.unwrap() {
            (account, true) if account.ends_with("ada") => ada += 1,
            (_, true) => bob += 1,
            _ => {}
        }
    }
    assert_eq!((ada, bob), (50, 50), "each user's free-plan window, assumed until Calendly answers");
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn concurrent_calls_taking_the_same_windows_in_opposite_orders_never_deadlock(pool: PgPool) {
    // Each call locks every row it takes until it returns: without one order of locking, two calls
    // asking for the same keys in opposite orders wait for each other until PostgreSQL kills one.
    let keys: Vec<String> = (0..40).map(|i| format!("api:user-{i:02}")).collect();
    let window = Window { limit: 1_000_000, length: MINUTE, known: true };
    let calls: Vec<_> = (0..8)
        .map(|call| {
            let (pool, mut keys) = (pool.clone(), keys.clone());
            if call % 2 == 1 {
                keys.reverse();
            }
            tokio::spawn(async move {
                for _ in 0..25 {
                    let wanted: Vec<(&str, Window)> = keys.iter().map(|k| (k.as_str(), window)).collect();
                    let taken = budgets::take_all(&pool, &wanted).await.expect("a batched take failed");
                    assert!(taken.iter().all(|t| matches!(t, Taken::Granted { .. })));
                }
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    let used: Vec<i32> =
        sqlx::query_scalar("SELECT used FROM api_budgets ORDER BY budget_key").fetch_all(&pool).await.unwrap();
    assert_eq!(used, vec![8 * 25; 40], "every take counted once");
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_spent_window_says_how_long_until_calendly_resets_it(pool: PgPool) {
    let window = granted(&pool, "api:ada").await;
    // Calendly: 10 requests were made in this window (some by another app), 40 left, 20 s to go.
    budgets::settle(&pool, "api:ada", window, answer(50, 40, 20)).await.unwrap();
    for _ in 0..40 {
        granted(&pool, "api:ada").await;
    }
    let wait = spent(&pool, "api:ada").await;
    assert!(wait > Duration::from_secs(18) && wait <= Duration::from_secs(20), "{wait:?}");
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_answer_from_a_paid_plan_lifts_the_assumed_limit_within_the_same_window(pool: PgPool) {
    let window = granted(&pool, "api:ada").await;
    budgets::settle(&pool, "api:ada", window, answer(500, 499, 60)).await.unwrap();
    for _ in 1..200 {
        granted(&pool, "api:ada").await;
    }
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn until_calendly_answers_a_guessed_window_is_looked_at_again_within_a_second(pool: PgPool) {
    for _ in 0..50 {
        granted(&pool, "api:ada").await;
    }
    assert!(spent(&pool, "api:ada").await <= Duration::from_secs(1), "the minute is only a guess");
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_spent_window_known_in_advance_waits_for_its_reset_rather_than_looking_again_each_second(pool: PgPool) {
    // The token endpoint's: 8 a minute, and no answer ever says more about it.
    let tokens = Window { limit: 8, length: MINUTE, known: true };
    for _ in 0..8 {
        assert!(matches!(budgets::take(&pool, "token:ada", tokens).await.unwrap(), Taken::Granted { .. }));
    }
    match budgets::take(&pool, "token:ada", tokens).await.unwrap() {
        Taken::Spent { wait } => assert!(wait > Duration::from_secs(55), "{wait:?}"),
        Taken::Granted { .. } => panic!("a ninth token request in the minute"),
    }
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_answer_to_a_request_of_an_earlier_window_says_nothing_about_the_current_one(pool: PgPool) {
    let earlier = granted(&pool, "api:ada").await;
    // The window ends, and the next one starts with the next request.
    sqlx::query("UPDATE api_budgets SET resets_at = now() - interval '1 second'").execute(&pool).await.unwrap();
    let current = granted(&pool, "api:ada").await;
    assert_ne!(earlier, current);
    budgets::settle(&pool, "api:ada", current, answer(50, 48, 30)).await.unwrap();
    // The earlier window's last answer arrives late: it was spent then, with a second to go.
    budgets::settle(&pool, "api:ada", earlier, answer(50, 0, 1)).await.unwrap();
    for _ in 2..50 {
        granted(&pool, "api:ada").await;
    }
    assert!(spent(&pool, "api:ada").await > Duration::from_secs(25));
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_answer_whose_window_ends_clearly_later_follows_the_newer_window_calendly_started(pool: PgPool) {
    let window = granted(&pool, "api:ada").await;
    budgets::settle(&pool, "api:ada", window, answer(50, 0, 3)).await.unwrap();
    assert!(spent(&pool, "api:ada").await <= Duration::from_secs(3));
    // A request sent as Calendly's window reset landed in its next window: 49 left there, not 0.
    budgets::settle(&pool, "api:ada", window, answer(50, 49, 60)).await.unwrap();
    for _ in 0..49 {
        granted(&pool, "api:ada").await;
    }
    assert!(spent(&pool, "api:ada").await > Duration::from_secs(55));
}

/// Webhooks among `ids` that are processed.
async fn processed(pool: &PgPool, ids: &[String]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM webhook_inbox WHERE message_id = ANY($1) AND status = 'processed'")
        .bind(ids)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn three_worker_processes_drain_a_free_plan_burst_inside_its_window_and_another_user_is_not_held_up(
    pool: PgPool,
) {
    let h = Harness::new(pool).await;
    // The free plan's 50 requests per window; a 5-second window keeps the test short.
    h.sim.sim.set_faults(Faults { rate_limit_window_secs: Some(5), ..Faults::default() });
    let ada = h.connect_as(NewUser { plan: Plan::Free, ..NewUser::named("Ada") }).await;
    let bob = h.connect("Bob").await;
    for _ in 0..120 {
        h.book(&ada, 1);
    }
    let burst = h.captured();
    assert_eq!(burst.len(), 120, "120 webhooks on 120 events");
    // Three processes of 32 slots each: 96 requests could be in flight before Calendly answers any.
    let mut workers = [(); 3].map(|_| h.spawn_worker_process(&["--worker-concurrency=32"]));

    let ada_ids = h.publish_all(&burst).await;
    wait_until(DEADLINE, "Ada's first window used", || async { processed(&h.pool, &ada_ids).await >= 50 }).await;
    h.book(&bob, 1);
    let bob_ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&bob_ids, &["processed"]).await;
    let ada_done_when_bob_was = processed(&h.pool, &ada_ids).await;

    wait_until(Duration::from_secs(120), "Ada's burst drained", || async { processed(&h.pool, &ada_ids).await == 120 })
        .await;
    assert!(ada_done_when_bob_was < 120, "Bob's webhook was handled while Ada's waited for her window");
    let refused = h.sim.sim.rate_limited();
    assert!(refused <= 5, "{refused} answers were 429: the workers together overshot Ada's window");
    assert_eq!(h.meetings(ada.app_user).await.len(), 120);
    assert!(h.dead_letters().await.is_empty());
    for worker in &mut workers {
        worker.kill().await.unwrap();
    }
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_ninth_token_refresh_in_a_minute_waits_for_the_next_window_instead_of_a_429(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    let addr = h.start_worker(&[]).await;
    // Each delivery finds Ada's access token revoked at Calendly (401) and refreshes it: nine
    // deliveries, nine token requests, one more than Calendly allows a user in a minute.
    let mut ids = Vec::new();
    for n in 1..=9 {
        h.sim.sim.expire_tokens(&ada.uri).unwrap();
        h.book(&ada, 1);
        ids.extend(h.publish_all(&h.captured()).await);
        if n < 9 {
            h.wait_for_inbox(&ids, &["processed"]).await;
        }
    }
    assert_eq!(h.sim.sim.token_grants("refresh_token"), 8);
    wait_until(DEADLINE, "the ninth refresh put off", || async {
        metric(addr, "calsync_calendly_budget_deferrals_total").await >= 1.0
    })
    .await;
    // Put off, not lost: it is done once the window has reset.
    wait_until(Duration::from_secs(150), "the ninth delivery processed", || async {
        h.inbox_status(ids.last().unwrap()).await.as_deref() == Some("processed")
    })
    .await;
    assert_eq!(h.sim.sim.token_rate_limited(), 0, "no token request was refused");
    let deferred = metric(addr, "calsync_calendly_budget_deferrals_total").await;
    assert!(deferred <= 2.0, "put off {deferred} times: it should wait for the reset, not look again every second");
    assert_eq!(h.sim.sim.token_grants("refresh_token"), 9);
    assert!(h.dead_letters().await.is_empty());
    h.stop().await;
}
