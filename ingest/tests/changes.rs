//! `GET /changes` against real PostgreSQL: a reader following `next_cursor` sees every change
//! exactly once, also one whose transaction committed after a later one (which a reader of a plain
//! sequence as `id > last` skips); pages, the user filter, expired and garbled cursors, the bearer.

mod support;

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use support::*;
use uuid::Uuid;

use calsync_common::db::changes;
use calsync_testkit::wait_until;

const API_TOKEN: &str = "feed-test-token";

async fn feed_app(pool: &PgPool) -> TestApp {
    let options = Options {
        database_url: calsync_testkit::test_database_url(pool),
        extra: vec![format!("--internal-api-token={API_TOKEN}")],
        ..Options::default()
    };
    let app = spawn_app_with(options).await;
    wait_until(Duration::from_secs(30), "ingest has migrated", || async {
        app.http.get(app.url("/changes")).bearer_auth(API_TOKEN).send().await.unwrap().status() == 200
    })
    .await;
    app
}

/// A change as a trigger would write it (committed by `executor`'s transaction or at once).
async fn record(executor: impl sqlx::PgExecutor<'_>, user: Uuid) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO change_log (user_id, kind, meeting_id, status, cause) \
         VALUES ($1, 'meeting.created', gen_random_uuid(), 'active', 'webhook') RETURNING change_id",
    )
    .bind(user)
    .fetch_one(executor)
    .await
    .unwrap()
}

async fn get(app: &TestApp, query: &str) -> reqwest::Response {
    app.http.get(app.url(&format!("/changes{query}"))).bearer_auth(API_TOKEN).send().await.unwrap()
}

/// One page: its change ids and `next_cursor`.
async fn page(app: &TestApp, query: &str) -> (Vec<Uuid>, String) {
    let response = get(app, query).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let ids = body["changes"].as_array().unwrap().iter().map(|c| c["change_id"].as_str().unwrap().parse().unwrap());
    (ids.collect(), body["next_cursor"].as_str().unwrap().to_owned())
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_change_committed_after_a_later_one_reaches_the_cursor_reader_and_a_naive_id_reader_skips_it(pool: PgPool) {
    let app = feed_app(&pool).await;
    let user = Uuid::new_v4();
    // The first change's transaction draws its sequence number, then takes its time to commit.
    let mut slow = pool.begin().await.unwrap();
    let late = record(&mut *slow, user).await;
    let early = record(&pool, user).await;

    let (first_read, cursor) = page(&app, "").await;
    let mut naive_last = 0;
    let naive_first = calsync_testkit::read_changes_by_id(&pool, &mut naive_last).await;
    slow.commit().await.unwrap();
    let (second_read, _) = page(&app, &format!("?after={cursor}")).await;
    let naive_second = calsync_testkit::read_changes_by_id(&pool, &mut naive_last).await;

    assert_eq!((first_read, second_read), (vec![early], vec![late]), "each change once, the late one after");
    assert_eq!(
        [naive_first, naive_second].concat(),
        vec![early],
        "a reader of `id > last` never sees the change that committed late"
    );
    app.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn pages_follow_each_other_without_gaps_or_repeats_and_a_user_filter_reads_only_that_user(pool: PgPool) {
    let app = feed_app(&pool).await;
    let (ada, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut all = Vec::new();
    for n in 0..25 {
        all.push(record(&pool, if n % 5 == 0 { bob } else { ada }).await);
    }

    let mut read = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let (ids, next) = page(&app, &format!("?limit=10&after={cursor}")).await;
        pages += 1;
        let done = ids.is_empty();
        read.extend(ids);
        cursor = next;
        if done {
            break;
        }
    }
    let (bobs, bob_cursor) = page(&app, &format!("?user_id={bob}")).await;
    let (after_bob, _) = page(&app, &format!("?after={bob_cursor}")).await;

    assert_eq!(read, all, "every change once, in order");
    assert_eq!(pages, 4, "three full pages and an empty one");
    assert_eq!(bobs, all.iter().copied().step_by(5).collect::<Vec<_>>());
    assert!(after_bob.is_empty(), "a short filtered page moves the cursor past everyone's changes it covered");
    let (none_yet, same) = page(&app, &format!("?after={cursor}")).await;
    assert!(none_yet.is_empty());
    assert_eq!(same, cursor, "nothing new: the cursor stays");
    app.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_cursor_older_than_retention_is_409_a_garbled_one_400_and_the_feed_needs_the_bearer(pool: PgPool) {
    let app = feed_app(&pool).await;
    let user = Uuid::new_v4();
    for _ in 0..3 {
        record(&pool, user).await;
    }
    let (_, start) = page(&app, "?limit=1").await;
    let (_, end) = page(&app, "?limit=1000").await;
    let kept = record(&pool, user).await;
    sqlx::query("UPDATE change_log SET occurred_at = now() - interval '8 days' WHERE change_id <> $1")
        .bind(kept)
        .execute(&pool)
        .await
        .unwrap();
    changes::sequence_all(&pool).await.unwrap();
    let pruned = changes::prune(&pool, time::OffsetDateTime::now_utc() - time::Duration::days(7), 100).await.unwrap();

    let expired = get(&app, &format!("?after={start}")).await;
    let expired_status = expired.status();
    let expired: Value = expired.json().await.unwrap();
    let (from_start, _) = page(&app, "").await;
    let (after_end, _) = page(&app, &format!("?after={end}")).await;

    assert_eq!(pruned, 3);
    assert_eq!((expired_status.as_u16(), expired["error"].as_str()), (409, Some("cursor_expired")));
    assert_eq!(from_start, vec![kept], "without a cursor a reader starts at the oldest change kept");
    assert_eq!(after_end, vec![kept], "a cursor at the pruned edge still reads on");
    for garbled in ["abc", "-1", "1.5", "99999"] {
        let response = get(&app, &format!("?after={garbled}")).await;
        assert_eq!(response.status(), 400, "{garbled}");
        assert_eq!(response.json::<Value>().await.unwrap()["error"], "invalid_cursor");
    }
    for bad in ["?limit=0", "?limit=1001", "?limit=ten", "?user_id=nobody"] {
        assert_eq!(get(&app, bad).await.status(), 400, "{bad}");
    }
    let anonymous = app.http.get(app.url("/changes")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = app.http.get(app.url("/changes")).bearer_auth("guess").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    app.stop().await;
}
