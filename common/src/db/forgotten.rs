//! `forgotten_people`: tombstones of people erased by `calsync-worker forget`. The tombstone is the
//! SHA-256 of the lowercased email (never the email), and every invitee write consults it
//! ([`crate::db::meetings::upsert_invitees`]), so nothing written later brings an erased person back.

use sha2::{Digest, Sha256};
use sqlx::PgConnection;

/// What a webhook body's invitee email is replaced by when `forget` rewrites a queued body: the
/// marker keeps the tombstone findable for the write that body eventually causes.
pub const MARKER_PREFIX: &str = "forgotten:";

/// The tombstone of `email`: lowercase hex SHA-256 of its lowercased form (PostgreSQL computes
/// the same with `encode(sha256(convert_to(lower(email), 'UTF8')), 'hex')`).
pub fn email_hash(email: &str) -> String {
    hex::encode(Sha256::digest(email.to_lowercase().as_bytes()))
}

/// The value a rewritten body carries instead of `email`.
pub fn marker(email: &str) -> String {
    format!("{MARKER_PREFIX}{}", email_hash(email))
}

/// Keeps `email`'s tombstone (idempotent).
pub async fn remember(tx: &mut PgConnection, email: &str) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO forgotten_people (email_hash) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(email_hash(email))
        .execute(tx)
        .await
        .map(|_| ())
}
