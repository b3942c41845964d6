use clap::{Parser, Subcommand};

use calsync_common::{shutdown, telemetry};
use calsync_worker::settings::WorkerSettings;

#[derive(Parser)]
#[command(name = "calsync-worker", version, about = "Turns queued Calendly webhooks into the right user's meetings")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: WorkerSettings,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database if needed and apply pending migrations, then exit.
    Migrate,
    /// Re-encrypt every stored token with TOKEN_ENCRYPTION_KEY (keep the old key in
    /// TOKEN_ENCRYPTION_PREVIOUS_KEYS while this runs and until every process has the new key).
    RotateTokenKey,
    /// Move every message in calsync.dead back to its work queue (after fixing the cause).
    ReplayDead,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing(cli.settings.shared.telemetry.log_format);
    let result = match cli.command {
        Some(Command::Migrate) => migrate(&cli.settings).await,
        Some(Command::RotateTokenKey) => rotate_token_key(&cli.settings).await,
        Some(Command::ReplayDead) => replay_dead(&cli.settings).await,
        None => run(cli.settings).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("calsync-worker: {error:#}");
            std::process::ExitCode::from(if error.downcast_ref::<calsync_common::config::ConfigError>().is_some() {
                2
            } else {
                1
            })
        }
    }
}

async fn run(settings: WorkerSettings) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signal();
    calsync_worker::Worker::build(settings, shutdown).await?.run_until_stopped().await
}

async fn migrate(settings: &WorkerSettings) -> anyhow::Result<()> {
    let url = &settings.shared.database.database_url;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_lazy(url)?;
    calsync_common::db::prepare(url, &pool).await?;
    println!("migrations applied");
    Ok(())
}

async fn rotate_token_key(settings: &WorkerSettings) -> anyhow::Result<()> {
    settings.validate()?;
    let cipher = calsync_common::crypto::TokenCipher::from_settings(&settings.shared.token_keys)?;
    let url = &settings.shared.database.database_url;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_lazy(url)?;
    calsync_common::db::prepare(url, &pool).await?;
    let report = calsync_worker::admin::rotate_key::reencrypt_all(&pool, &cipher).await?;
    println!(
        "re-encrypted {} connection(s), {} pending OAuth state(s) and {} unconfirmed connect(s) with key {}",
        report.connections_reencrypted,
        report.states_reencrypted,
        report.pending_reencrypted,
        cipher.current_key_id()
    );
    Ok(())
}

async fn replay_dead(settings: &WorkerSettings) -> anyhow::Result<()> {
    use calsync_common::queue::{Broker, BrokerConfig};
    let url = &settings.shared.database.database_url;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_lazy(url)?;
    calsync_common::db::prepare(url, &pool).await?;
    let broker = Broker::start(BrokerConfig {
        publish_channels: 1,
        ..BrokerConfig::from_args(&settings.shared.amqp, "calsync-worker replay-dead")
    });
    anyhow::ensure!(broker.wait_ready(std::time::Duration::from_secs(15)).await, "RabbitMQ is not reachable");
    let moved = calsync_worker::admin::replay_dead::replay_dead(&pool, &broker).await;
    broker.close().await;
    println!("moved {} dead letter(s) back to their work queues", moved?);
    Ok(())
}
