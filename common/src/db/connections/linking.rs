//! Who a row belongs to: storing a confirmed connect, the share-lock every write takes to check
//! the row still belongs to the same user and Calendly account, and unlinking on disconnect.

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{ACCESS_TOKEN, Connection, ConnectionStatus, PROVIDER, REFRESH_TOKEN, binding};
use crate::crypto::TokenCipher;
use crate::db::changes::{self, Cause};

/// Inside a write transaction: true when `connection` still belongs to the same user and Calendly
/// account and is active. The share lock holds off a concurrent disconnect or reconnect until the
/// transaction ends, so rows are never written for an account that changed hands meanwhile.
pub async fn lock_if_linked(tx: &mut PgConnection, connection: &Connection) -> sqlx::Result<bool> {
    Ok(lock_linked(tx, &[connection]).await?.first().copied().unwrap_or(false))
}

/// [`lock_if_linked`] for a transaction that will also update the connection row (the sync pass
/// counting what it corrected). It takes the row's update lock up front: upgrading a share lock
/// later deadlocks against a webhook batch that holds its own share lock on the row and waits for
/// a meeting this transaction wrote. Taken first, the batch waits at the row instead.
pub async fn lock_if_linked_to_update(tx: &mut PgConnection, connection: &Connection) -> sqlx::Result<bool> {
    Ok(lock_linked_as(tx, &[connection], RowLock::NoKeyUpdate).await?.first().copied().unwrap_or(false))
}

/// [`lock_if_linked`] for many connections in one statement: for each of `connections`, in order,
/// whether *its own* `(id, user_id, calendly_user_uri)` is still the active row. Answered per
/// entry, not per row id: one batch may hold a delivery resolved before an account switch and one
/// resolved after it (same row id, another Calendly account), and only the second may be written.
pub async fn lock_linked(tx: &mut PgConnection, connections: &[&Connection]) -> sqlx::Result<Vec<bool>> {
    lock_linked_as(tx, connections, RowLock::Share).await
}

/// The row lock a write transaction takes on the connections it checks.
#[derive(Clone, Copy)]
enum RowLock {
    /// The transaction only reads the row: writers of other meetings of the same user go on.
    Share,
    /// The transaction updates the row later (no key column changes).
    NoKeyUpdate,
}

async fn lock_linked_as(tx: &mut PgConnection, connections: &[&Connection], lock: RowLock) -> sqlx::Result<Vec<bool>> {
    // One statement text per lock mode, written once.
    macro_rules! linked_rows_locked {
        ($lock:literal) => {
            concat!(
                "SELECT k.n FROM calendar_connections c \
                 JOIN UNNEST($1::uuid[], $2::uuid[], $3::text[]) WITH ORDINALITY AS k(id, user_id, uri, n) \
                   ON c.id = k.id AND c.user_id = k.user_id AND c.calendly_user_uri = k.uri \
                 WHERE c.status = $4 ORDER BY c.id ",
                $lock
            )
        };
    }
    let sql = match lock {
        RowLock::Share => linked_rows_locked!("FOR SHARE OF c"),
        RowLock::NoKeyUpdate => linked_rows_locked!("FOR NO KEY UPDATE OF c"),
    };
    let linked: Vec<i64> = sqlx::query_scalar(sql)
        .bind(connections.iter().map(|c| c.id).collect::<Vec<_>>())
        .bind(connections.iter().map(|c| c.user_id).collect::<Vec<_>>())
        .bind(connections.iter().map(|c| c.calendly_user_uri.as_deref()).collect::<Vec<_>>())
        .bind(ConnectionStatus::Active)
        .fetch_all(tx)
        .await?;
    let mut answer = vec![false; connections.len()];
    for n in linked {
        // WITH ORDINALITY counts from 1.
        if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| answer.get_mut(i)) {
            *slot = true;
        }
    }
    Ok(answer)
}

/// True when `calendly_user_uri` is linked (`is_active`) to an app user other than `user_id`.
pub async fn is_linked_to_another_user(pool: &PgPool, calendly_user_uri: &str, user_id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM calendar_connections \
         WHERE provider = $1 AND calendly_user_uri = $2 AND is_active AND user_id <> $3)",
    )
    .bind(PROVIDER)
    .bind(calendly_user_uri)
    .bind(user_id)
    .fetch_one(pool)
    .await
}

/// Wipes the tokens and unlinks the row (`disconnected`, `is_active = false`), recording what went
/// wrong at Calendly on the way, if anything.
pub async fn mark_disconnected(tx: &mut PgConnection, id: Uuid, problems: Option<&str>) -> sqlx::Result<()> {
    changes::tag(&mut *tx, Cause::Disconnect).await?;
    sqlx::query(
        "UPDATE calendar_connections SET access_token = NULL, refresh_token = NULL, token_expires_at = NULL, \
         status = $3, is_active = false, webhook_subscription_uri = NULL, subscription_state = NULL, \
         subscription_failing_since = NULL, last_error = $2, \
         refresh_lease_owner = NULL, refresh_lease_until = NULL, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(problems)
    .bind(ConnectionStatus::Disconnected)
    .execute(tx)
    .await
    .map(|_| ())
}

/// Records what a disconnect could not clean up at Calendly, after the row was unlinked. Only while
/// the row is still that disconnect's result: a reconnect since then owns `last_error`.
pub async fn record_disconnect_problems(pool: &PgPool, id: Uuid, problems: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE calendar_connections SET last_error = $2, updated_at = now() \
         WHERE id = $1 AND status = $3 AND access_token IS NULL",
    )
    .bind(id)
    .bind(problems)
    .bind(ConnectionStatus::Disconnected)
    .execute(pool)
    .await
    .map(|_| ())
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The Calendly account is actively connected to a different app user.
    #[error("this Calendly account is already connected to another user")]
    AccountTaken,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// What a successful OAuth connection stores.
pub struct Connected<'a> {
    pub user_id: Uuid,
    pub calendly_user_uri: &'a str,
    pub calendly_organization_uri: &'a str,
    pub access_token: &'a str,
    pub refresh_token: &'a str,
    pub expires_at: OffsetDateTime,
}

/// Stores (or replaces in place, on reconnect) `user_id`'s connection with fresh tokens, status
/// `active`. Fails with [`StoreError::AccountTaken`] when another user holds that Calendly account.
pub async fn store_connected(pool: &PgPool, cipher: &TokenCipher, c: &Connected<'_>) -> Result<Connection, StoreError> {
    let mut tx = changes::begin(pool, Cause::Connect).await?;
    // Tokens are bound to the row id, so the id must be known before encrypting: lock the user's
    // existing row (if any) so a concurrent connect of the same user waits for us.
    let existing: Option<(Uuid,)> =
        sqlx::query_as("SELECT id FROM calendar_connections WHERE provider = $1 AND user_id = $2 FOR UPDATE")
            .bind(PROVIDER)
            .bind(c.user_id)
            .fetch_optional(&mut *tx)
            .await?;
    let id = existing.map_or_else(Uuid::new_v4, |(id,)| id);
    let upsert = concat!(
        "INSERT INTO calendar_connections (id, user_id, provider, calendly_user_uri, calendly_organization_uri, \
             access_token, refresh_token, token_expires_at, is_active, status, last_error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, true, $9, NULL) \
         ON CONFLICT (provider, user_id) DO UPDATE SET calendly_user_uri = EXCLUDED.calendly_user_uri, \
             calendly_organization_uri = EXCLUDED.calendly_organization_uri, access_token = EXCLUDED.access_token, \
             refresh_token = EXCLUDED.refresh_token, token_expires_at = EXCLUDED.token_expires_at, \
             is_active = true, status = EXCLUDED.status, last_error = NULL, updated_at = now() \
         RETURNING ",
        connection_columns!()
    );
    let connection = insert_connected(&mut tx, cipher, id, c, upsert).await?.ok_or(sqlx::Error::RowNotFound)?;
    tx.commit().await?;
    Ok(connection)
}

/// Runs `sql` — an insert of `c` as row `id`, its parameters in the order bound here, `RETURNING`
/// the connection — with the tokens sealed to that row. `None` when `sql`'s conflict rule wrote
/// nothing; [`StoreError::AccountTaken`] when the Calendly account is another app user's.
pub(super) async fn insert_connected(
    tx: &mut PgConnection,
    cipher: &TokenCipher,
    id: Uuid,
    c: &Connected<'_>,
    sql: &'static str,
) -> Result<Option<Connection>, StoreError> {
    let result = sqlx::query_as(sql)
        .bind(id)
        .bind(c.user_id)
        .bind(PROVIDER)
        .bind(c.calendly_user_uri)
        .bind(c.calendly_organization_uri)
        .bind(cipher.encrypt(c.access_token, binding(id, ACCESS_TOKEN)))
        .bind(cipher.encrypt(c.refresh_token, binding(id, REFRESH_TOKEN)))
        .bind(c.expires_at)
        .bind(ConnectionStatus::Active)
        .fetch_optional(tx)
        .await;
    match result {
        Ok(connection) => Ok(connection),
        // calendar_connections_active_calendly_user_key: one Calendly account, one app user.
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("calendar_connections_active_calendly_user_key") => {
            Err(StoreError::AccountTaken)
        }
        Err(e) => Err(e.into()),
    }
}
