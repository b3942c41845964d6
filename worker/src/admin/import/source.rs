//! The existing integration's table, read and nothing else: opened with
//! `default_transaction_read_only`, so even a bug here cannot write to it; checked for the columns
//! the import needs before a single row is read; Calendly rows only, tokens straight into secrets.

use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};

/// The columns an import reads (the seed's `calendar_connections`).
pub const REQUIRED_COLUMNS: [&str; 7] = [
    "user_id",
    "provider",
    "is_active",
    "calendly_user_uri",
    "calendly_organization_uri",
    "access_token",
    "refresh_token",
];

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("--from is not a PostgreSQL URL: {0}")]
    Url(String),
    #[error("--table {0:?} is not a table name (letters, digits and _, optionally schema.table)")]
    TableName(String),
    #[error("cannot connect to the source database {at}: {error}")]
    Connect { at: String, error: sqlx::Error },
    #[error("the source database {at} has no table {table}")]
    NoTable { at: String, table: String },
    #[error("table {table} in {at} lacks the column(s) {}: is it an integration's calendar_connections?", .missing.join(", "))]
    MissingColumns { at: String, table: String, missing: Vec<String> },
    #[error("cannot read {table} in {at}: {error}")]
    Read { at: String, table: String, error: sqlx::Error },
}

/// `[schema.]table`, parsed so it can be quoted into SQL safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    table: String,
}

impl FromStr for TableName {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let identifier = |part: &str| {
            let mut chars = part.chars();
            chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let (schema, table) = match s.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, s),
        };
        if !identifier(table) || schema.is_some_and(|schema| !identifier(schema)) {
            return Err(SourceError::TableName(s.to_owned()));
        }
        Ok(Self { schema: schema.map(str::to_owned), table: table.to_owned() })
    }
}

impl TableName {
    /// Quoted for SQL (only letters, digits and `_` get here).
    fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.table),
            None => format!("\"{}\"", self.table),
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.table),
            None => f.write_str(&self.table),
        }
    }
}

/// One Calendly row of the existing integration, as it stands (nothing in it is trusted yet).
pub struct SourceRow {
    /// As the source spells it; the import checks that it is a UUID.
    pub user_id: String,
    pub calendly_user_uri: Option<String>,
    pub calendly_organization_uri: Option<String>,
    pub access_token: Option<SecretString>,
    pub refresh_token: Option<SecretString>,
}

/// What was read: the rows to import and how many others were ignored.
pub struct SourceRows {
    pub rows: Vec<SourceRow>,
    /// Rows of another provider (Google, say).
    pub other_providers: i64,
    /// Calendly rows the integration no longer uses (`is_active` false or NULL).
    pub inactive: i64,
}

/// An open, read-only source.
pub struct Source {
    pool: PgPool,
    /// Where it is, for messages: host, port and database, never the password.
    at: String,
    table: TableName,
}

impl Source {
    /// Connects read-only and checks `table` has every column the import reads.
    pub async fn open(url: &SecretString, table: TableName) -> Result<Self, SourceError> {
        use secrecy::ExposeSecret;
        let options = PgConnectOptions::from_str(url.expose_secret())
            .map_err(|e| SourceError::Url(e.to_string()))?
            .options([("default_transaction_read_only", "on")])
            .application_name("calsync-worker import-connections");
        let at = format!("{}:{}/{}", options.get_host(), options.get_port(), options.get_database().unwrap_or(""));
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(15))
            .connect_with(options)
            .await
            .map_err(|error| SourceError::Connect { at: at.clone(), error })?;
        let source = Self { pool, at, table };
        source.check_columns().await?;
        Ok(source)
    }

    async fn check_columns(&self) -> Result<(), SourceError> {
        let (at, table) = (self.at.clone(), self.table.to_string());
        let read = |error| SourceError::Read { at: at.clone(), table: table.clone(), error };
        let columns: Option<Vec<String>> = sqlx::query_scalar(
            "SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL ELSE \
                 ARRAY(SELECT attname::text FROM pg_attribute \
                       WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped) END",
        )
        .bind(self.table.quoted())
        .fetch_one(&self.pool)
        .await
        .map_err(read)?;
        let Some(columns) = columns else { return Err(SourceError::NoTable { at, table }) };
        let missing: Vec<String> =
            REQUIRED_COLUMNS.iter().filter(|c| !columns.iter().any(|have| have == *c)).map(|c| c.to_string()).collect();
        if !missing.is_empty() {
            return Err(SourceError::MissingColumns { at, table, missing });
        }
        Ok(())
    }

    /// The Calendly rows in use (`provider = 'calendly'`, `is_active`), oldest user first, in one
    /// read-only transaction; other rows are only counted (their tokens are never read).
    pub async fn read(&self) -> Result<SourceRows, SourceError> {
        let read = |error| SourceError::Read { at: self.at.clone(), table: self.table.to_string(), error };
        let table = self.table.quoted();
        let mut tx = self.pool.begin().await.map_err(read)?;
        // Safe: `table` is a parsed identifier, quoted (see `TableName`).
        let (other_providers, inactive): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*) FILTER (WHERE lower(provider::text) IS DISTINCT FROM 'calendly'), \
                    count(*) FILTER (WHERE lower(provider::text) = 'calendly' AND is_active IS NOT TRUE) \
             FROM {table}"
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(read)?;
        type Row = (String, Option<String>, Option<String>, Option<String>, Option<String>);
        let rows: Vec<Row> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT user_id::text, calendly_user_uri::text, calendly_organization_uri::text, \
                    access_token::text, refresh_token::text \
             FROM {table} WHERE lower(provider::text) = 'calendly' AND is_active IS TRUE AND user_id IS NOT NULL \
             ORDER BY user_id::text"
        )))
        .fetch_all(&mut *tx)
        .await
        .map_err(read)?;
        tx.commit().await.map_err(read)?;
        let secret = |t: Option<String>| t.filter(|t| !t.is_empty()).map(SecretString::from);
        let rows = rows
            .into_iter()
            .map(|(user_id, user_uri, organization_uri, access, refresh)| SourceRow {
                user_id,
                calendly_user_uri: user_uri.filter(|u| !u.is_empty()),
                calendly_organization_uri: organization_uri.filter(|u| !u.is_empty()),
                access_token: secret(access),
                refresh_token: secret(refresh),
            })
            .collect();
        Ok(SourceRows { rows, other_providers, inactive })
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_name_is_an_identifier_or_schema_dot_identifier_and_nothing_else() {
        assert_eq!("calendar_connections".parse::<TableName>().unwrap().quoted(), "\"calendar_connections\"");
        assert_eq!(
            "public.calendar_connections".parse::<TableName>().unwrap().quoted(),
            "\"public\".\"calendar_connections\""
        );
        for bad in ["", "a;drop table x", "x\"y", "a.b.c", "1abc", "a b", ".t", "s."] {
            assert!(bad.parse::<TableName>().is_err(), "{bad:?} accepted");
        }
    }
}
