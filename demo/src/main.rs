use std::time::{Duration, Instant};

use clap::Parser;

use calsync_demo::feed::AppFeed;
use calsync_demo::stack::{Endpoints, LaunchOptions, Stack};
use calsync_demo::{report, scenario};

#[derive(Parser)]
#[command(name = "calsync-demo", about = "Runs calsync end to end: simulator, ingest and workers as real processes")]
struct Cli {
    /// Workers to start.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Keep everything running afterwards (Ctrl-C stops it).
    #[arg(long)]
    keep: bool,
    /// The demo's own database: dropped and recreated on every run.
    #[arg(long, env = "DEMO_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/calsync_demo")]
    database_url: String,
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Prefix of the demo's exchange and queues, so it never consumes another stack's messages.
    #[arg(long, env = "DEMO_TOPOLOGY_PREFIX", default_value = "calsync-demo")]
    topology_prefix: String,
    /// Attach to running services (docker-compose) instead of starting processes.
    #[arg(long, requires_all = ["sim_url", "ingest_url", "api_token"])]
    attach: bool,
    #[arg(long, env = "DEMO_SIM_URL")]
    sim_url: Option<String>,
    #[arg(long, env = "DEMO_INGEST_URL")]
    ingest_url: Option<String>,
    #[arg(long = "worker-url", env = "DEMO_WORKER_URLS", value_delimiter = ',')]
    worker_urls: Vec<String>,
    #[arg(long, env = "INTERNAL_API_TOKEN")]
    api_token: Option<String>,
}

fn step(started: Instant, line: &str) {
    println!("▸ [{:>5.1}s] {line}", started.elapsed().as_secs_f64());
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let started = Instant::now();
    let stack = if cli.attach {
        let mut stack = Stack::attach(Endpoints {
            sim_url: cli.sim_url.clone().unwrap_or_default(),
            ingest_url: cli.ingest_url.clone().unwrap_or_default(),
            worker_urls: cli.worker_urls.clone(),
            database_url: cli.database_url.clone(),
            amqp_url: cli.amqp_url.clone(),
            topology_prefix: String::new(),
            api_token: cli.api_token.clone().unwrap_or_default(),
        });
        step(started, "waiting for the running services");
        let ready = async {
            stack.expand_worker_replicas().await?;
            stack.wait_ready(Duration::from_secs(120)).await
        };
        if let Err(error) = ready.await {
            eprintln!("calsync-demo: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
        stack
    } else {
        step(started, &format!("starting calendly-sim, calsync-ingest and {} calsync-worker processes", cli.workers));
        let options = LaunchOptions {
            workers: cli.workers,
            database_url: cli.database_url.clone(),
            amqp_url: cli.amqp_url.clone(),
            topology_prefix: cli.topology_prefix.clone(),
            log_dir: std::path::PathBuf::from(".demo/logs"),
        };
        match Stack::launch(options).await {
            Ok(stack) => stack,
            Err(error) => {
                eprintln!("calsync-demo: {error:#}");
                return std::process::ExitCode::FAILURE;
            }
        }
    };
    step(
        started,
        &format!(
            "all ready: simulator {}, ingest {}, {} worker(s)",
            stack.endpoints.sim_url,
            stack.endpoints.ingest_url,
            stack.endpoints.worker_urls.len()
        ),
    );

    let story = async {
        let feed = AppFeed::follow(&stack).await?;
        step(started, "the app follows GET /changes: each change it is told is printed as ⇢");
        let outcome = scenario::run(&stack, &|line| step(started, line)).await?;
        step(started, "waiting for the webhooks to become rows");
        scenario::wait_for_rows(&stack, &outcome, Duration::from_secs(60)).await?;
        step(started, "every meeting is in PostgreSQL under the right user");
        let mut outcome = outcome;
        if cli.attach {
            step(started, "skipping the drift scenario: the running workers check on their own schedule");
        } else {
            scenario::drift(&stack, &mut outcome, &|line| step(started, line)).await?;
            step(started, "waiting for the subscription check and reconciliation (no webhooks)");
            scenario::wait_for_rows(&stack, &outcome, Duration::from_secs(60)).await?;
            let uri = scenario::replaced_subscription(&stack, &outcome).await?;
            step(
                started,
                &format!("Ada's subscription was replaced ({uri}, active) and both missed bookings are in PostgreSQL"),
            );
        }
        // Which meeting and invitee kinds arrive depends on delivery order; the check that every
        // row was announced does not.
        let mut told = vec!["connection.active", "meeting.created", "invitee.created"];
        if !cli.attach {
            told.extend(["connection.subscription_failing", "connection.subscription_repaired"]);
        }
        let users: Vec<uuid::Uuid> = outcome.users.iter().map(|u| u.app_user).collect();
        step(started, &feed.stop(&stack.pool()?, &users, &told).await?);
        println!("{}", report::render(&stack, &outcome).await?);
        anyhow::Ok(())
    };
    let interrupted = tokio::select! {
        result = story => match result {
            Ok(()) => false,
            Err(error) => {
                eprintln!("calsync-demo: {error:#}");
                if let Some(dir) = &stack.log_dir {
                    eprintln!("process logs: {}", dir.display());
                }
                shutdown(stack, started).await;
                return std::process::ExitCode::FAILURE;
            }
        },
        _ = tokio::signal::ctrl_c() => true,
    };
    if cli.keep && !interrupted {
        let e = &stack.endpoints;
        println!("\nStill running (Ctrl-C stops everything):");
        println!("  simulator  {}      (GET {}/_sim lists its control API)", e.sim_url, e.sim_url);
        println!("  ingest     {}      (INTERNAL_API_TOKEN={})", e.ingest_url, e.api_token);
        for w in &e.worker_urls {
            println!("  worker     {w}/metrics");
        }
        println!("  database   {}", e.database_url);
        println!(
            "  try:       curl -s -H 'Authorization: Bearer {}' {}/connections/calendly/<app user id>",
            e.api_token, e.ingest_url
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown(stack, started).await;
    if interrupted { std::process::ExitCode::from(130) } else { std::process::ExitCode::SUCCESS }
}

async fn shutdown(stack: Stack, started: Instant) {
    step(started, "stopping (SIGTERM)");
    match stack.shutdown().await {
        Ok(exits) => {
            let summary: Vec<String> = exits
                .iter()
                .map(|(n, c)| format!("{n} exit {}", c.map_or("killed".into(), |c| c.to_string())))
                .collect();
            if !summary.is_empty() {
                step(started, &summary.join(", "));
            }
        }
        Err(error) => eprintln!("calsync-demo: stopping: {error:#}"),
    }
}
