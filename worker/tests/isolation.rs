//! One user's meetings and invitees never change another user's rows, even when both host the same
//! Calendly event or one Calendly account moves from one app user to another.

mod support;

use calendly_sim::Cancellation;
use calsync_common::db::connections;
use calsync_common::queue::message::{SyncJob, SyncKind, sync_job};
use serde_json::Value;
use sqlx::PgPool;
use support::*;
use uuid::Uuid;

/// The captured bodies, split by the Calendly user whose subscription delivered them.
fn captured_for(h: &Harness, ada: &User) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    h.captured().into_iter().partition(|body| {
        let envelope: Value = serde_json::from_slice(body).unwrap();
        envelope["created_by"] == ada.uri.as_str()
    })
}

/// A worker and two connected users, Ada and Bob.
async fn two_users(pool: PgPool) -> (Harness, User, User) {
    let (h, ada) = Harness::with_worker_and_user(pool, "Ada").await;
    let bob = h.connect("Bob").await;
    (h, ada, bob)
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn two_users_hosting_one_event_each_keep_their_own_meeting_and_invitees_in_either_order(pool: PgPool) {
    let (h, ada, bob) = two_users(pool).await;

    // First event: Ada's copies are processed first, then Bob's, then all of them again.
    h.book_with(&ada, &[&bob], 2);
    let (ada_bodies, bob_bodies) = captured_for(&h, &ada);
    assert_eq!((ada_bodies.len(), bob_bodies.len()), (2, 2), "each host's subscription gets every invitee");
    let mut ids = h.publish_all(&ada_bodies).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    ids.extend(h.publish_all(&bob_bodies).await);
    h.wait_for_inbox(&ids, &["processed"]).await;
    // Second event: Bob's first this time.
    h.book_with(&ada, &[&bob], 1);
    let (ada_second, bob_second) = captured_for(&h, &ada);
    let mut second = h.publish_all(&bob_second).await;
    h.wait_for_inbox(&second, &["processed"]).await;
    second.extend(h.publish_all(&ada_second).await);
    h.wait_for_inbox(&second, &["processed"]).await;
    // Redeliveries of everything change nothing.
    let all: Vec<Vec<u8>> = [ada_bodies, bob_bodies, ada_second, bob_second].concat();
    let again = h.publish_all(&all).await;
    h.wait_for_inbox(&again, &["processed"]).await;
    calsync_testkit::wait_until(DEADLINE, "the redeliveries are settled", || async {
        h.topology.depth(&h.topology.topology.webhooks_queue()).await == 0
    })
    .await;

    assert_eq!(h.meetings(ada.app_user).await.len(), 2);
    assert_eq!(h.meetings(bob.app_user).await.len(), 2);
    let (ada_invitees, bob_invitees) = (h.invitees_of(ada.app_user).await, h.invitees_of(bob.app_user).await);
    assert_eq!(ada_invitees.len(), 3, "Ada keeps all three invitees: {ada_invitees:?}");
    assert_eq!(ada_invitees, bob_invitees, "Bob has his own copy of the same three");
    assert_eq!(h.count("SELECT count(*) FROM meeting_invitees").await, 6);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_cancel_that_reaches_one_hosts_copy_changes_only_that_copy(pool: PgPool) {
    let (h, ada, bob) = two_users(pool).await;
    let booked = h.book_with(&ada, &[&bob], 2);
    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;

    let first = booked["invitees"][0]["uri"].as_str().unwrap().to_owned();
    h.sim.sim.cancel(uuid_of(&first), Cancellation::default()).unwrap();
    let (ada_cancel, _bob_cancel_never_delivered) = captured_for(&h, &ada);
    let ids = h.publish_all(&ada_cancel).await;
    h.wait_for_inbox(&ids, &["processed"]).await;

    let status_of = |rows: &[(String, String)]| rows.iter().find(|(uri, _)| *uri == first).unwrap().1.clone();
    assert_eq!(status_of(&h.invitees_of(ada.app_user).await), "canceled");
    assert_eq!(status_of(&h.invitees_of(bob.app_user).await), "active", "Bob's copy was not touched");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_account_that_moves_to_another_app_user_leaves_the_first_users_meetings_whole(pool: PgPool) {
    let (h, first) = Harness::with_worker_and_user(pool, "Ada").await;
    h.book(&first, 1);
    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    // The first app user disconnects; another app user connects the same Calendly account and its
    // backfill writes the same event and invitee.
    let mut tx = h.pool.begin().await.unwrap();
    connections::mark_disconnected(&mut tx, first.connection_id, None).await.unwrap();
    tx.commit().await.unwrap();
    let second_user = Uuid::new_v4();
    let expires = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
    let second = h.store_tokens(second_user, &first.calendly, expires).await;
    h.publisher.publish(&sync_job(&SyncJob::new(second, SyncKind::Backfill))).await.unwrap();

    calsync_testkit::wait_until(DEADLINE, "the second user's backfill wrote the meeting", || async {
        h.invitees_of(second_user).await.len() == 1
    })
    .await;

    assert_eq!(h.invitees_of(first.app_user).await.len(), 1, "the first user's history keeps its invitee");
    assert_eq!(h.meetings(first.app_user).await.len(), 1);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_body_that_pairs_an_event_with_another_events_invitee_is_dead_and_writes_nothing(pool: PgPool) {
    let (h, ada) = Harness::with_worker_and_user(pool, "Ada").await;
    h.book(&ada, 1);
    let other = h.book(&ada, 1);
    let mut body: Value = serde_json::from_slice(&h.captured()[0]).unwrap();
    // The payload's event is the first booking's; its invitee URI is the second booking's.
    body["payload"]["uri"] = other["invitees"][0]["uri"].clone();
    let forged = serde_json::to_vec(&body).unwrap();

    let ids = h.publish_all(&[forged]).await;
    h.wait_for_inbox(&ids, &["dead"]).await;
    // The inbox row is written before the dead letter is published: wait for the letter itself.
    calsync_testkit::wait_until(DEADLINE, "the dead letter", || async {
        h.topology.depth(&h.topology.topology.dead_queue()).await == 1
    })
    .await;

    assert_eq!(h.count("SELECT count(*) FROM meeting_invitees").await, 0);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn hundreds_of_deliveries_resolved_together_each_get_their_own_senders_connection_and_inbox_status(pool: PgPool) {
    use calsync_common::calendly::webhook::Webhook;
    use calsync_common::db::inbox::{self, InboxRecord, InboxStatus};
    use calsync_worker::resolver::Resolver;

    let h = Harness::new(pool.clone()).await;
    let mut users = Vec::new();
    for name in ["Ada", "Bob", "Cy", "Dee", "Eve"] {
        users.push(h.connect(name).await);
    }
    for user in &users {
        h.book(user, 4);
    }
    // Each user's four deliveries, and a copy of each as if sent by a Calendly user nobody connected.
    let mut bodies = h.captured();
    let strangers: Vec<Vec<u8>> = bodies
        .iter()
        .map(|body| {
            let mut envelope: Value = serde_json::from_slice(body).unwrap();
            envelope["created_by"] = "https://api.calendly.com/users/nobody-we-know".into();
            serde_json::to_vec(&envelope).unwrap()
        })
        .collect();
    bodies.extend(strangers);
    let webhooks: Vec<Webhook> = bodies.iter().map(|b| Webhook::parse(b).unwrap()).collect();
    // Every third delivery was seen before, each with a status of its own.
    let statuses = [InboxStatus::Processed, InboxStatus::Unmatched, InboxStatus::AwaitingReauth];
    let message_id = |i: usize| format!("resolve-{i}");
    for i in (0..webhooks.len()).step_by(3) {
        let record = InboxRecord {
            message_id: &message_id(i),
            event: Some("invitee.created"),
            created_by: Some(webhooks[i].created_by.as_str()),
            received_at: time::OffsetDateTime::now_utc(),
            status: statuses[i / 3 % 3],
            attempts: 1,
            last_error: None,
            body: b"{}",
            traceparent: None,
        };
        inbox::record(&pool, &record).await.unwrap();
    }

    // Ten rounds of all of them at once, so lookups hold many deliveries in mixed order.
    let resolver = Resolver::start(pool.clone());
    let asks = (0..10).flat_map(|_| 0..webhooks.len()).map(|i| {
        let (resolver, webhook, id) = (resolver.clone(), &webhooks[i], message_id(i));
        async move { (i, resolver.resolve(&webhook.created_by, &id).await.unwrap()) }
    });
    let answers = futures_util::future::join_all(asks).await;

    assert_eq!(answers.len(), 10 * 40);
    for (i, answer) in answers {
        let sender = webhooks[i].created_by.as_str();
        let expected_status = (i % 3 == 0).then(|| statuses[i / 3 % 3]);
        match users.iter().find(|u| u.uri == sender) {
            Some(user) => {
                let resolved = answer.unwrap_or_else(|| panic!("delivery {i} from {} found nobody", user.uri));
                assert_eq!(resolved.connection.user_id, user.app_user, "delivery {i} went to another user");
                assert_eq!(resolved.connection.id, user.connection_id);
                assert_eq!(resolved.inbox_status, expected_status, "delivery {i}'s inbox status");
            }
            None => assert!(answer.is_none(), "delivery {i} from a stranger was resolved to {answer:?}"),
        }
    }
    h.stop().await;
}
