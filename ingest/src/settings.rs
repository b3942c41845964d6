//! Settings of `calsync-ingest`: its own variables plus the groups it shares with the worker
//! ([`calsync_common::config`]).

use std::time::Duration;

use clap::Parser;
use secrecy::SecretString;
use url::Url;

use calsync_common::config::{ConfigError, InboxArgs, OptionalUrl, SharedArgs, optional_url, secret};

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

    /// Webhook requests handled at once; past that ingest answers 503 + Retry-After at once instead
    /// of queueing in memory.
    #[arg(long, env = "INGEST_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub ingest_max_in_flight: usize,

    /// Headers and body must arrive within this many seconds (Calendly itself gives up after 10 s to
    /// connect and 15 s to read), so slow clients cannot hold connections open.
    #[arg(long, env = "INGEST_REQUEST_TIMEOUT_SECS", default_value_t = 10)]
    pub ingest_request_timeout_secs: u64,

    /// Confirm-mode channels shared by all requests. Two, measured: with fewer channels RabbitMQ
    /// confirms more publishes per frame, and at 16 requests in flight two gave ingest 6,800–7,200
    /// webhooks/s where four gave 6,400–6,800, at ≈ 55 instead of ≈ 62 µs of ingest's CPU each; one
    /// channel lowers the raw publish ceiling at 64 (BENCHMARKS.md, "A leaner load generator, two
    /// publish channels").
    #[arg(long, env = "INGEST_PUBLISH_CHANNELS", default_value_t = 2, hide = true)]
    pub ingest_publish_channels: usize,

    #[command(flatten)]
    pub shared: SharedArgs,
    #[command(flatten)]
    pub inbox: InboxArgs,
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

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.ingest_request_timeout_secs)
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
        self.shared.validate()?;
        if self.ingest_max_in_flight == 0 {
            return Err(ConfigError::Invalid("INGEST_MAX_IN_FLIGHT", "must be at least 1".into()));
        }
        if self.ingest_request_timeout_secs == 0 {
            return Err(ConfigError::Invalid("INGEST_REQUEST_TIMEOUT_SECS", "must be at least 1".into()));
        }
        if self.ingest_publish_channels == 0 {
            return Err(ConfigError::Invalid("INGEST_PUBLISH_CHANNELS", "must be at least 1".into()));
        }
        Ok(())
    }
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
    fn a_blank_token_key_counts_as_not_set() {
        let settings = IngestSettings::try_parse_from([
            "calsync-ingest",
            "--token-encryption-key=",
            "--calendly-webhook-signing-keys=k",
        ])
        .unwrap();
        assert!(matches!(settings.validate(), Err(ConfigError::Missing("TOKEN_ENCRYPTION_KEY"))));
    }
}
