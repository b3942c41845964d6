//! Settings: one place for every address, secret and tunable. Each field is an environment variable
//! (the names in ARCHITECTURE.md are public interface) and also a `--flag`.
//!
//! The per-service structs compose small `clap::Args` groups so ingest and worker share one
//! definition of, say, `DATABASE_URL`.

use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use secrecy::SecretString;
use url::Url;

/// Parses a flag or variable straight into a secret so it never sits in a plain `String`.
fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
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

#[derive(Args, Clone, Debug)]
pub struct InboxArgs {
    /// How old an unmatched delivery may be and still be replayed when its Calendly user connects.
    #[arg(long, env = "INBOX_REPLAY_DAYS", default_value_t = 7)]
    pub inbox_replay_days: u32,
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

/// Settings of `calsync-ingest`.
#[derive(Parser, Clone, Debug)]
#[command(name = "calsync-ingest", version, about = "Verifies Calendly webhooks and queues them durably")]
pub struct IngestSettings {
    #[arg(long, env = "INGEST_ADDR", default_value = "0.0.0.0:8080")]
    pub ingest_addr: String,

    /// Every key verifies (rotation). Required: ingest refuses to start without one.
    #[arg(long, env = "CALENDLY_WEBHOOK_SIGNING_KEYS", value_parser = secret, value_delimiter = ',')]
    pub calendly_webhook_signing_keys: Vec<SecretString>,

    /// How old a signature timestamp may be, in seconds.
    #[arg(long, env = "CALENDLY_WEBHOOK_TOLERANCE_SECS", default_value_t = 180)]
    pub calendly_webhook_tolerance_secs: u64,

    /// Where Calendly should deliver webhooks; unset (or empty) = do not create subscriptions.
    #[arg(long, env = "CALENDLY_WEBHOOK_CALLBACK_URL", value_parser = optional_url)]
    pub calendly_webhook_callback_url: Option<OptionalUrl>,

    #[arg(long, env = "CALENDLY_OAUTH_REDIRECT_URI", default_value = "http://127.0.0.1:8080/oauth/calendly/callback")]
    pub calendly_oauth_redirect_uri: Url,

    /// Bearer token of the connection API; the API answers 503 until it is set.
    #[arg(long, env = "INTERNAL_API_TOKEN", value_parser = secret)]
    pub internal_api_token: Option<SecretString>,

    /// Where the OAuth callback redirects on success; unset (or empty) = a small HTML result page.
    #[arg(long, env = "CONNECT_RETURN_URL", value_parser = optional_url)]
    pub connect_return_url: Option<OptionalUrl>,

    /// How long a webhook request waits for the broker's confirm before answering 503.
    #[arg(long, env = "INGEST_PUBLISH_TIMEOUT_MS", default_value_t = 5000, hide = true)]
    pub ingest_publish_timeout_ms: u64,

    /// Confirm-mode channels shared by all requests.
    #[arg(long, env = "INGEST_PUBLISH_CHANNELS", default_value_t = 4, hide = true)]
    pub ingest_publish_channels: usize,

    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    pub calendly: CalendlyArgs,
    #[command(flatten)]
    pub token_keys: TokenKeyArgs,
    #[command(flatten)]
    pub inbox: InboxArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// A URL setting that may be set to the empty string in an env file, meaning "unset".
#[derive(Clone, Debug)]
pub struct OptionalUrl(pub Option<Url>);

fn optional_url(value: &str) -> Result<OptionalUrl, url::ParseError> {
    if value.trim().is_empty() { Ok(OptionalUrl(None)) } else { Url::parse(value.trim()).map(|u| OptionalUrl(Some(u))) }
}

impl IngestSettings {
    pub fn callback_url(&self) -> Option<&Url> {
        self.calendly_webhook_callback_url.as_ref().and_then(|u| u.0.as_ref())
    }

    pub fn return_url(&self) -> Option<&Url> {
        self.connect_return_url.as_ref().and_then(|u| u.0.as_ref())
    }

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.ingest_publish_timeout_ms)
    }

    /// Fail closed: the settings without which ingest must not run, named by their variable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use secrecy::ExposeSecret;
        let keys = &self.calendly_webhook_signing_keys;
        if keys.iter().all(|k| k.expose_secret().trim().is_empty()) {
            return Err(ConfigError::Missing("CALENDLY_WEBHOOK_SIGNING_KEYS"));
        }
        if keys.iter().any(|k| k.expose_secret().trim().is_empty()) {
            // An empty HMAC key is one anybody can sign with.
            return Err(ConfigError::Invalid("CALENDLY_WEBHOOK_SIGNING_KEYS", "contains an empty key".into()));
        }
        if present(&self.token_keys.token_encryption_key).is_none() {
            return Err(ConfigError::Missing("TOKEN_ENCRYPTION_KEY"));
        }
        if self.ingest_publish_channels == 0 {
            return Err(ConfigError::Invalid("INGEST_PUBLISH_CHANNELS", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Settings of `calsync-worker`.
#[derive(Args, Clone, Debug)]
pub struct WorkerSettings {
    /// Deliveries processed at once (also the AMQP prefetch).
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 32)]
    pub worker_concurrency: u16,

    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[arg(long, env = "WORKER_ADDR", default_value = "0.0.0.0:9090")]
    pub worker_addr: String,

    /// Failed attempts after which a message goes to `calsync.dead`.
    #[arg(long, env = "WORKER_MAX_ATTEMPTS", default_value_t = 8)]
    pub worker_max_attempts: u32,

    /// Backfill starts this many days back (and has no upper bound).
    #[arg(long, env = "SYNC_LOOKBACK_DAYS", default_value_t = 30)]
    pub sync_lookback_days: u32,

    /// How long in-flight deliveries may take to finish after SIGTERM before they are requeued.
    #[arg(long, env = "WORKER_SHUTDOWN_GRACE_SECS", default_value_t = 20, hide = true)]
    pub worker_shutdown_grace_secs: u64,

    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    pub calendly: CalendlyArgs,
    #[command(flatten)]
    pub token_keys: TokenKeyArgs,
    #[command(flatten)]
    pub inbox: InboxArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl WorkerSettings {
    /// PostgreSQL connections per worker process. A delivery holds one only for its short database
    /// steps (never across the Calendly call), so a quarter of the concurrency is plenty; the cap
    /// keeps a scaled-out pool within PostgreSQL's default `max_connections` (100), and PostgreSQL
    /// on few cores is faster with fewer connections anyway (see BENCHMARKS.md).
    pub fn db_pool_size(&self) -> u32 {
        (u32::from(self.worker_concurrency) / 4).clamp(4, 16)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if present(&self.token_keys.token_encryption_key).is_none() {
            return Err(ConfigError::Missing("TOKEN_ENCRYPTION_KEY"));
        }
        if self.worker_concurrency == 0 {
            return Err(ConfigError::Invalid("WORKER_CONCURRENCY", "must be at least 1".into()));
        }
        if self.worker_max_attempts == 0 {
            return Err(ConfigError::Invalid("WORKER_MAX_ATTEMPTS", "must be at least 1".into()));
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

    fn ingest(extra: &[&str]) -> IngestSettings {
        let mut args = vec!["calsync-ingest", "--token-encryption-key=a2V5"];
        args.extend_from_slice(extra);
        IngestSettings::try_parse_from(args).unwrap()
    }

    #[test]
    fn empty_optional_urls_from_an_env_file_mean_unset() {
        let settings = ingest(&[
            "--connect-return-url=",
            "--calendly-webhook-callback-url= ",
            "--calendly-webhook-signing-keys=k",
        ]);
        assert!(settings.return_url().is_none());
        assert!(settings.callback_url().is_none());
    }

    #[test]
    fn an_empty_signing_key_is_refused_and_no_key_at_all_is_missing() {
        assert!(matches!(
            ingest(&["--calendly-webhook-signing-keys=k,"]).validate(),
            Err(ConfigError::Invalid("CALENDLY_WEBHOOK_SIGNING_KEYS", _))
        ));
        assert!(matches!(
            ingest(&["--calendly-webhook-signing-keys="]).validate(),
            Err(ConfigError::Missing("CALENDLY_WEBHOOK_SIGNING_KEYS"))
        ));
        assert!(ingest(&["--calendly-webhook-signing-keys=k1,k2"]).validate().is_ok());
    }

    #[test]
    fn a_blank_secret_counts_as_not_set() {
        assert!(present(&Some(SecretString::from("  ".to_owned()))).is_none());
        assert!(present(&Some(SecretString::from("t".to_owned()))).is_some());
        let settings = IngestSettings::try_parse_from([
            "calsync-ingest",
            "--token-encryption-key=",
            "--calendly-webhook-signing-keys=k",
        ])
        .unwrap();
        assert!(matches!(settings.validate(), Err(ConfigError::Missing("TOKEN_ENCRYPTION_KEY"))));
    }
}
