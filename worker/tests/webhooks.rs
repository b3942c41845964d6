//! From queued webhook to rows: the right user, whatever the order, duplication or event kind.

mod support;

use calendly_sim::Cancellation;
use sqlx::PgPool;
use support::*;

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn interleaved_deliveries_for_two_users_land_under_their_own_user_and_never_the_other(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let (ada, bob) = (h.connect("Ada").await, h.connect("Bob").await);
    let mut bodies = Vec::new();
    for _ in 0..5 {
        h.book(&ada, 1);
        h.book(&bob, 1);
    }
    bodies.extend(h.captured());

    let ids = h.publish_all(&bodies).await;
    h.wait_for_inbox(&ids, &["processed"]).await;

    let (ada_meetings, bob_meetings) = (h.meetings(ada.app_user).await, h.meetings(bob.app_user).await);
    assert_eq!(ada_meetings.len(), 5);
    assert_eq!(bob_meetings.len(), 5);
    // Every event is fetched with its host's own token, so an event can only be stored under its host.
    for (uri, _) in &ada_meetings {
        assert!(!bob_meetings.iter().any(|(b, _)| b == uri));
    }
    let invitees = h.invitees().await;
    assert_eq!(invitees.len(), 10);
    for (invitee_uri, _, owner) in invitees {
        let event_uri = invitee_uri.split("/invitees/").next().unwrap();
        let expected = if ada_meetings.iter().any(|(m, _)| m == event_uri) { ada.app_user } else { bob.app_user };
        assert_eq!(owner, expected, "invitee {invitee_uri} is under the wrong user");
    }
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_webhook_from_an_unknown_calendly_user_writes_no_meeting_anywhere_and_is_parked_unmatched(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let _ada = h.connect("Ada").await;
    let stranger = h.connect("Stranger").await;
    h.book(&stranger, 1);
    let bodies = h.captured();
    // The stranger's app user disconnects: its account is no longer linked to anyone.
    sqlx::query("UPDATE calendar_connections SET status = 'disconnected', is_active = false, access_token = NULL, refresh_token = NULL WHERE id = $1")
        .bind(stranger.connection_id)
        .execute(&h.pool)
        .await
        .unwrap();

    let ids = h.publish_all(&bodies).await;
    h.wait_for_inbox(&ids, &["unmatched"]).await;

    assert_eq!(h.count("SELECT count(*) FROM meetings").await, 0);
    let body: Option<Vec<u8>> = sqlx::query_scalar("SELECT body FROM webhook_inbox WHERE message_id = $1")
        .bind(&ids[0])
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(body.as_deref(), Some(bodies[0].as_slice()), "the body is kept for a later replay");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_canceled_invitee_cancels_the_meeting_with_reason_and_canceler(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    let booked = h.book(&ada, 1);
    let invitee = uuid_of(booked["invitees"][0]["uri"].as_str().unwrap());
    h.sim
        .sim
        .cancel(
            invitee,
            Cancellation {
                reason: Some("double booked".into()),
                canceled_by: Some("Ada".into()),
                canceler_type: Some("host".into()),
            },
        )
        .unwrap();

    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;

    assert_eq!(h.meetings(ada.app_user).await[0].1, "canceled");
    let (status, reason, canceler_type, canceled_at): (
        String,
        Option<String>,
        Option<String>,
        Option<time::OffsetDateTime>,
    ) = sqlx::query_as("SELECT status, cancel_reason, canceler_type, canceled_at FROM meeting_invitees")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(status, "canceled");
    assert_eq!(reason.as_deref(), Some("double booked"));
    assert_eq!(canceler_type.as_deref(), Some("host"));
    assert!(canceled_at.is_some());
    h.stop().await;
}

async fn reschedule_scenario(pool: PgPool, reverse: bool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    let booked = h.book(&ada, 1);
    let first = h.captured();
    let ids = h.publish_all(&first).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    let old_invitee = booked["invitees"][0]["uri"].as_str().unwrap().to_owned();
    h.sim.sim.reschedule(uuid_of(&old_invitee), None).unwrap();
    let mut pair = h.captured();
    assert_eq!(pair.len(), 2);
    if reverse {
        pair.reverse();
    }

    // One at a time, in the chosen order.
    for body in &pair {
        let id = h.publish(body).await;
        h.wait_for_inbox(&[id], &["processed"]).await;
    }

    let meetings = h.meetings(ada.app_user).await;
    assert_eq!(meetings.len(), 2);
    assert_eq!(meetings[0].1, "canceled", "the old meeting is canceled");
    assert_eq!(meetings[1].1, "active", "the new meeting is active");
    let (rescheduled, new_invitee): (bool, Option<String>) =
        sqlx::query_as("SELECT rescheduled, new_invitee_uri FROM meeting_invitees WHERE calendly_invitee_uri = $1")
            .bind(&old_invitee)
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert!(rescheduled);
    let linked_back: Option<String> =
        sqlx::query_scalar("SELECT old_invitee_uri FROM meeting_invitees WHERE calendly_invitee_uri = $1")
            .bind(new_invitee.as_deref().unwrap())
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(linked_back.as_deref(), Some(old_invitee.as_str()));
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_reschedule_delivered_canceled_first_cancels_the_old_meeting_and_activates_the_new_one(pool: PgPool) {
    reschedule_scenario(pool, false).await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_reschedule_delivered_created_first_ends_in_the_same_state(pool: PgPool) {
    reschedule_scenario(pool, true).await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_cancellation_delivered_before_its_creation_leaves_the_invitee_canceled(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    let booked = h.book(&ada, 1);
    let created = h.captured();
    h.sim.sim.cancel(uuid_of(booked["invitees"][0]["uri"].as_str().unwrap()), Cancellation::default()).unwrap();
    let canceled = h.captured();

    let first = h.publish(&canceled[0]).await;
    h.wait_for_inbox(&[first], &["processed"]).await;
    let second = h.publish(&created[0]).await;
    h.wait_for_inbox(&[second], &["processed"]).await;

    assert_eq!(
        h.meetings(ada.app_user).await,
        vec![(booked["event"]["uri"].as_str().unwrap().to_owned(), "canceled".to_owned())]
    );
    assert_eq!(h.invitees().await[0].1, "canceled", "the older created delivery did not undo the cancellation");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn the_same_delivery_five_times_changes_nothing_after_the_first(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 1);
    let body = h.captured().remove(0);

    for _ in 0..5 {
        h.publish(&body).await;
    }
    let id = calsync_common::queue::message::message_id(&body);
    h.wait_for_inbox(std::slice::from_ref(&id), &["processed"]).await;
    calsync_testkit::wait_until(DEADLINE, "queue drained", || async {
        h.topology.depth(&h.topology.topology.webhooks_queue()).await == 0
    })
    .await;

    assert_eq!(h.count("SELECT count(*) FROM meetings").await, 1);
    assert_eq!(h.count("SELECT count(*) FROM meeting_invitees").await, 1);
    assert_eq!(h.count("SELECT count(*) FROM webhook_inbox").await, 1);
    assert!(h.sim.sim.calls("get_event") <= 5);
    assert_eq!(
        h.changes(&ada).await,
        ["connection.active/-/connect", "meeting.created/-/webhook", "invitee.created/-/webhook"],
        "a duplicate tells the app nothing"
    );
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_group_event_keeps_all_its_invitees_on_one_meeting(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    h.book(&ada, 6);

    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;

    assert_eq!(h.count("SELECT count(*) FROM meetings").await, 1);
    assert_eq!(h.count("SELECT count(DISTINCT meeting_id) FROM meeting_invitees").await, 1);
    assert_eq!(h.count("SELECT count(*) FROM meeting_invitees").await, 6);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn no_show_marks_and_unmarks_the_invitee(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    let booked = h.book(&ada, 1);
    let invitee = uuid_of(booked["invitees"][0]["uri"].as_str().unwrap());
    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    let no_show = || async {
        sqlx::query_scalar::<_, bool>("SELECT no_show FROM meeting_invitees").fetch_one(&h.pool).await.unwrap()
    };

    h.sim.sim.set_no_show(invitee, true).unwrap();
    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    let marked = no_show().await;
    h.sim.sim.set_no_show(invitee, false).unwrap();
    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;

    assert!(marked);
    assert!(!no_show().await);
    let told: Vec<String> = h.changes(&ada).await.into_iter().filter(|c| c.starts_with("invitee.")).collect();
    assert_eq!(
        told,
        ["invitee.created/-/webhook", "invitee.no_show_changed/-/webhook", "invitee.no_show_changed/-/webhook"]
    );
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_unknown_event_is_acknowledged_as_ignored(pool: PgPool) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let ada = h.connect("Ada").await;
    let body = serde_json::json!({ "event": "meeting_recap.created", "created_at": "2025-12-17T01:59:35.000000Z", "created_by": ada.uri, "payload": {"x": 1} });

    let id = h.publish(body.to_string().as_bytes()).await;

    h.wait_for_inbox(&[id], &["ignored"]).await;
    assert_eq!(h.count("SELECT count(*) FROM meetings").await, 0);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn event_families_calsync_does_not_turn_into_meetings_and_tombstones_are_ignored_never_dead(pool: PgPool) {
    let (h, ada) = Harness::with_worker_and_user(pool, "Ada").await;
    let envelope = |event: &str, payload: serde_json::Value| {
        serde_json::to_vec(&serde_json::json!({
            "event": event,
            "created_at": "2026-11-25T10:00:00.000000Z",
            "created_by": ada.uri,
            "payload": payload,
        }))
        .unwrap()
    };
    let tombstone = |kind: &str| serde_json::json!({ "uri": format!("https://api.calendly.com/{kind}/X"), "deleted_at": "2026-11-25T10:00:00.000000Z" });
    let bodies = vec![
        envelope(
            "routing_form_submission.created",
            serde_json::json!({ "uri": "https://api.calendly.com/routing_form_submissions/R", "questions_and_answers": [] }),
        ),
        envelope(
            "event_type.updated",
            serde_json::json!({ "uri": "https://api.calendly.com/event_types/T", "name": "30 min" }),
        ),
        envelope("contact.deleted", tombstone("contacts")),
        envelope("meeting_recap.deleted", tombstone("meeting_recaps")),
        envelope("meeting_recap.created", serde_json::json!({ "uri": "https://api.calendly.com/meeting_recaps/M" })),
    ];

    let ids = h.publish_all(&bodies).await;
    h.wait_for_inbox(&ids, &["ignored"]).await;

    assert!(h.dead_letters().await.is_empty());
    assert_eq!(h.count("SELECT count(*) FROM meetings").await, 0);
    h.stop().await;
}
