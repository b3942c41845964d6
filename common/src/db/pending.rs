//! `pending_connections`: what an OAuth callback was granted, waiting for the app to confirm it for
//! the user who started the flow. Every read deletes: a pending result is used (or discarded) once.

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::crypto::Binding;

pub const TABLE: &str = "pending_connections";

/// The AES-GCM binding of a token column of the pending row `connect_id_hash`.
pub fn binding(connect_id_hash: &str, column: &'static str) -> Binding {
    Binding { table: TABLE, row: connect_id_hash.to_owned(), column }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Pending {
    pub connect_id_hash: String,
    pub user_id: Uuid,
    pub calendly_user_uri: String,
    pub calendly_organization_uri: String,
    pub calendly_name: Option<String>,
    pub calendly_email: Option<String>,
    /// Ciphertext, bound with [`binding`].
    pub access_token: String,
    pub refresh_token: String,
    pub token_expires_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

impl Pending {
    pub fn is_expired(&self) -> bool {
        self.expires_at <= OffsetDateTime::now_utc()
    }
}

pub async fn insert(pool: &PgPool, p: &Pending) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO pending_connections (connect_id_hash, user_id, calendly_user_uri, calendly_organization_uri, \
             calendly_name, calendly_email, access_token, refresh_token, token_expires_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&p.connect_id_hash)
    .bind(p.user_id)
    .bind(&p.calendly_user_uri)
    .bind(&p.calendly_organization_uri)
    .bind(&p.calendly_name)
    .bind(&p.calendly_email)
    .bind(&p.access_token)
    .bind(&p.refresh_token)
    .bind(p.token_expires_at)
    .bind(p.expires_at)
    .execute(pool)
    .await
    .map(|_| ())
}

/// Takes the pending result out (expired or not: the caller revokes what it does not use). One
/// DELETE both reads and consumes, so two confirms racing for one connect_id cannot both win.
pub async fn take(pool: &PgPool, connect_id_hash: &str) -> sqlx::Result<Option<Pending>> {
    sqlx::query_as("DELETE FROM pending_connections WHERE connect_id_hash = $1 RETURNING *")
        .bind(connect_id_hash)
        .fetch_optional(pool)
        .await
}

/// Takes every expired pending result out, for the sweep that revokes their tokens.
pub async fn take_expired(pool: &PgPool) -> sqlx::Result<Vec<Pending>> {
    sqlx::query_as("DELETE FROM pending_connections WHERE expires_at <= now() RETURNING *").fetch_all(pool).await
}
