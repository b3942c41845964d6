use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use calendly_sim::load::{self, LoadOptions};
use calendly_sim::{SimConfig, SimServer};

#[derive(Parser)]
#[command(name = "calendly-sim", version, about = "A stateful stand-in for Calendly (OAuth, API v2, signed webhooks)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the simulator (the default).
    Serve,
    /// Generate load: book, cancel and reschedule at a steady rate, delivering signed webhooks.
    Load(LoadArgs),
}

#[derive(Args, Clone)]
struct ServeArgs {
    #[arg(long, env = "SIM_ADDR", default_value = "127.0.0.1:7070", global = true)]
    addr: String,
    /// Base URL of the URIs the simulator hands out (when it is reached through another name).
    #[arg(long, env = "SIM_PUBLIC_URL", global = true)]
    public_url: Option<String>,
    #[arg(long, env = "SIM_CLIENT_ID", default_value = "sim-client-id", global = true)]
    client_id: String,
    #[arg(long, env = "SIM_CLIENT_SECRET", default_value = "sim-client-secret", global = true)]
    client_secret: String,
    #[arg(long, env = "SIM_SIGNING_KEY", default_value = "sim-webhook-signing-key", global = true)]
    signing_key: String,
    #[arg(long, env = "SIM_ACCESS_TOKEN_TTL_SECS", default_value_t = 7200, global = true)]
    access_token_ttl_secs: u64,
    #[arg(long, env = "SIM_RATE_LIMIT_PER_MINUTE", default_value_t = 500, global = true)]
    rate_limit_per_minute: u32,
    #[arg(long, env = "SIM_DELIVERY_RETRY_BASE_MS", default_value_t = 1000, global = true)]
    delivery_retry_base_ms: u64,
    #[arg(long, env = "SIM_DELIVERY_RETRY_WINDOW_SECS", default_value_t = 24 * 3600, global = true)]
    delivery_retry_window_secs: u64,
}

#[derive(Args)]
struct LoadArgs {
    #[arg(long, default_value_t = 10)]
    users: usize,
    /// Actions per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Webhook callback URL (ingest's `/webhooks/calendly`).
    #[arg(long)]
    target: String,
}

impl ServeArgs {
    fn config(&self) -> SimConfig {
        SimConfig {
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            signing_key: self.signing_key.clone(),
            access_token_ttl: Duration::from_secs(self.access_token_ttl_secs),
            auth_code_ttl: Duration::from_secs(600),
            rate_limit_per_minute: self.rate_limit_per_minute,
            delivery_retry_base: Duration::from_millis(self.delivery_retry_base_ms),
            delivery_retry_window: Duration::from_secs(self.delivery_retry_window_secs),
            public_url: self.public_url.clone(),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    let server = SimServer::start(cli.serve.config(), &cli.serve.addr).await?;
    let url = server.url();
    match cli.command {
        None | Some(Command::Serve) => {
            println!("calendly-sim listening on {url}");
            println!();
            println!("Point calsync at it:");
            println!("  CALENDLY_API_BASE_URL={url}");
            println!("  CALENDLY_AUTH_BASE_URL={url}");
            println!("  CALENDLY_OAUTH_CLIENT_ID={}", cli.serve.client_id);
            println!("  CALENDLY_OAUTH_CLIENT_SECRET={}", cli.serve.client_secret);
            println!("  CALENDLY_WEBHOOK_SIGNING_KEYS={}", cli.serve.signing_key);
            println!();
            println!("Control API (not part of Calendly): GET {url}/_sim lists the routes, e.g.");
            println!(
                "  curl -X POST {url}/_sim/users -H 'content-type: application/json' -d '{{\"name\":\"Ada\",\"email\":\"ada@example.com\"}}'"
            );
            println!(
                "OAuth: add &sim_user=<uuid|email> to an authorize URL to approve as that user, &sim_deny=1 to deny."
            );
            wait_for_stop().await;
        }
        Some(Command::Load(args)) => {
            eprintln!("calendly-sim listening on {url}; generating load against {}", args.target);
            let options = LoadOptions {
                users: args.users,
                rate: args.rate,
                duration: Duration::from_secs(args.duration),
                target: args.target,
            };
            let report = load::run(&server.sim, &options).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}

/// Ctrl-C or SIGTERM (what process managers and the demo send).
async fn wait_for_stop() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
