//! What an import did, row by row, and its summary: what the operator reads (and keeps). It names
//! app users and Calendly URIs, never a token.

use std::collections::BTreeMap;
use std::fmt;

use calsync_common::db::changes::ReauthReason;
use calsync_common::db::connections::ConnectionStatus;

use super::source::TableName;

/// What happened to one source row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored `active`, subscribed, backfill queued, parked deliveries replayed.
    Imported {
        calendly_user_uri: String,
        stored_uri: StoredUri,
        /// The source's refresh token was spent (its tokens are dead now; calsync holds the new pair).
        refreshed: bool,
        /// What could not be set up (the subscription, the backfill, the replay): recorded on the
        /// connection too, and retried by the worker's periodic checks.
        problems: Option<String>,
        replayed: usize,
    },
    /// Stored `needs_reauth`: the app prompts the user to reconnect.
    NeedsReauth {
        code: ReauthReason,
        reason: String,
    },
    Skipped(Skip),
    /// Not written: Calendly or our database could not answer now. A rerun tries again.
    Failed(String),
    /// Dry run: would ask Calendly whose grant it is, then import it.
    WouldImport {
        notes: Vec<String>,
    },
}

/// What the source said about the row's Calendly user and organization, next to what Calendly said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredUri {
    /// The source named no Calendly user (rows older than the seed's fix).
    Missing,
    Agreed,
    /// The source named another user or organization (each `Some` is what it said): Calendly's
    /// answer replaced them.
    Replaced {
        user: Option<String>,
        organization: Option<String>,
    },
}

/// Why a row was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Its `user_id` is not a UUID (calsync's app users are).
    NotAUuid,
    /// The source has an earlier Calendly row for the same app user.
    DuplicateUser,
    /// An earlier import made this user's connection.
    AlreadyImported,
    /// The app user has a calsync connection of their own (in this status).
    UserHasConnection(Option<ConnectionStatus>),
    /// The Calendly account is connected to another app user in calsync.
    AccountTaken,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAUuid => f.write_str("user_id is not a UUID"),
            Self::DuplicateUser => f.write_str("another row of the source is this user's Calendly connection"),
            Self::AlreadyImported => f.write_str("already imported"),
            Self::UserHasConnection(Some(status)) => {
                write!(f, "the app user already has a calsync connection ({})", status.as_str())
            }
            Self::UserHasConnection(None) => f.write_str("the app user already has a calsync connection"),
            Self::AccountTaken => f.write_str("the Calendly account is connected to another app user in calsync"),
        }
    }
}

/// One row's line of the report.
#[derive(Debug, Clone)]
pub struct RowReport {
    /// As the source spells it.
    pub user_id: String,
    pub outcome: Outcome,
}

/// The whole import.
#[derive(Debug)]
pub struct Report {
    pub table: TableName,
    pub dry_run: bool,
    pub rows: Vec<RowReport>,
    pub other_providers: i64,
    pub inactive: i64,
}

impl Report {
    pub fn count(&self, kind: fn(&Outcome) -> bool) -> usize {
        self.rows.iter().filter(|r| kind(&r.outcome)).count()
    }

    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }
}

impl fmt::Display for RowReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = &self.user_id;
        match &self.outcome {
            Outcome::Imported { calendly_user_uri, stored_uri, refreshed, problems, replayed } => {
                write!(f, "{user}  imported      {calendly_user_uri}")?;
                match stored_uri {
                    StoredUri::Missing => write!(f, " (the source named no Calendly user)")?,
                    StoredUri::Agreed => {}
                    StoredUri::Replaced { user, organization } => {
                        let said: Vec<String> = [("user", user), ("organization", organization)]
                            .into_iter()
                            .filter_map(|(what, uri)| uri.as_ref().map(|uri| format!("{what} {uri}")))
                            .collect();
                        write!(f, " (the source said {}: replaced)", said.join(", "))?
                    }
                }
                if *refreshed {
                    write!(f, "; token refreshed")?;
                }
                if *replayed > 0 {
                    write!(f, "; {replayed} parked delivery(ies) replayed")?;
                }
                if let Some(problems) = problems {
                    write!(f, "; not done yet: {problems}")?;
                }
                Ok(())
            }
            Outcome::NeedsReauth { code, reason } => write!(f, "{user}  needs_reauth  {}: {reason}", code.as_str()),
            Outcome::Skipped(skip) => write!(f, "{user}  skipped       {skip}"),
            Outcome::Failed(reason) => write!(f, "{user}  failed        {reason} (nothing written; run again)"),
            Outcome::WouldImport { notes } if notes.is_empty() => write!(f, "{user}  would import"),
            Outcome::WouldImport { notes } => write!(f, "{user}  would import  ({})", notes.join("; ")),
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for row in &self.rows {
            writeln!(f, "{row}")?;
        }
        let mut reauth: BTreeMap<&str, usize> = BTreeMap::new();
        let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
        for row in &self.rows {
            match &row.outcome {
                Outcome::NeedsReauth { code, .. } => *reauth.entry(code.as_str()).or_default() += 1,
                Outcome::Skipped(skip) => *skipped.entry(skip.to_string()).or_default() += 1,
                _ => {}
            }
        }
        let imported = self.count(|o| matches!(o, Outcome::Imported { .. }));
        let would = self.count(|o| matches!(o, Outcome::WouldImport { .. }));
        let (needs_reauth, skips) = (reauth.values().sum::<usize>(), skipped.values().sum::<usize>());
        let ignored = format!(
            "{} Calendly row(s) in use in {}; {} row(s) of other providers and {} inactive row(s) ignored",
            self.rows.len(),
            self.table,
            self.other_providers,
            self.inactive
        );
        if self.dry_run {
            writeln!(f, "dry run: would import {would}, skip {skips} ({ignored})")?;
        } else {
            writeln!(
                f,
                "imported {imported}, needs_reauth {needs_reauth}, skipped {skips}, failed {} ({ignored})",
                self.failed()
            )?;
        }
        let list = |counts: Vec<(String, usize)>| {
            counts.into_iter().map(|(why, n)| format!("{why}: {n}")).collect::<Vec<_>>().join(", ")
        };
        if !reauth.is_empty() {
            writeln!(f, "  needs_reauth: {}", list(reauth.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))?;
        }
        if !skipped.is_empty() {
            writeln!(f, "  skipped: {}", list(skipped.into_iter().collect()))?;
        }
        if self.dry_run {
            write!(f, "dry run: nothing was written, no token was refreshed and Calendly was not called")?;
        }
        Ok(())
    }
}
