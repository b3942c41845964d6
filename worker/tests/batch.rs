//! The batched database stage: a batch writes exactly what one transaction per delivery would, a
//! poison delivery in a batch is dead-lettered alone.

mod support;

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use sqlx::PgPool;
use support::*;
use time::OffsetDateTime;

use calendly_sim::{Booking, NewInvitee};
use calsync_common::db::connections::{self, Connection};
use calsync_common::meeting::{Meeting, MeetingInvitee, MeetingStatus};
use calsync_worker::writer::{self, ProcessedDelivery, Write};

/// One delivery's rows, described by small numbers so that random cases collide often: few
/// events, few invitees, few timestamps, repeated message ids.
#[derive(Debug, Clone)]
struct Delivery {
    message: u8,
    invitee: u8,
    event_minute: u8,
    event_canceled: bool,
    invitee_minute: u8,
    invitee_canceled: bool,
    rescheduled: bool,
    old_invitee: Option<u8>,
    new_invitee: Option<u8>,
    no_show: bool,
    name: u8,
}

fn delivery() -> impl Strategy<Value = Delivery> {
    (
        (0u8..8, 0u8..5, 0u8..4, any::<bool>(), 0u8..4, any::<bool>()),
        (any::<bool>(), proptest::option::of(0u8..5), proptest::option::of(0u8..5), any::<bool>(), 0u8..3),
    )
        .prop_map(|(a, b)| Delivery {
            message: a.0,
            invitee: a.1,
            event_minute: a.2,
            event_canceled: a.3,
            invitee_minute: a.4,
            invitee_canceled: a.5,
            rescheduled: b.0,
            old_invitee: b.1,
            new_invitee: b.2,
            no_show: b.3,
            name: b.4,
        })
}

/// A sequence of deliveries in commit order, and how it is cut into batches.
fn case() -> impl Strategy<Value = (Vec<Delivery>, Vec<usize>)> {
    proptest::collection::vec(delivery(), 1..30).prop_flat_map(|deliveries| {
        let n = deliveries.len();
        (Just(deliveries), proptest::collection::vec(1usize..=n, 1..=n))
    })
}

/// `writes` cut into consecutive batches of the sizes in `cuts` (repeated until all are taken).
fn cut_into_batches<'a>(writes: &'a [Write], cuts: &[usize]) -> Vec<&'a [Write]> {
    let mut batches = Vec::new();
    let mut rest = writes;
    for cut in cuts.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (batch, after) = rest.split_at((*cut).min(rest.len()));
        batches.push(batch);
        rest = after;
    }
    batches
}

fn status(canceled: bool) -> MeetingStatus {
    if canceled { MeetingStatus::Canceled } else { MeetingStatus::Active }
}

fn at(minute: u8) -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000) + time::Duration::minutes(i64::from(minute))
}

/// The rows of `d` for `connection`, with `side` keeping the two sides' message ids apart.
fn write(d: &Delivery, connection: &Connection, side: &str) -> Write {
    let event = format!("https://api.calendly.com/scheduled_events/E{}", d.invitee % 3);
    let invitee_uri = |n: u8| format!("https://api.calendly.com/scheduled_events/E{}/invitees/I{n}", n % 3);
    Write {
        connection: connection.clone(),
        // What the app sees changes every other minute: two snapshots a minute apart may differ
        // only in their stamp (a newer copy of the same meeting, which is no change to tell).
        meeting: Meeting {
            calendly_event_uri: event,
            name: Some(format!("Meeting v{}", d.event_minute / 2)),
            status: status(d.event_canceled),
            start_time: at(d.event_minute / 2 + 60),
            end_time: at(d.event_minute / 2 + 90),
            event_type_uri: None,
            location: Some(serde_json::json!({ "type": "zoom", "v": d.event_minute / 2 })),
            canceled_at: d.event_canceled.then(|| at(d.event_minute)),
            cancel_reason: d.event_canceled.then(|| "host canceled".to_owned()),
            source_updated_at: at(d.event_minute),
        },
        invitee: MeetingInvitee {
            calendly_invitee_uri: invitee_uri(d.invitee),
            email: Some(format!("guest{}@example.com", d.invitee)),
            name: Some(format!("Guest {} ({})", d.invitee, d.name)),
            status: status(d.invitee_canceled),
            rescheduled: d.rescheduled,
            old_invitee_uri: d.old_invitee.map(invitee_uri),
            new_invitee_uri: d.new_invitee.map(invitee_uri),
            no_show: d.no_show,
            canceled_at: d.invitee_canceled.then(|| at(d.invitee_minute)),
            cancel_reason: d.invitee_canceled.then(|| format!("reason {}", d.name)),
            canceled_by: None,
            canceler_type: None,
            source_updated_at: at(d.invitee_minute),
        },
        inbox: ProcessedDelivery {
            message_id: format!("{side}{}", d.message),
            event: if d.invitee_canceled { "invitee.canceled" } else { "invitee.created" }.to_owned(),
            created_by: connection.calendly_user_uri.clone().unwrap_or_default(),
            received_at: at(0),
            attempts: 1 + i32::from(d.name),
        },
    }
}

/// Everything one side holds, one JSON text per row (ids and our own timestamps left out).
async fn rows(pool: &PgPool, connection: &Connection, side: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT row_to_json(x)::text FROM ( \
             SELECT calendly_event_uri, name, status, start_time, location::text, canceled_at, cancel_reason, \
                 source_updated_at, NULL AS invitee, NULL AS rescheduled, NULL AS old_invitee, NULL AS new_invitee, \
                 NULL AS no_show \
             FROM meetings WHERE user_id = $1 \
             UNION ALL \
             SELECT m.calendly_event_uri, i.name, i.status, NULL, NULL, i.canceled_at, i.cancel_reason, \
                 i.source_updated_at, i.calendly_invitee_uri, i.rescheduled, i.old_invitee_uri, i.new_invitee_uri, \
                 i.no_show \
             FROM meeting_invitees i JOIN meetings m ON m.id = i.meeting_id WHERE m.user_id = $1 \
             UNION ALL \
             SELECT substr(message_id, length($2) + 1), event, status, NULL, NULL, NULL, attempts::text, NULL, \
                 NULL, NULL, NULL, NULL, NULL \
             FROM webhook_inbox WHERE starts_with(message_id, $2) \
         ) x ORDER BY 1",
    )
    .bind(connection.user_id)
    .bind(side)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_batched_apply_writes_exactly_what_applying_each_delivery_alone_in_commit_order_writes(pool: PgPool) {
    let h = Harness::new(pool).await;
    let one_by_one = connections::find(&h.pool, h.connect("Ada").await.connection_id).await.unwrap().unwrap();
    let batched = connections::find(&h.pool, h.connect("Bob").await.connection_id).await.unwrap().unwrap();
    let mut runner = TestRunner::new(Config::default());
    for _ in 0..48 {
        let (deliveries, cuts) = case().new_tree(&mut runner).unwrap().current();
        sqlx::query("TRUNCATE meetings, meeting_invitees, webhook_inbox").execute(&h.pool).await.unwrap();

        for d in &deliveries {
            writer::apply(&h.pool, &[&write(d, &one_by_one, "a:")]).await.unwrap();
        }
        let writes: Vec<Write> = deliveries.iter().map(|d| write(d, &batched, "b:")).collect();
        for batch in cut_into_batches(&writes, &cuts) {
            writer::apply(&h.pool, &batch.iter().collect::<Vec<_>>()).await.unwrap();
        }

        assert_eq!(
            rows(&h.pool, &batched, "b:").await,
            rows(&h.pool, &one_by_one, "a:").await,
            "deliveries {deliveries:?} cut into batches of {cuts:?}"
        );
    }
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_delivery_postgresql_refuses_is_dead_lettered_alone_and_the_rest_of_its_batch_is_written(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    // Batches of up to 64 that wait 300 ms for company: all the deliveries below share one.
    let addr =
        h.start_worker(&["--worker-batch-size=64", "--worker-batch-max-wait-ms=300", "--worker-max-attempts=1"]).await;
    let ada = h.connect("Ada").await;
    for _ in 0..10 {
        h.book(&ada, 1);
    }
    // A name PostgreSQL cannot store in a text column (a NUL character).
    let poison = h
        .sim
        .sim
        .book(Booking {
            user: ada.uri.clone(),
            name: None,
            start_time: None,
            duration_minutes: None,
            invitees: vec![NewInvitee { name: "Null \u{0} Byte".into(), email: "nul@example.com".into() }],
            location: None,
            co_hosts: Vec::new(),
            webhook_lost: false,
        })
        .unwrap();
    // A slow fetch: every delivery is being processed before the first one hands its rows over,
    // so the batch waits for all of them.
    h.sim.sim.set_faults(calendly_sim::Faults { latency_ms: 200, ..Default::default() });
    let ids = h.publish_all(&h.captured()).await;

    h.wait_for_inbox(&ids, &["processed", "dead"]).await;

    let poisoned_event = poison["event"]["uri"].as_str().unwrap();
    let meetings = h.meetings(ada.app_user).await;
    assert_eq!(meetings.len(), 10);
    assert!(meetings.iter().all(|(uri, _)| uri != poisoned_event), "the poison's transaction wrote nothing");
    assert_eq!(h.count("SELECT count(*) FROM webhook_inbox WHERE status = 'processed'").await, 10);
    assert_eq!(h.count("SELECT count(*) FROM webhook_inbox WHERE status = 'dead'").await, 1);
    assert_eq!(h.count("SELECT count(*) FROM meeting_invitees").await, 10);
    assert_eq!(h.dead_letters().await.len(), 1);
    let http = calsync_common::http::client_builder().build().unwrap();
    let metrics = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("calsync_worker_batch_fallbacks_total ") && !l.ends_with(" 0")),
        "the poison was in a batch with others, which fell back to one transaction each: {}",
        metrics.lines().filter(|l| l.contains("batch")).collect::<Vec<_>>().join("\n")
    );
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_batch_never_writes_a_delivery_for_the_account_its_user_switched_away_from_even_beside_one_resolved_after_the_switch(
    pool: PgPool,
) {
    let h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    let before_switch = connections::find(&h.pool, ada.connection_id).await.unwrap().unwrap();
    // Ada's app user links another Calendly account: same row, same user, another account.
    let other_account = h.sim.sim.create_user(calendly_sim::NewUser::named("Ada's second account")).unwrap();
    let row = h.store_tokens(ada.app_user, &other_account, OffsetDateTime::now_utc() + time::Duration::hours(2)).await;
    assert_eq!(row, ada.connection_id, "the account switch reuses the row");
    let after_switch = connections::find(&h.pool, ada.connection_id).await.unwrap().unwrap();
    let old = Delivery {
        message: 1,
        invitee: 0,
        event_minute: 0,
        event_canceled: false,
        invitee_minute: 0,
        invitee_canceled: false,
        rescheduled: false,
        old_invitee: None,
        new_invitee: None,
        no_show: false,
        name: 0,
    };
    let new = Delivery { message: 2, invitee: 1, ..old.clone() };

    let stale = write(&old, &before_switch, "switch:");
    let fresh = write(&new, &after_switch, "switch:");
    let applied = writer::apply(&h.pool, &[&stale, &fresh]).await.unwrap();

    assert_eq!(applied, vec![writer::Applied::ConnectionChanged, writer::Applied::Written]);
    let meetings = h.meetings(ada.app_user).await;
    assert_eq!(
        meetings.iter().map(|(uri, _)| uri.as_str()).collect::<Vec<_>>(),
        vec![fresh.meeting.calendly_event_uri.as_str()],
        "only the delivery resolved after the switch is written"
    );
    assert_eq!(h.inbox_status("switch:1").await, None, "the stale delivery is not marked processed");
    assert_eq!(h.inbox_status("switch:2").await.as_deref(), Some("processed"));
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_connection_row_held_by_someone_else_delays_only_its_own_deliveries_not_their_batch_mates(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    // Batches that wait 300 ms for company, and a slow fetch: both deliveries share one batch.
    h.start_worker(&["--worker-batch-size=64", "--worker-batch-max-wait-ms=300"]).await;
    let (ada, bob) = (h.connect("Ada").await, h.connect("Bob").await);
    h.book(&ada, 1);
    h.book(&bob, 1);
    h.sim.sim.set_faults(calendly_sim::Faults { latency_ms: 200, ..Default::default() });
    // Someone (an operator's session, a stuck transaction) holds Ada's row.
    let holder = h.hold_connection_row(&ada).await;

    let ids = h.publish_all(&h.captured()).await;

    // Bob's delivery commits while Ada's row is still held.
    h.wait_for_inbox(&ids[1..], &["processed"]).await;
    assert_eq!(h.inbox_status(&ids[0]).await, None, "Ada's waits for her row");
    holder.rollback().await.unwrap();
    h.wait_for_inbox(&ids, &["processed"]).await;
    assert_eq!((h.meetings(ada.app_user).await.len(), h.meetings(bob.app_user).await.len()), (1, 1));
    assert!(h.dead_letters().await.is_empty());
    h.stop().await;
}

/// A row of the model: what the table holds for one meeting or invitee.
#[derive(Debug, Clone, PartialEq)]
struct ModelRow {
    /// What the app can see change (for a meeting: status, time, name, location; for an invitee:
    /// status and no-show).
    shown: (MeetingStatus, String),
    no_show: bool,
    updated: OffsetDateTime,
}

/// The changes applying `deliveries` one after another must record, per row (event URI, or event
/// URI + invitee URI), in order: the triggers' rules written out independently.
fn expected_changes(deliveries: &[Delivery], connection: &Connection) -> BTreeMap<String, Vec<&'static str>> {
    let mut rows: HashMap<String, ModelRow> = HashMap::new();
    let mut changes: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    for d in deliveries {
        let w = write(d, connection, "m:");
        let m = &w.meeting;
        let shown = format!("{:?}{:?}{:?}{:?}", m.name, m.start_time, m.end_time, m.location);
        let meeting = ModelRow { shown: (m.status, shown), no_show: false, updated: m.source_updated_at };
        let key = m.calendly_event_uri.clone();
        match rows.get(&key) {
            None => changes.entry(key.clone()).or_default().push("meeting.created"),
            Some(old) if old.updated <= meeting.updated && old.shown != meeting.shown => {
                let canceled = m.status == MeetingStatus::Canceled && old.shown.0 != MeetingStatus::Canceled;
                changes.entry(key.clone()).or_default().push(if canceled {
                    "meeting.canceled"
                } else {
                    "meeting.updated"
                })
            }
            Some(_) => {}
        }
        if rows.get(&key).is_none_or(|old| old.updated <= meeting.updated) {
            rows.insert(key.clone(), meeting);
        }
        let i = &w.invitee;
        let invitee = ModelRow { shown: (i.status, String::new()), no_show: i.no_show, updated: i.source_updated_at };
        let key = format!("{key} {}", i.calendly_invitee_uri);
        match rows.get(&key) {
            None => changes.entry(key.clone()).or_default().push("invitee.created"),
            Some(old) if old.updated <= invitee.updated => {
                if i.status != old.shown.0 {
                    let canceled = i.status == MeetingStatus::Canceled;
                    changes.entry(key.clone()).or_default().push(if canceled {
                        "invitee.canceled"
                    } else {
                        "invitee.created"
                    });
                }
                if old.no_show != invitee.no_show {
                    changes.entry(key.clone()).or_default().push("invitee.no_show_changed");
                }
            }
            Some(_) => {}
        }
        if rows.get(&key).is_none_or(|old| old.updated <= invitee.updated) {
            rows.insert(key, invitee);
        }
    }
    changes
}

/// The changes the feed recorded for `connection`'s user, per row, in the order recorded.
async fn recorded_changes(pool: &PgPool, connection: &Connection) -> BTreeMap<String, Vec<String>> {
    let recorded: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.calendly_event_uri || coalesce(' ' || i.calendly_invitee_uri, ''), c.kind \
         FROM change_log c LEFT JOIN meeting_invitees i ON i.id = c.invitee_id \
         WHERE c.user_id = $1 AND c.kind NOT LIKE 'connection.%' ORDER BY c.seq",
    )
    .bind(connection.user_id)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut changes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (row, kind) in recorded {
        changes.entry(row).or_default().push(kind);
    }
    changes
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn the_feed_records_exactly_the_row_changes_of_random_deliveries_cut_into_batches(pool: PgPool) {
    let h = Harness::new(pool).await;
    let ada = connections::find(&h.pool, h.connect("Ada").await.connection_id).await.unwrap().unwrap();
    let mut runner = TestRunner::new(Config::default());
    for _ in 0..48 {
        // Duplicates (repeated message ids), fresh copies (same content, same stamp) and older
        // stamps arriving late are all in the mix: few events, invitees and minutes.
        let (deliveries, cuts) = case().new_tree(&mut runner).unwrap().current();
        sqlx::query("TRUNCATE meetings, meeting_invitees, webhook_inbox, change_log").execute(&h.pool).await.unwrap();

        let writes: Vec<Write> = deliveries.iter().map(|d| write(d, &ada, "b:")).collect();
        for batch in cut_into_batches(&writes, &cuts) {
            writer::apply(&h.pool, &batch.iter().collect::<Vec<_>>()).await.unwrap();
        }

        let expected: BTreeMap<String, Vec<String>> = expected_changes(&deliveries, &ada)
            .into_iter()
            .map(|(row, kinds)| (row, kinds.into_iter().map(str::to_owned).collect()))
            .collect();
        assert_eq!(
            recorded_changes(&h.pool, &ada).await,
            expected,
            "deliveries {deliveries:?} cut into batches of {cuts:?}"
        );
    }
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn concurrent_batches_of_random_deliveries_leave_a_feed_whose_last_word_on_every_row_is_the_row(pool: PgPool) {
    let h = Harness::new(pool).await;
    let ada = connections::find(&h.pool, h.connect("Ada").await.connection_id).await.unwrap().unwrap();
    let mut runner = TestRunner::new(Config::default());
    for _ in 0..24 {
        let (deliveries, cuts) = case().new_tree(&mut runner).unwrap().current();
        sqlx::query("TRUNCATE meetings, meeting_invitees, webhook_inbox, change_log").execute(&h.pool).await.unwrap();
        let writes: Vec<Write> = deliveries.iter().map(|d| write(d, &ada, "b:")).collect();
        // Every batch at once: they commit in whatever order PostgreSQL's row locks decide.
        let applies = cut_into_batches(&writes, &cuts).into_iter().map(|batch| {
            let pool = h.pool.clone();
            async move {
                // A batch may deadlock with another on the same rows and fails whole: the worker
                // then writes its deliveries one by one, as here.
                if writer::apply(&pool, &batch.iter().collect::<Vec<_>>()).await.is_err() {
                    for write in batch {
                        writer::apply(&pool, &[write]).await.unwrap();
                    }
                }
            }
        });
        futures_util::future::join_all(applies).await;

        // Replaying the feed row by row ends where the rows are: the last status told is the row's
        // status, every row was told it was created exactly once, and no-show flips alternate.
        let told: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT coalesce(i.id, m.id)::text, c.kind, c.status FROM change_log c \
             JOIN meetings m ON m.id = c.meeting_id LEFT JOIN meeting_invitees i ON i.id = c.invitee_id \
             WHERE c.kind NOT LIKE 'connection.%' ORDER BY c.seq",
        )
        .fetch_all(&h.pool)
        .await
        .unwrap();
        let rows: Vec<(String, String, Option<bool>)> = sqlx::query_as(
            "SELECT id::text, status, NULL::bool FROM meetings UNION ALL SELECT id::text, status, no_show FROM meeting_invitees",
        )
        .fetch_all(&h.pool)
        .await
        .unwrap();
        for (id, status, no_show) in rows {
            let mine: Vec<_> = told.iter().filter(|(row, _, _)| *row == id).collect();
            assert!(mine.first().is_some_and(|(_, kind, _)| kind.ends_with(".created")), "row {id}: {mine:?}");
            let last_status = mine.iter().rev().find(|(_, kind, _)| !kind.ends_with("no_show_changed"));
            assert_eq!(last_status.and_then(|(_, _, s)| s.clone()), Some(status.clone()), "row {id}: {mine:?}");
            let flips: Vec<_> = mine.iter().filter(|(_, kind, _)| kind.ends_with("no_show_changed")).collect();
            assert!(flips.windows(2).all(|w| w[0].2 != w[1].2), "a no-show flip that changed nothing: {mine:?}");
            if let (Some(no_show), Some(last)) = (no_show, flips.last()) {
                assert_eq!(last.2.as_deref(), Some(if no_show { "no_show" } else { "showed" }), "row {id}: {mine:?}");
            }
        }
    }
    h.stop().await;
}
