//! Starting ingest in-process on port 0 against real RabbitMQ, with an isolated topology.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use calsync_common::calendly::signature;
use calsync_common::crypto;
use calsync_ingest::settings::IngestSettings;
use calsync_testkit::IsolatedTopology;

pub const KEY: &str = "test-signing-key";
pub const SECOND_KEY: &str = "rotated-signing-key";
/// Nothing listens here: proves webhook intake never needs PostgreSQL.
pub const NO_DATABASE: &str = "postgres://postgres@127.0.0.1:1/calsync";

pub struct TestApp {
    pub addr: SocketAddr,
    pub topology: IsolatedTopology,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub struct Options {
    pub amqp_url: String,
    pub database_url: String,
    /// More `--flags` for ingest (later ones win over the defaults).
    pub extra: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        let amqp_url = calsync_testkit::amqp_url();
        Self { amqp_url, database_url: NO_DATABASE.into(), extra: Vec::new() }
    }
}

pub fn settings(prefix: &str, options: &Options) -> IngestSettings {
    let key = crypto::generate_key();
    let mut args = vec![
        "calsync-ingest".to_owned(),
        "--ingest-addr=127.0.0.1:0".into(),
        format!("--calendly-webhook-signing-keys={KEY},{SECOND_KEY}"),
        format!("--amqp-url={}", options.amqp_url),
        format!("--amqp-topology-prefix={prefix}"),
        format!("--database-url={}", options.database_url),
        format!("--token-encryption-key={key}"),
        "--ingest-publish-timeout-ms=3000".into(),
    ];
    // A flag in `extra` replaces the default of the same name.
    let name = |arg: &str| arg.split('=').next().unwrap_or_default().to_owned();
    args.retain(|arg| !options.extra.iter().any(|extra| name(extra) == name(arg)));
    args.extend(options.extra.iter().cloned());
    IngestSettings::try_parse_from(args).expect("test settings parse")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    calsync_common::telemetry::init_tracing(calsync_common::config::LogFormat::Pretty);
    let topology = IsolatedTopology::new().await;
    let shutdown = CancellationToken::new();
    let app = calsync_ingest::Application::build(settings(&topology.prefix, &options), shutdown.clone())
        .await
        .expect("ingest builds");
    let addr = app.local_addr();
    let broker = app.state().broker.clone();
    let server = tokio::spawn(app.run_until_stopped());
    if options.amqp_url == calsync_testkit::amqp_url() {
        assert!(broker.wait_ready(Duration::from_secs(10)).await, "ingest connected to RabbitMQ");
    }
    TestApp { addr, topology, http: calsync_common::http::client_builder().build().unwrap(), shutdown, server }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post_webhook(&self, body: &[u8], signature: Option<String>) -> reqwest::Response {
        let mut request = self
            .http
            .post(self.url("/webhooks/calendly"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header(signature::HEADER, signature);
        }
        request.send().await.expect("request reaches ingest")
    }

    /// Takes every queued webhook out; their bodies, oldest first.
    pub async fn queued_bodies(&self) -> Vec<Vec<u8>> {
        let messages = self.topology.drain(&self.topology.topology.webhooks_queue()).await;
        messages.into_iter().map(|m| m.delivery.data).collect()
    }

    pub async fn webhooks_depth(&self) -> u32 {
        self.topology.depth(&self.topology.topology.webhooks_queue()).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
        self.topology.cleanup().await;
    }
}

pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub fn signed(key: &str, body: &[u8]) -> String {
    signature::sign(key.as_bytes(), now(), body)
}

pub fn sample_body(n: usize) -> Vec<u8> {
    format!(
        r#"{{"created_at":"2025-12-17T01:59:35.000000Z","created_by":"https://api.calendly.com/users/U{n}","event":"invitee.created","payload":{{"uri":"https://api.calendly.com/scheduled_events/E{n}/invitees/I{n}","event":"https://api.calendly.com/scheduled_events/E{n}"}}}}"#
    )
    .into_bytes()
}

/// Value of one Prometheus sample (`name{labels}`) in ingest's `/metrics`, 0 when absent.
pub async fn metric(app: &TestApp, sample: &str) -> f64 {
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
