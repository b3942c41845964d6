//! Operator subcommands' work (`calsync-worker rotate-token-key`) against real PostgreSQL and the
//! simulator.

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
