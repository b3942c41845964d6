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
async fn dead_lists_dead_letters_with_their_reason_and_leaves_them_in_the_queue(pool: PgPool) {
    let (h, _ada) = Harness::with_worker_and_user(pool, "Ada").await;
    let poison = h.publish(br#"{"event":"invitee.created","secret":"do-not-print"}"#).await;
    h.wait_for_inbox(std::slice::from_ref(&poison), &["dead"]).await;
    calsync_testkit::wait_until(DEADLINE, "the dead letter", || async {
        h.topology.depth(&h.topology.topology.dead_queue()).await == 1
    })
    .await;

    let listed = operator(&h, &["dead"]).await;

    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let text = stdout(&listed);
    assert!(text.contains("invitee.created") && text.contains("not a Calendly webhook envelope"), "{text}");
    assert!(text.contains("1 dead letter(s)"));
    assert!(!text.contains("do-not-print"), "never a body");
    calsync_testkit::wait_until(DEADLINE, "the dead letter back in its queue", || async {
        h.topology.depth(&h.topology.topology.dead_queue()).await == 1
    })
    .await;
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
