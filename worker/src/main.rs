use clap::{Parser, Subcommand};

use calsync_common::{shutdown, telemetry};
use calsync_worker::admin;
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
    /// One line per connection: user, Calendly user, status, subscription, last sync, last error.
    Connections,
    /// Queue a full resync of one user's connection now.
    Resync { user_id: uuid::Uuid },
    /// List dead webhooks (age, event, attempts, reason) without their bodies, and count
    /// calsync.dead, without taking a single message out of it.
    Dead,
    /// Print the rabbitmqctl command that makes dead letters in calsync.dead expire after
    /// DEAD_RETENTION_DAYS (a policy: an existing queue adopts it, letters already in it too).
    DeadLetterPolicy,
    /// Erase one invitee's personal data (a deletion request): invitee rows, their meetings'
    /// locations and cancel reasons, kept and queued webhook bodies; later writes honour it.
    /// Move the users of an existing Calendly integration in without asking them to reconnect:
    /// each row's grant is checked with Calendly (refreshed once if needed) and becomes an active
    /// connection, or needs_reauth. Stop the old system's webhook handler and token refresh first:
    /// Calendly's refresh tokens are single-use.
    ImportConnections {
        /// The existing integration's PostgreSQL database (only read), e.g.
        /// postgres://reader@old-db/app. Prefer the variable: a URL on the command line shows in `ps`.
        #[arg(long = "from", env = "IMPORT_SOURCE_DATABASE_URL", hide_env_values = true, value_parser = secret_url)]
        from: secrecy::SecretString,
        /// Its connections table, `[schema.]table`.
        #[arg(long, default_value = "calendar_connections")]
        table: admin::import::source::TableName,
        /// Report what would happen; write nothing, refresh nothing, call nobody.
        #[arg(long)]
        dry_run: bool,
        /// Rows checked with Calendly at once.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
        concurrency: u16,
    },
    Forget {
        /// The invitee's exact email address (case-insensitive; never a substring).
        email: String,
        /// Report what would be erased, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _telemetry = telemetry::init(cli.settings.shared.telemetry.log_format, "calsync-worker");
    let result = match cli.command {
        Some(Command::Migrate) => migrate(&cli.settings).await,
        Some(Command::RotateTokenKey) => rotate_token_key(&cli.settings).await,
        Some(Command::ReplayDead) => replay_dead(&cli.settings).await,
        Some(Command::Connections) => list_connections(&cli.settings).await,
        Some(Command::Resync { user_id }) => resync(&cli.settings, user_id).await,
        Some(Command::Dead) => list_dead(&cli.settings).await,
        Some(Command::DeadLetterPolicy) => dead_letter_policy(&cli.settings),
        Some(Command::Forget { email, dry_run }) => forget(&cli.settings, &email, dry_run).await,
        Some(Command::ImportConnections { from, table, dry_run, concurrency }) => {
            import_connections(&cli.settings, &from, table, dry_run, concurrency).await
        }
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
    let report = calsync_worker::admin::rotate_key::reencrypt_all(&pool(settings).await?, &cipher).await?;
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
    let (pool, broker) = (pool(settings).await?, broker(settings, "calsync-worker replay-dead").await?);
    let moved = calsync_worker::admin::replay_dead::replay_dead(&pool, &broker).await;
    broker.close().await;
    println!("moved {} dead letter(s) back to their work queues", moved?);
    Ok(())
}

async fn pool(settings: &WorkerSettings) -> anyhow::Result<sqlx::PgPool> {
    pool_of(settings, 2).await
}

/// An operator command's pool of `size` connections, migrated.
async fn pool_of(settings: &WorkerSettings, size: u32) -> anyhow::Result<sqlx::PgPool> {
    let url = &settings.shared.database.database_url;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(size).connect_lazy(url)?;
    calsync_common::db::prepare(url, &pool).await?;
    Ok(pool)
}

async fn broker(settings: &WorkerSettings, name: &str) -> anyhow::Result<calsync_common::queue::Broker> {
    use calsync_common::queue::{Broker, BrokerConfig};
    let broker =
        Broker::start(BrokerConfig { publish_channels: 1, ..BrokerConfig::from_args(&settings.shared.amqp, name) });
    anyhow::ensure!(broker.wait_ready(std::time::Duration::from_secs(15)).await, "RabbitMQ is not reachable");
    Ok(broker)
}

async fn list_connections(settings: &WorkerSettings) -> anyhow::Result<()> {
    let lines = admin::connections::connections(&pool(settings).await?).await?;
    for line in &lines {
        println!("{line}");
    }
    println!("{} connection(s)", lines.len());
    Ok(())
}

async fn resync(settings: &WorkerSettings, user_id: uuid::Uuid) -> anyhow::Result<()> {
    let (pool, broker) = (pool(settings).await?, broker(settings, "calsync-worker resync").await?);
    let queued = admin::resync::resync(&pool, &broker, user_id).await;
    broker.close().await;
    println!("queued a full resync of connection {} (user {user_id})", queued?);
    Ok(())
}

async fn list_dead(settings: &WorkerSettings) -> anyhow::Result<()> {
    let (pool, broker) = (pool(settings).await?, broker(settings, "calsync-worker dead").await?);
    let report = calsync_worker::admin::dead::dead(&pool, &broker).await;
    broker.close().await;
    let report = report?;
    for line in &report.webhooks {
        println!("{line}");
    }
    println!(
        "{} dead webhook(s) recorded; {} message(s) in calsync.dead (the rest are sync jobs or letters the broker \
         dead-lettered itself)",
        report.webhooks.len(),
        report.in_queue
    );
    Ok(())
}

fn dead_letter_policy(settings: &WorkerSettings) -> anyhow::Result<()> {
    use calsync_worker::admin::dead_letter_policy as policy;
    use secrecy::ExposeSecret;
    let amqp = &settings.shared.amqp;
    let topology = calsync_common::queue::topology::Topology::new(amqp.amqp_topology_prefix.clone());
    let ttl = std::time::Duration::from_secs(u64::from(settings.dead_retention_days) * 86_400);
    let args = policy::rabbitmqctl_args(&topology, &policy::vhost_of(amqp.amqp_url.expose_secret())?, ttl)?;
    println!("{}", policy::shell_line(&args));
    Ok(())
}

async fn forget(settings: &WorkerSettings, email: &str, dry_run: bool) -> anyhow::Result<()> {
    use calsync_worker::admin::forget;
    // Refused before anything is opened: an empty or partial address must never match anyone.
    let email = forget::EmailAddress::parse(email)?;
    let (pool, broker) = (pool(settings).await?, broker(settings, "calsync-worker forget").await?);
    let forgotten = forget::forget(&pool, Some(&broker), &email, dry_run).await;
    broker.close().await;
    let forgotten = forgotten?;
    if dry_run {
        println!("dry run: would erase {email} from {forgotten}; nothing was changed");
    } else {
        println!("erased {email} from {forgotten}; later writes about {email} are erased too");
    }
    Ok(())
}

fn secret_url(value: &str) -> Result<secrecy::SecretString, String> {
    Ok(secrecy::SecretString::from(value.to_owned()))
}

async fn import_connections(
    settings: &WorkerSettings,
    from: &secrecy::SecretString,
    table: admin::import::source::TableName,
    dry_run: bool,
    concurrency: u16,
) -> anyhow::Result<()> {
    use admin::import::{Target, source::Source, verify::Verifier};
    settings.validate()?;
    // Checked before anything is opened: a run that cannot finish its rows must not start them.
    let callback_url = if dry_run { None } else { Some(admin::import::callback_url(settings)?) };
    let source = Source::open(from, table.clone()).await?;
    // Each row in flight takes budget and store statements of its own: two connections would
    // queue `--concurrency` rows behind each other.
    let pool = pool_of(settings, u32::from(concurrency).div_ceil(2).max(2)).await?;
    let target = match callback_url {
        None => None,
        Some(callback_url) => {
            eprintln!(
                "calsync-worker: importing. The old system's webhook handler and token refresh must be stopped: \
                 Calendly's refresh tokens are single-use, and a token refreshed by both systems is lost to one."
            );
            let calendly = calsync_common::calendly::CalendlyClient::new(&settings.shared.calendly)?;
            let cipher =
                std::sync::Arc::new(calsync_common::crypto::TokenCipher::from_settings(&settings.shared.token_keys)?);
            Some(Target {
                cipher,
                verifier: Verifier { calendly, budgets: calsync_worker::budget::Budgets::new(pool.clone()) },
                broker: broker(settings, "calsync-worker import-connections").await?,
                callback_url,
                replay_days: settings.inbox.inbox_replay_days,
                concurrency: usize::from(concurrency),
                stop: calsync_common::shutdown::on_signal(),
            })
        }
    };
    let report = admin::import::import(&pool, &source, table, target.as_ref()).await;
    source.close().await;
    if let Some(target) = target {
        target.broker.close().await;
    }
    let report = report?;
    println!("{report}");
    match report.failed() {
        0 => Ok(()),
        n => anyhow::bail!(
            "{n} row(s) could not be checked with Calendly now and were not written: run the import again"
        ),
    }
}
