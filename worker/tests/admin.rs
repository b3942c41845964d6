//! Operator subcommands (`rotate-token-key`, `connections`, `resync`, `dead`, `forget`) against real
//! PostgreSQL, RabbitMQ and the simulator; the listing commands run as the real binary.

mod support;

use calsync_common::config::TokenKeyArgs;
use calsync_common::crypto::{self, TokenCipher};
use calsync_common::db::connections::{ACCESS_TOKEN, REFRESH_TOKEN, binding};
use calsync_worker::admin::rotate_key::reencrypt_all;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use support::*;
use uuid::Uuid;

fn cipher(current: &str, previous: &[&str]) -> TokenCipher {
    TokenCipher::from_settings(&TokenKeyArgs {
        token_encryption_key: Some(SecretString::from(current.to_owned())),
        token_encryption_previous_keys: previous.iter().map(|k| SecretString::from((*k).to_owned())).collect(),
    })
    .unwrap()
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn after_key_rotation_every_connection_decrypts_with_the_new_key_alone(pool: PgPool) {
    let h = Harness::new(pool).await;
    for name in ["Ada", "Bob", "Cy"] {
        h.connect(name).await;
    }
    let new_key = crypto::generate_key();
    let rotating = cipher(&new_key, &[&h.key]);

    let report = reencrypt_all(&h.pool, &rotating).await.unwrap();
    let again = reencrypt_all(&h.pool, &rotating).await.unwrap();

    assert_eq!(report.connections_reencrypted, 3);
    assert_eq!(again.connections_reencrypted, 0, "idempotent");
    let only_new = cipher(&new_key, &[]);
    let rows: Vec<(Uuid, String, String)> =
        sqlx::query_as("SELECT id, access_token, refresh_token FROM calendar_connections")
            .fetch_all(&h.pool)
            .await
            .unwrap();
    let http = calsync_common::http::client_builder().build().unwrap();
    for (id, access, refresh) in rows {
        let token = only_new.decrypt(&access, binding(id, ACCESS_TOKEN)).unwrap();
        only_new.decrypt(&refresh, binding(id, REFRESH_TOKEN)).unwrap();
        let me = http.get(format!("{}/users/me", h.sim.url())).bearer_auth(token.expose_secret()).send().await.unwrap();
        assert_eq!(me.status(), 200, "the rotated token still works at Calendly");
    }
    h.stop().await;
}

/// Runs `calsync-worker <command…>` against the harness's database and topology.
async fn operator(h: &Harness, command: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_calsync-worker"))
        .args(h.worker_args().into_iter().skip(1))
        .args(command)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn connections_lists_every_connection_without_a_token_and_resync_queues_a_sync_job(pool: PgPool) {
    let h = Harness::new(pool).await;
    let (ada, bob) = (h.connect("Ada").await, h.connect("Bob").await);

    let listed = operator(&h, &["connections"]).await;
    let queued = operator(&h, &["resync", &ada.app_user.to_string()]).await;
    let unknown = operator(&h, &["resync", &Uuid::new_v4().to_string()]).await;

    assert!(listed.status.success());
    let text = stdout(&listed);
    for user in [&ada, &bob] {
        let line = text.lines().find(|l| l.contains(&user.uri)).expect("a line per connection");
        assert!(line.starts_with(&user.app_user.to_string()) && line.contains("  active  "), "{line}");
    }
    assert!(text.contains("2 connection(s)"));
    assert!(!text.contains("v1.") && !text.to_lowercase().contains("token"), "never a token: {text}");
    assert!(queued.status.success(), "{}", String::from_utf8_lossy(&queued.stderr));
    assert_eq!(h.topology.depth(&h.topology.topology.sync_queue()).await, 1, "one resync job queued");
    assert!(!unknown.status.success(), "an unknown user is an error");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("has no Calendly connection"));
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn dead_lists_dead_letters_with_their_reason_and_never_takes_one_out_of_the_queue(pool: PgPool) {
    let (h, _ada) = Harness::with_worker_and_user(pool, "Ada").await;
    let poison = h.publish(br#"{"event":"invitee.created","secret":"do-not-print"}"#).await;
    h.wait_for_inbox(std::slice::from_ref(&poison), &["dead"]).await;
    calsync_testkit::wait_until(DEADLINE, "the dead letter", || async {
        h.topology.depth(&h.topology.topology.dead_queue()).await == 1
    })
    .await;

    let listed = operator(&h, &["dead"]).await;
    let again = operator(&h, &["dead"]).await;

    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert!(again.status.success());
    let text = stdout(&listed);
    assert!(text.contains("invitee.created") && text.contains("not a Calendly webhook envelope"), "{text}");
    assert!(text.contains("1 dead webhook(s) recorded; 1 message(s) in calsync.dead"), "{text}");
    assert!(text.contains("attempts=1"), "{text}");
    assert!(!text.contains("do-not-print"), "never a body");
    // Listing twice delivered nothing: under a delivery limit (RabbitMQ 4.0-4.2 default 20, or a
    // policy) every delivery would bring the only copy of this webhook closer to being dropped.
    let letters = h.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert!(!letters[0].delivery.redelivered, "the dead letter was never handed out before");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn forget_erases_an_invitees_personal_data_from_invitees_and_kept_bodies(pool: PgPool) {
    let (h, ada) = Harness::with_worker_and_user(pool, "Ada").await;
    h.book(&ada, 2); // guest0@example.com and guest1@example.com
    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    // A parked delivery (nobody connected its Calendly user) that mentions guest0 in its body.
    let stranger = h.connect("Stranger").await;
    h.book(&stranger, 1);
    let parked = h.captured();
    let mut tx = h.pool.begin().await.unwrap();
    calsync_common::db::connections::mark_disconnected(&mut tx, stranger.connection_id, None).await.unwrap();
    tx.commit().await.unwrap();
    let parked_ids = h.publish_all(&parked).await;
    h.wait_for_inbox(&parked_ids, &["unmatched"]).await;

    let output = operator(&h, &["forget", "GUEST0@example.com"]).await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout(&output).contains("1 invitee row(s)") && stdout(&output).contains("1 kept webhook body(ies)"));
    let remaining: Vec<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT email, name FROM meeting_invitees ORDER BY email NULLS FIRST")
            .fetch_all(&h.pool)
            .await
            .unwrap();
    assert_eq!(remaining[0], (None, None), "guest0's name and email are gone");
    assert_eq!(remaining[1].0.as_deref(), Some("guest1@example.com"), "nobody else's");
    assert_eq!(
        h.count("SELECT count(*) FROM webhook_inbox WHERE body IS NOT NULL AND strpos(convert_from(body, 'UTF8'), 'guest0') > 0").await,
        0
    );
    h.stop().await;
}

/// Books a one-invitee meeting for `host` with `invitee` (name, email) at a phone number they gave.
fn book_called(h: &Harness, host: &User, name: &str, email: &str) -> serde_json::Value {
    h.sim
        .sim
        .book(calendly_sim::Booking {
            user: host.uri.clone(),
            name: Some(format!("Call with {name}")),
            start_time: None,
            duration_minutes: Some(30),
            invitees: vec![calendly_sim::NewInvitee { name: name.into(), email: email.into() }],
            location: Some(serde_json::json!({ "type": "outbound_call", "location": "+1 555 0100" })),
            co_hosts: Vec::new(),
            webhook_lost: false,
        })
        .unwrap()
}

async fn invitee_rows(h: &Harness) -> Vec<(Option<String>, Option<String>, Option<String>, Option<String>)> {
    sqlx::query_as(
        "SELECT email, name, canceled_by, cancel_reason FROM meeting_invitees ORDER BY email NULLS FIRST, created_at",
    )
    .fetch_all(&h.pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn forget_matches_only_the_exact_address_refuses_anything_else_and_a_dry_run_changes_nothing(pool: PgPool) {
    let (h, ada) = Harness::with_worker_and_user(pool, "Ada").await;
    book_called(&h, &ada, "Bo", "bo@example.com");
    book_called(&h, &ada, "Jimbo", "jimbo@example.com");
    let ids = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&ids, &["processed"]).await;
    let before = invitee_rows(&h).await;

    let empty = operator(&h, &["forget", ""]).await;
    let partial = operator(&h, &["forget", "bo@"]).await;
    let dry = operator(&h, &["forget", "--dry-run", "bo@example.com"]).await;

    assert!(!empty.status.success() && !partial.status.success(), "empty and partial addresses are refused");
    assert!(String::from_utf8_lossy(&empty.stderr).contains("is not an email address"));
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    assert!(
        stdout(&dry).contains("dry run: would erase bo@example.com from 1 invitee row(s), 1 meeting(s)"),
        "{}",
        stdout(&dry)
    );
    assert_eq!(invitee_rows(&h).await, before, "refusals and the dry run changed nothing");
    assert_eq!(h.count("SELECT count(*) FROM forgotten_people").await, 0);

    let done = operator(&h, &["forget", "BO@example.com"]).await;

    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let after = invitee_rows(&h).await;
    assert_eq!(after[0].0, None, "Bo is erased");
    assert_eq!(after[1].0.as_deref(), Some("jimbo@example.com"), "jimbo@ contains bo@ but is someone else");
    assert_eq!(after[1].1.as_deref(), Some("Jimbo"));
    let jimbo_location: i64 = h
        .count(
            "SELECT count(*) FROM meetings m JOIN meeting_invitees i ON i.meeting_id = m.id \
             WHERE i.email = 'jimbo@example.com' AND m.location IS NOT NULL",
        )
        .await;
    assert_eq!(jimbo_location, 1, "Jimbo's meeting keeps its location");
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn forget_erases_the_whole_person_and_a_replayed_dead_letter_does_not_bring_them_back(pool: PgPool) {
    let (h, ada) = Harness::with_worker_and_user(pool, "Ada").await;
    // Bo books a call at their phone number and cancels it, saying why.
    let call = book_called(&h, &ada, "Bo", "bo@example.com");
    let first = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&first, &["processed"]).await;
    let bo = uuid_of(call["invitees"][0]["uri"].as_str().unwrap());
    let reason = calendly_sim::Cancellation { reason: Some("Bo is ill".into()), ..Default::default() };
    h.sim.sim.cancel(bo, reason).unwrap();
    let canceled = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&canceled, &["processed"]).await;
    // Bo's next booking dies (Calendly answers 404 once): its body, with Bo in it, waits in calsync.dead.
    book_called(&h, &ada, "Bo", "bo@example.com");
    h.sim.sim.fail_next(calendly_sim::FailNext { endpoint: "get_event".into(), count: 1, status: 404 });
    let dying = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&dying, &["dead"]).await;
    calsync_testkit::wait_until(DEADLINE, "the dead letter", || async {
        h.topology.depth(&h.topology.topology.dead_queue()).await == 1
    })
    .await;

    let output = operator(&h, &["forget", "bo@example.com"]).await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout(&output).contains("1 queued webhook body(ies)"), "{}", stdout(&output));
    assert_eq!(invitee_rows(&h).await, vec![(None, None, None, None)], "name, email, canceled_by and reason");
    let meeting: (Option<serde_json::Value>, Option<String>) =
        sqlx::query_as("SELECT location, cancel_reason FROM meetings").fetch_one(&h.pool).await.unwrap();
    assert_eq!(meeting, (None, None), "the phone they gave and the reason they wrote");
    // The dead letter comes back (as operators do after fixing a cause) and is processed...
    let replayed = operator(&h, &["replay-dead"]).await;
    assert!(replayed.status.success(), "{}", String::from_utf8_lossy(&replayed.stderr));
    calsync_testkit::wait_until(DEADLINE, "the replayed booking", || async {
        h.count("SELECT count(*) FROM meetings").await == 2
            && h.count("SELECT count(*) FROM meeting_invitees").await == 2
    })
    .await;
    // ...without writing Bo back: not their email, name or phone.
    assert_eq!(h.count("SELECT count(*) FROM meeting_invitees WHERE email IS NOT NULL OR name IS NOT NULL").await, 0);
    assert_eq!(h.count("SELECT count(*) FROM meetings WHERE location IS NOT NULL").await, 0);
    let anywhere = h
        .count(
            "SELECT (SELECT count(*) FROM meeting_invitees WHERE strpos(row_to_json(meeting_invitees)::text, 'bo@example') > 0) \
                  + (SELECT count(*) FROM webhook_inbox WHERE strpos(convert_from(coalesce(body, ''), 'UTF8'), 'bo@example') > 0)",
        )
        .await;
    assert_eq!(anywhere, 0);
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn forget_leaves_other_dead_letters_as_they_were_and_never_hands_one_back_to_its_queue(pool: PgPool) {
    let (h, _ada) = Harness::with_worker_and_user(pool, "Ada").await;
    let body = br#"{"event":"invitee.created","payload":{"email":"someone.else@example.com"}}"#;
    let poison = h.publish(body).await;
    h.wait_for_inbox(std::slice::from_ref(&poison), &["dead"]).await;
    calsync_testkit::wait_until(DEADLINE, "the dead letter", || async {
        h.topology.depth(&h.topology.topology.dead_queue()).await == 1
    })
    .await;

    let dry = operator(&h, &["forget", "--dry-run", "bo@example.com"]).await;
    let done = operator(&h, &["forget", "bo@example.com"]).await;

    assert!(dry.status.success() && done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert!(stdout(&dry).contains("queued webhook bodies not looked at"), "{}", stdout(&dry));
    assert!(stdout(&done).contains("0 queued webhook body(ies)"), "{}", stdout(&done));
    let letters = h.dead_letters().await;
    assert_eq!(letters.len(), 1, "still there");
    assert_eq!(letters[0].delivery.data, body.to_vec(), "unchanged");
    assert!(!letters[0].delivery.redelivered, "a fresh copy: no delivery of it was spent");
    h.stop().await;
}

#[tokio::test]
async fn the_dead_letter_queue_has_no_delivery_limit_and_one_declared_by_an_earlier_version_is_kept() {
    use calsync_common::queue::Topology;
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let conn =
        lapin::Connection::connect(&calsync_testkit::amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
    let quorum = || {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
        args
    };
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let redeclare_plain = |topology: Topology| {
        let conn = &conn;
        async move {
            let channel = conn.create_channel().await.unwrap();
            channel.queue_declare(topology.dead_queue().as_str().into(), durable, quorum()).await
        }
    };

    // A new deployment: calsync.dead carries x-delivery-limit (so a plain declaration is refused).
    let fresh = Topology::new(format!("test-dl-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    fresh.declare(&conn).await.unwrap();
    assert!(redeclare_plain(fresh.clone()).await.is_err(), "declared with its unlimited delivery count");

    // An existing deployment, whose calsync.dead predates the argument: calsync still starts.
    let existing = Topology::new(format!("test-dl-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let channel = conn.create_channel().await.unwrap();
    channel.queue_declare(existing.dead_queue().as_str().into(), durable, quorum()).await.unwrap();
    existing.declare(&conn).await.expect("an existing dead-letter queue is kept as it is");
    assert!(redeclare_plain(existing.clone()).await.is_ok(), "left as it was");

    let channel = conn.create_channel().await.unwrap();
    for topology in [fresh, existing] {
        topology.delete(&channel).await.unwrap();
    }
}
