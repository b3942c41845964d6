//! The settings groups both services share. Each field is an environment variable (the names in
//! ARCHITECTURE.md are public interface) and also a `--flag`.
//!
//! Each service's own settings (`calsync_ingest::settings`, `calsync_worker::settings`) compose these
//! `clap::Args` groups, so ingest and worker share one definition of, say, `DATABASE_URL`.

use clap::{Args, ValueEnum};
use secrecy::SecretString;
use url::Url;

/// Parses a flag or variable straight into a secret so it never sits in a plain `String`.
pub fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value.to_owned()))
}

/// A secret that is set but blank (`INTERNAL_API_TOKEN=` in an env file) counts as not set:
/// an empty token or key would match an empty credential.
pub fn present(secret: &Option<SecretString>) -> Option<&SecretString> {
    secret.as_ref().filter(|s| !secrecy::ExposeSecret::expose_secret(*s).trim().is_empty())
}

#[derive(Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL URL; the database is created if it does not exist.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/calsync")]
    pub database_url: String,
}

#[derive(Args, Clone, Debug)]
pub struct AmqpArgs {
    /// RabbitMQ URL. Wrapped as a secret because it usually carries a password.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", value_parser = secret, hide_default_value = true)]
    pub amqp_url: SecretString,

    /// Prefix for every exchange and queue name. Empty in production; tests and side-by-side
    /// deployments on one vhost use it to keep their topologies apart.
    #[arg(long, env = "AMQP_TOPOLOGY_PREFIX", default_value = "", hide = true)]
    pub amqp_topology_prefix: String,
}

#[derive(Args, Clone, Debug)]
pub struct CalendlyArgs {
    #[arg(long, env = "CALENDLY_API_BASE_URL", default_value = "https://api.calendly.com")]
    pub calendly_api_base_url: Url,

    #[arg(long, env = "CALENDLY_AUTH_BASE_URL", default_value = "https://auth.calendly.com")]
    pub calendly_auth_base_url: Url,

    #[arg(long, env = "CALENDLY_OAUTH_CLIENT_ID")]
    pub calendly_oauth_client_id: Option<String>,

    #[arg(long, env = "CALENDLY_OAUTH_CLIENT_SECRET", value_parser = secret)]
    pub calendly_oauth_client_secret: Option<SecretString>,
}

#[derive(Args, Clone, Debug)]
pub struct TokenKeyArgs {
    /// Base64 of 32 bytes. Required: without it tokens could not be stored or read.
    #[arg(long, env = "TOKEN_ENCRYPTION_KEY", value_parser = secret)]
    pub token_encryption_key: Option<SecretString>,

    /// Older keys, comma-separated, still accepted for decryption during a rotation.
    #[arg(long, env = "TOKEN_ENCRYPTION_PREVIOUS_KEYS", value_parser = secret, value_delimiter = ',')]
    pub token_encryption_previous_keys: Vec<SecretString>,
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Args, Clone, Debug)]
pub struct TelemetryArgs {
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

/// The groups every service reads, flattened into each service's settings as `shared`.
#[derive(Args, Clone, Debug)]
pub struct SharedArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    pub calendly: CalendlyArgs,
    #[command(flatten)]
    pub token_keys: TokenKeyArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl SharedArgs {
    /// Fail closed on what every service needs: without a token key, tokens could be neither
    /// stored nor read.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if present(&self.token_keys.token_encryption_key).is_none() {
            return Err(ConfigError::Missing("TOKEN_ENCRYPTION_KEY"));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not set; calsync refuses to start without it (see .env.example)")]
    Missing(&'static str),
    #[error("{0} is invalid: {1}")]
    Invalid(&'static str, String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_secret_counts_as_not_set() {
        assert!(present(&Some(SecretString::from("  ".to_owned()))).is_none());
        assert!(present(&Some(SecretString::from("t".to_owned()))).is_some());
    }
}

/// A URL setting that may be set to the empty string in an env file, meaning "unset".
#[derive(Clone, Debug)]
pub struct OptionalUrl(pub Option<Url>);

pub fn optional_url(value: &str) -> Result<OptionalUrl, url::ParseError> {
    if value.trim().is_empty() { Ok(OptionalUrl(None)) } else { Url::parse(value.trim()).map(|u| OptionalUrl(Some(u))) }
}

/// Parked deliveries (both services replay them).
#[derive(Args, Clone, Debug)]
pub struct InboxArgs {
    /// How old an unmatched delivery may be and still be replayed when its Calendly user connects.
    #[arg(long, env = "INBOX_REPLAY_DAYS", default_value_t = 7)]
    pub inbox_replay_days: u32,
}
