//! `calsync-worker import-connections`: moving the users of an existing Calendly integration (a
//! `calendar_connections` table with plaintext tokens, like the one calsync grew out of) into
//! calsync without asking them to reconnect (ARCHITECTURE.md, "Moving in from an existing Calendly
//! integration").
//!
//! - [`source`]: the source table, read only;
//! - [`verify`]: asking Calendly whose grant each row holds (one refresh at most);
//! - [`report`]: what happened, row by row, for the operator.
//!
//! Per row: a user calsync already has a connection for is skipped before Calendly is asked
//! anything (so a rerun spends nothing on rows it imported); otherwise Calendly's `/users/me`
//! decides who the grant belongs to — the source's URIs are only compared with it — and the row
//! becomes an `active` connection with the steps of a confirmed connect, or `needs_reauth` when
//! Calendly would not confirm the grant. Nothing calsync holds is ever overwritten.

pub mod report;
pub mod source;
pub mod verify;

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::StreamExt;
use sqlx::PgPool;
use url::Url;
use uuid::Uuid;

use calsync_common::activation::Activation;
use calsync_common::config::ConfigError;
use calsync_common::crypto::TokenCipher;
use calsync_common::db::connections::{self, Connected, Imported};
use calsync_common::queue::Broker;
use calsync_common::replay;

use crate::settings::WorkerSettings;
use report::{Outcome, Report, RowReport, Skip, StoredUri};
use source::{Source, SourceRow, TableName};
use verify::{Verdict, Verified, Verifier};

/// What an import writes with (a real run only: a dry run has none).
pub struct Target {
    pub cipher: Arc<TokenCipher>,
    pub verifier: Verifier,
    pub broker: Broker,
    /// Where each imported user's subscription delivers: ingest's public webhook URL.
    pub callback_url: Url,
    /// `INBOX_REPLAY_DAYS`: how old an `unmatched` delivery may be and still be replayed.
    pub replay_days: u32,
    /// Rows verified and stored at once.
    pub concurrency: usize,
    /// SIGTERM / Ctrl-C: rows not started yet are left for a rerun; rows under way finish (one may
    /// hold a refreshed pair that exists nowhere else until it is stored).
    pub stop: tokio_util::sync::CancellationToken,
}

/// Where a real import points subscriptions, and that it can refresh the source's tokens at all:
/// both settings a run cannot do without.
pub fn callback_url(settings: &WorkerSettings) -> Result<Url, ConfigError> {
    let calendly = &settings.shared.calendly;
    if calendly.calendly_oauth_client_id.is_none() || calendly.calendly_oauth_client_secret.is_none() {
        return Err(ConfigError::Invalid(
            "CALENDLY_OAUTH_CLIENT_ID",
            "and CALENDLY_OAUTH_CLIENT_SECRET must be those of the Calendly OAuth app that issued the tokens".into(),
        ));
    }
    settings.callback_url().cloned().ok_or_else(|| {
        ConfigError::Invalid(
            "CALENDLY_WEBHOOK_CALLBACK_URL",
            "must be set to ingest's public webhook URL: the import points every user's subscription at it".into(),
        )
    })
}

/// Imports the Calendly rows of `source`'s table into `pool`'s calsync, or with no `target`
/// (a dry run) reports what it would do, writing nothing and calling nobody.
pub async fn import(
    pool: &PgPool,
    source: &Source,
    table: TableName,
    target: Option<&Target>,
) -> anyhow::Result<Report> {
    let read = source.read().await?;
    let ids: Vec<Uuid> = read.rows.iter().filter_map(|r| r.user_id.parse().ok()).collect();
    let existing = connections::existing_for(pool, &ids).await?;
    let mut seen = HashSet::new();
    // Decided from the two databases alone: the rows Calendly must not be asked about (`Err`), and
    // the app user of each row it must be (`Ok`).
    let decided: Vec<Result<Uuid, Outcome>> = read
        .rows
        .iter()
        .map(|row| {
            let Ok(user) = row.user_id.parse::<Uuid>() else { return Err(Outcome::Skipped(Skip::NotAUuid)) };
            if !seen.insert(user) {
                return Err(Outcome::Skipped(Skip::DuplicateUser));
            }
            match existing.get(&user) {
                Some(had) if had.imported => Err(Outcome::Skipped(Skip::AlreadyImported)),
                Some(had) => Err(Outcome::Skipped(Skip::UserHasConnection(Some(had.status)))),
                None => Ok(user),
            }
        })
        .collect();

    let rows: Vec<RowReport> = match target {
        None => {
            let mut rows = Vec::with_capacity(read.rows.len());
            for (row, decided) in read.rows.iter().zip(decided) {
                let outcome = match decided {
                    Err(outcome) => outcome,
                    Ok(user) => Outcome::WouldImport { notes: dry_run_notes(pool, row, user).await? },
                };
                rows.push(RowReport { user_id: row.user_id.clone(), outcome });
            }
            rows
        }
        Some(target) => {
            let work = read.rows.iter().zip(decided).enumerate().map(|(n, (row, decided))| async move {
                let outcome = match decided {
                    Err(outcome) => outcome,
                    Ok(_) if target.stop.is_cancelled() => Outcome::Failed("interrupted before it started".into()),
                    Ok(user) => import_row(pool, target, row, user).await,
                };
                (n, RowReport { user_id: row.user_id.clone(), outcome })
            });
            // `concurrency` rows at a time: 10,000 rows never stampede Calendly.
            let mut done: Vec<(usize, RowReport)> =
                futures_util::stream::iter(work).buffer_unordered(target.concurrency.max(1)).collect().await;
            done.sort_unstable_by_key(|(n, _)| *n);
            done.into_iter().map(|(_, row)| row).collect()
        }
    };
    Ok(Report {
        table,
        dry_run: target.is_none(),
        rows,
        other_providers: read.other_providers,
        inactive: read.inactive,
    })
}

/// What a dry run can say about a row without asking Calendly.
async fn dry_run_notes(pool: &PgPool, row: &SourceRow, user: Uuid) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    match &row.calendly_user_uri {
        None => notes.push("no Calendly user in the source: Calendly will say whose it is".to_owned()),
        Some(uri) => {
            if connections::is_linked_to_another_user(pool, uri, user).await? {
                notes.push(format!(
                    "the source's {uri} is connected to another app user here: skipped if Calendly confirms it"
                ));
            }
        }
    }
    if row.access_token.is_none() && row.refresh_token.is_none() {
        notes.push("no token: would become needs_reauth".to_owned());
    }
    Ok(notes)
}

/// Verifies one row with Calendly and stores what it is.
async fn import_row(pool: &PgPool, target: &Target, row: &SourceRow, user: Uuid) -> Outcome {
    let result = match target.verifier.verify(row).await {
        Verdict::Failed(reason) => return Outcome::Failed(reason),
        Verdict::Unverifiable { code, reason } => {
            match connections::store_unverified(pool, user, code, &reason).await {
                Ok(true) => Ok(Outcome::NeedsReauth { code, reason }),
                Ok(false) => Ok(Outcome::Skipped(Skip::UserHasConnection(None))),
                Err(error) => Err(error),
            }
        }
        Verdict::Verified(verified) => store_verified(pool, target, row, user, verified).await,
    };
    result.unwrap_or_else(|error| Outcome::Failed(format!("the database: {error}")))
}

/// Stores a verified row as an `active` connection and starts syncing it, as a confirmed connect
/// does; a user or account calsync already has is left alone.
async fn store_verified(
    pool: &PgPool,
    target: &Target,
    row: &SourceRow,
    user: Uuid,
    v: Verified,
) -> sqlx::Result<Outcome> {
    let connected = Connected {
        user_id: user,
        calendly_user_uri: &v.me.uri,
        calendly_organization_uri: &v.me.current_organization,
        access_token: secrecy::ExposeSecret::expose_secret(&v.access),
        refresh_token: secrecy::ExposeSecret::expose_secret(&v.refresh),
        expires_at: v.expires_at,
    };
    let skipped = match connections::store_imported(pool, &target.cipher, &connected).await {
        Ok(Imported::Stored(connection)) => return Ok(start_syncing(pool, target, row, &connection, v).await),
        Ok(Imported::UserHasConnection) => Ok(Skip::UserHasConnection(None)),
        Ok(Imported::AccountTaken) => Ok(Skip::AccountTaken),
        Err(error) => Err(error),
    };
    if v.refreshed {
        // The pair exists only here (the source's refresh token is spent): not kept, so it must
        // not stay live at Calendly with nobody holding it.
        target.verifier.revoke_quietly(&v.access, &v.refresh).await;
    }
    skipped.map(Outcome::Skipped)
}

/// Subscription, backfill and replay of the account's parked deliveries: what follows a confirmed
/// connect ([`Activation`]), inline here (an operator command has no caller waiting on it).
async fn start_syncing(
    pool: &PgPool,
    target: &Target,
    row: &SourceRow,
    connection: &connections::Connection,
    v: Verified,
) -> Outcome {
    let activation = Activation {
        pool,
        calendly: &target.verifier.calendly,
        broker: &target.broker,
        callback_url: Some(&target.callback_url),
    };
    let mut problems = Vec::new();
    match activation.subscribe_and_backfill(connection, &v.access).await {
        Ok(None) => {}
        Ok(Some(problem)) => problems.push(problem),
        Err(error) => problems.push(format!("subscription and backfill not recorded: {error}")),
    }
    let replayed = match replay::replay_parked(pool, &target.broker, &v.me.uri, target.replay_days).await {
        Ok(n) => n,
        Err(error) => {
            problems.push(format!("{error} (the worker's periodic check replays them)"));
            0
        }
    };
    let differs = |stored: &Option<String>, told: &str| stored.as_ref().filter(|s| *s != told).cloned();
    let stored_uri = match (&row.calendly_user_uri, &row.calendly_organization_uri) {
        (None, _) => StoredUri::Missing,
        (user, organization) => match (differs(user, &v.me.uri), differs(organization, &v.me.current_organization)) {
            (None, None) => StoredUri::Agreed,
            (user, organization) => StoredUri::Replaced { user, organization },
        },
    };
    Outcome::Imported {
        calendly_user_uri: v.me.uri,
        stored_uri,
        refreshed: v.refreshed,
        problems: (!problems.is_empty()).then(|| problems.join("; ")),
        replayed,
    }
}
