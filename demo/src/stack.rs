//! The processes of one calsync stack.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// Where everything is, whether we started it or attach to it (docker-compose).
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub sim_url: String,
    pub ingest_url: String,
    pub worker_urls: Vec<String>,
    pub database_url: String,
    pub amqp_url: String,
    pub topology_prefix: String,
    pub api_token: String,
}

pub struct Stack {
    pub endpoints: Endpoints,
    pub http: reqwest::Client,
    /// Our own processes (empty when attached); stopped with SIGTERM in reverse order.
    children: Vec<(String, Child)>,
    pub log_dir: Option<PathBuf>,
    /// The key ingest verifies webhooks with, when we started it (tests sign their own).
    pub webhook_signing_key: Option<String>,
}

pub struct LaunchOptions {
    pub workers: usize,
    /// A database of its own, recreated each run: the demo never touches real data.
    pub database_url: String,
    pub amqp_url: String,
    pub topology_prefix: String,
    pub log_dir: PathBuf,
}

/// Directory holding the workspace's built binaries (`target/debug` or `target/release`), found
/// from the running executable (a binary there, or a test under `deps/`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has a directory")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Builds the binaries a stack runs (simulator, ingest, worker) into [`bin_dir`], with the profile
/// of the running executable, so a test never runs binaries left over from an earlier build. Cheap
/// when they are up to date.
pub async fn build_binaries() -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let target_dir = bins.parent().context("the binaries' directory is inside a target directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        // The same selection as `scripts/demo`, so the demo and this build share their artifacts.
        .args(["build", "--quiet", "--workspace", "--bins"])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if bins.ends_with("release") {
        command.arg("--release");
    }
    // Variables cargo sets for the running test describe *its* crate; build scripts that watch
    // them (ring's watches CARGO_MANIFEST_DIR) would rebuild half the tree on every run.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
            || name.starts_with("CARGO_MANIFEST_")
            || ["CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "CARGO_RUSTC_CURRENT_DIR"]
                .contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    let status = command.status().await.context("running cargo build")?;
    anyhow::ensure!(status.success(), "cargo build of the stack's binaries failed ({status})");
    Ok(())
}

fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} not found; build the workspace first (`cargo build --workspace --bins`)", path.display());
    }
    Ok(path)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn http_client() -> reqwest::Client {
    calsync_common::http::client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// Sends `request`, again for up to a minute while ingest answers 503 ("retry later": its
/// database or broker is not reachable yet, as right after a stack starts), as an app would.
pub async fn send_patiently(request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
    let started = std::time::Instant::now();
    loop {
        let response = request.try_clone().context("a request that can be sent again")?.send().await?;
        if response.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE || started.elapsed() > Duration::from_secs(60)
        {
            return Ok(response);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn random_secret() -> String {
    calsync_common::crypto::generate_key()
}

impl Stack {
    /// Attaches to an already running stack (docker-compose).
    pub fn attach(endpoints: Endpoints) -> Self {
        Self { endpoints, http: http_client(), children: Vec::new(), log_dir: None, webhook_signing_key: None }
    }

    /// Starts the simulator, ingest and `workers` workers as processes with generated secrets.
    pub async fn launch(options: LaunchOptions) -> anyhow::Result<Self> {
        let bins = bin_dir()?;
        std::fs::create_dir_all(&options.log_dir)?;
        recreate_database(&options.database_url).await?;
        reset_topology(&options.amqp_url, &options.topology_prefix).await?;
        let (sim_port, ingest_port) = (free_port()?, free_port()?);
        let sim_url = format!("http://127.0.0.1:{sim_port}");
        let ingest_url = format!("http://127.0.0.1:{ingest_port}");
        let signing_key = random_secret();
        let client_secret = random_secret();
        let token_key = random_secret();
        let api_token = random_secret();
        let mut stack = Self {
            endpoints: Endpoints {
                sim_url: sim_url.clone(),
                ingest_url: ingest_url.clone(),
                worker_urls: Vec::new(),
                database_url: options.database_url.clone(),
                amqp_url: options.amqp_url.clone(),
                topology_prefix: options.topology_prefix.clone(),
                api_token: api_token.clone(),
            },
            http: http_client(),
            children: Vec::new(),
            log_dir: Some(options.log_dir.clone()),
            webhook_signing_key: Some(signing_key.clone()),
        };

        let mut sim = Command::new(binary(&bins, "calendly-sim")?);
        sim.env("SIM_ADDR", format!("127.0.0.1:{sim_port}"))
            .env("SIM_CLIENT_SECRET", &client_secret)
            .env("SIM_SIGNING_KEY", &signing_key)
            .env("SIM_DELIVERY_RETRY_BASE_MS", "200");
        stack.spawn("calendly-sim", sim, &options.log_dir)?;

        let common = |command: &mut Command| {
            command
                .env("DATABASE_URL", &options.database_url)
                .env("AMQP_URL", &options.amqp_url)
                .env("AMQP_TOPOLOGY_PREFIX", &options.topology_prefix)
                .env("CALENDLY_API_BASE_URL", &sim_url)
                .env("CALENDLY_AUTH_BASE_URL", &sim_url)
                .env("CALENDLY_OAUTH_CLIENT_ID", "sim-client-id")
                .env("CALENDLY_OAUTH_CLIENT_SECRET", &client_secret)
                .env("TOKEN_ENCRYPTION_KEY", &token_key)
                .env("LOG_FORMAT", "json");
        };
        let mut ingest = Command::new(binary(&bins, "calsync-ingest")?);
        common(&mut ingest);
        ingest
            .env("INGEST_ADDR", format!("127.0.0.1:{ingest_port}"))
            .env("CALENDLY_WEBHOOK_SIGNING_KEYS", &signing_key)
            .env("CALENDLY_WEBHOOK_CALLBACK_URL", format!("{ingest_url}/webhooks/calendly"))
            .env("CALENDLY_OAUTH_REDIRECT_URI", format!("{ingest_url}/oauth/calendly/callback"))
            .env("INTERNAL_API_TOKEN", &api_token);
        stack.spawn("calsync-ingest", ingest, &options.log_dir)?;

        for n in 0..options.workers {
            let port = free_port()?;
            let mut worker = Command::new(binary(&bins, "calsync-worker")?);
            common(&mut worker);
            worker
                .env("WORKER_ADDR", format!("127.0.0.1:{port}"))
                .env("WORKER_CONCURRENCY", "16")
                .env("CALENDLY_WEBHOOK_CALLBACK_URL", format!("{ingest_url}/webhooks/calendly"))
                // Demo pace: the periodic checks every few seconds instead of 15 / 60 minutes.
                .env("SUBSCRIPTION_CHECK_INTERVAL_SECS", "2")
                .env("RECONCILE_INTERVAL_SECS", "3");
            stack.spawn(&format!("calsync-worker-{}", n + 1), worker, &options.log_dir)?;
            stack.endpoints.worker_urls.push(format!("http://127.0.0.1:{port}"));
        }
        stack.wait_ready(Duration::from_secs(60)).await?;
        Ok(stack)
    }

    fn spawn(&mut self, name: &str, mut command: Command, log_dir: &Path) -> anyhow::Result<()> {
        let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
        command.stdout(Stdio::from(log.try_clone()?)).stderr(Stdio::from(log)).stdin(Stdio::null()).kill_on_drop(true);
        let child = command.spawn().with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Every replica behind each worker URL, as its own URL: `--scale worker=3` puts three
    /// containers behind the one name `worker`, and a request to the name reaches only one of them.
    /// Names resolving to one address (and IP literals) are kept as they are.
    pub async fn expand_worker_replicas(&mut self) -> anyhow::Result<()> {
        let mut expanded: Vec<String> = Vec::new();
        for raw in &self.endpoints.worker_urls {
            let url = url::Url::parse(raw).with_context(|| format!("worker URL {raw}"))?;
            let host = url.host_str().with_context(|| format!("worker URL {raw} has no host"))?;
            let port = url.port_or_known_default().with_context(|| format!("worker URL {raw} has no port"))?;
            let mut addresses: Vec<std::net::IpAddr> = tokio::net::lookup_host((host, port))
                .await
                .with_context(|| format!("resolving the workers' name {host}"))?
                .map(|a| a.ip())
                .collect();
            // One family: `localhost` is one worker, not two (127.0.0.1 and ::1).
            let v4 = addresses.iter().any(|a| a.is_ipv4());
            addresses.retain(|a| a.is_ipv4() == v4);
            addresses.sort();
            addresses.dedup();
            if addresses.len() <= 1 {
                expanded.push(raw.clone());
                continue;
            }
            for address in addresses {
                let mut replica = url.clone();
                replica
                    .set_ip_host(address)
                    .map_err(|()| anyhow::anyhow!("worker URL {raw} cannot take an address"))?;
                expanded.push(replica.as_str().trim_end_matches('/').to_owned());
            }
        }
        expanded.dedup();
        self.endpoints.worker_urls = expanded;
        Ok(())
    }

    /// Waits until the simulator answers and ingest and every worker report ready.
    pub async fn wait_ready(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let mut urls =
            vec![format!("{}/_sim", self.endpoints.sim_url), format!("{}/readyz", self.endpoints.ingest_url)];
        urls.extend(self.endpoints.worker_urls.iter().map(|w| format!("{w}/readyz")));
        for url in urls {
            loop {
                if self.http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
                for (name, child) in &mut self.children {
                    if let Some(status) = child.try_wait()? {
                        bail!(
                            "{name} exited early ({status}); see its log in {}",
                            self.log_dir.as_ref().map_or("-".into(), |d| d.display().to_string())
                        );
                    }
                }
                if started.elapsed() > deadline {
                    bail!("{url} was not ready within {deadline:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// SIGTERM to every process we started (workers first, the simulator last), then waits.
    pub async fn shutdown(mut self) -> anyhow::Result<Vec<(String, Option<i32>)>> {
        let mut exits = Vec::new();
        while let Some((name, mut child)) = self.children.pop() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            }
            let code = match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
                Ok(status) => status?.code(),
                Err(_) => {
                    child.kill().await?;
                    None
                }
            };
            exits.push((name, code));
        }
        Ok(exits)
    }

    /// The simulator's counters (`/_sim/counters`): what Calendly believes it delivered.
    pub async fn sim_counters(&self) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}/_sim/counters", self.endpoints.sim_url);
        Ok(self.http.get(url).send().await?.error_for_status()?.json().await?)
    }

    pub fn pool(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_lazy(&self.endpoints.database_url)?)
    }

    /// Messages waiting in `calsync.dead` (of this stack's topology).
    pub async fn dead_letters(&self) -> anyhow::Result<u32> {
        let conn = connect_any(&self.endpoints.amqp_url).await?;
        let channel = conn.create_channel().await?;
        let topology = calsync_common::queue::Topology::new(self.endpoints.topology_prefix.clone());
        let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let depth = channel
            .queue_declare(topology.dead_queue().as_str().into(), options, Default::default())
            .await?
            .message_count();
        let _ = conn.close(200, "done".into()).await;
        Ok(depth)
    }
}

/// Drops and recreates the demo's own database (never the configured production one).
async fn recreate_database(url: &str) -> anyhow::Result<()> {
    use sqlx::migrate::MigrateDatabase;
    if sqlx::Postgres::database_exists(url).await? {
        // Forced: a previous demo killed mid-run may still hold connections.
        sqlx::Postgres::force_drop_database(url).await?;
    }
    sqlx::Postgres::create_database(url).await?;
    Ok(())
}

/// Starts the demo's own prefixed topology empty: leftovers of an interrupted run would otherwise
/// be delivered into the fresh database. Never touches the unprefixed production names.
pub async fn reset_topology(amqp_url: &str, prefix: &str) -> anyhow::Result<()> {
    anyhow::ensure!(!prefix.is_empty(), "refusing to delete the unprefixed production topology");
    let conn = connect_any(amqp_url)
        .await
        .with_context(|| "connecting to RabbitMQ (is it running? scripts/services starts it)")?;
    let channel = conn.create_channel().await?;
    calsync_common::queue::Topology::new(prefix).delete(&channel).await?;
    let _ = conn.close(200, "reset".into()).await;
    Ok(())
}

/// A connection to the first reachable node of `amqp_url` (one URI, or a cluster's list).
async fn connect_any(amqp_url: &str) -> anyhow::Result<lapin::Connection> {
    let mut last = None;
    for node in amqp_url.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match lapin::Connection::connect(node, lapin::ConnectionProperties::default()).await {
            Ok(conn) => return Ok(conn),
            Err(error) => last = Some(error),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("AMQP_URL names no node"), anyhow::Error::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached(worker_urls: &[&str]) -> Stack {
        Stack::attach(Endpoints {
            sim_url: String::new(),
            ingest_url: String::new(),
            worker_urls: worker_urls.iter().map(|u| u.to_string()).collect(),
            database_url: String::new(),
            amqp_url: String::new(),
            topology_prefix: String::new(),
            api_token: String::new(),
        })
    }

    #[tokio::test]
    async fn a_name_with_one_worker_behind_it_stays_one_worker_even_with_an_ipv6_address_too() {
        let mut stack = attached(&["http://localhost:9090", "http://127.0.0.1:9091"]);
        stack.expand_worker_replicas().await.unwrap();
        assert_eq!(stack.endpoints.worker_urls, ["http://localhost:9090", "http://127.0.0.1:9091"]);
    }

    #[tokio::test]
    async fn a_worker_name_that_does_not_resolve_is_an_error_naming_it() {
        let mut stack = attached(&["http://no-such-worker.invalid:9090"]);
        let error = stack.expand_worker_replicas().await.unwrap_err();
        assert!(format!("{error:#}").contains("no-such-worker.invalid"), "{error:#}");
    }
}
