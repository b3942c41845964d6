//! Helpers for calsync's integration tests, which run against the machine's real PostgreSQL and
//! RabbitMQ.
//!
//! - [`TcpProxy`]: stands between a service and PostgreSQL/RabbitMQ so a test can cut and restore
//!   the link without touching the shared servers.
//! - [`IsolatedTopology`]: a uniquely prefixed exchange and queue set per test, deleted afterwards.
//! - [`wait_until`]: poll with a deadline instead of sleeping.
//! - [`cluster::RabbitCluster`]: a private three-node RabbitMQ cluster whose nodes can be killed.
//! - [`seed::SeedDatabase`]: an existing integration's database, for the import of connections.

pub mod cluster;
pub mod seed;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use calsync_common::queue::Topology;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// RabbitMQ of the machine, or `AMQP_URL`.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// URL of the `#[sqlx::test]` database behind `pool` (same server as `DATABASE_URL`).
pub fn test_database_url(pool: &sqlx::PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for tests (see .cargo/config.toml)");
    let mut url = url::Url::parse(&base).expect("DATABASE_URL is a URL");
    url.set_path(pool.connect_options().get_database().expect("test database has a name"));
    url.to_string()
}

/// Command line (program name first) of a worker wired to a test's database, topology and
/// simulated Calendly.
pub fn worker_args(
    db_url: &str,
    topology_prefix: &str,
    calendly_url: &str,
    client: (&str, &str),
    token_key: &str,
) -> Vec<String> {
    vec![
        "calsync-worker".into(),
        "--worker-addr=127.0.0.1:0".into(),
        format!("--database-url={db_url}"),
        format!("--amqp-url={}", amqp_url()),
        format!("--amqp-topology-prefix={topology_prefix}"),
        format!("--calendly-api-base-url={calendly_url}"),
        format!("--calendly-auth-base-url={calendly_url}"),
        format!("--calendly-oauth-client-id={}", client.0),
        format!("--calendly-oauth-client-secret={}", client.1),
        format!("--token-encryption-key={token_key}"),
    ]
}

/// Polls `check` every 25 ms until it returns true; panics with `what` after `deadline`.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls `ready` every 5 ms for `span`; returns the longest stretch in which it said false (how
/// long a failover left a service without its broker, say).
pub async fn longest_unready<F, Fut>(span: Duration, mut ready: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + span;
    let (mut longest, mut down_since) = (Duration::ZERO, None::<tokio::time::Instant>);
    while tokio::time::Instant::now() < until {
        match (ready().await, down_since) {
            (false, None) => down_since = Some(tokio::time::Instant::now()),
            (true, Some(since)) => {
                longest = longest.max(since.elapsed());
                down_since = None;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    longest.max(down_since.map_or(Duration::ZERO, |since| since.elapsed()))
}

/// A TCP forwarder on 127.0.0.1:0. `cut()` drops every open connection and refuses new ones until
/// `restore()`: to the service behind it, the server has gone away.
pub struct TcpProxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let generation = watch::channel(0u64).0;
        let (up2, gen2) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = gen2.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut ri, &mut wo) => {},
                        _ = tokio::io::copy(&mut ro, &mut wi) => {},
                        _ = cut.changed() => {},
                    }
                });
            }
        });
        Self { addr, up, generation }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// `url` with its host:port replaced by this proxy's address.
    pub fn url_through(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("url has a scheme");
        let (auth_host, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let auth = auth_host.rsplit_once('@').map(|(a, _)| format!("{a}@")).unwrap_or_default();
        format!("{scheme}://{auth}{}/{path}", self.addr)
    }
}

/// Host and port of the PostgreSQL server behind `db_url` (to put a [`TcpProxy`] in front of it).
pub fn postgres_addr(db_url: &str) -> SocketAddr {
    let url = url::Url::parse(db_url).expect("a database URL");
    let host = url.host_str().expect("a host").replace("localhost", "127.0.0.1");
    format!("{host}:{}", url.port().unwrap_or(5432)).parse().expect("an IP address and port")
}

/// Address of the machine's RabbitMQ (from `AMQP_URL`).
pub fn amqp_addr() -> SocketAddr {
    let url = amqp_url();
    let rest = url.split_once("://").unwrap().1;
    let host_port = rest.split('/').next().unwrap().rsplit('@').next().unwrap();
    let host_port = if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5672") };
    std::net::ToSocketAddrs::to_socket_addrs(&host_port.replace("localhost", "127.0.0.1")).unwrap().next().unwrap()
}

/// A topology with a unique prefix, for one test. Deleted by [`IsolatedTopology::cleanup`].
pub struct IsolatedTopology {
    pub prefix: String,
    pub topology: Topology,
    conn: Connection,
    cleaned: bool,
}

impl IsolatedTopology {
    pub async fn new() -> Self {
        let prefix = format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ for the test");
        let topology = Topology::new(prefix.clone());
        topology.declare(&conn).await.expect("declare test topology");
        Self { prefix, topology, conn, cleaned: false }
    }

    /// Messages ready in `queue` (a passive declare; does not consume).
    pub async fn depth(&self, queue: &str) -> u32 {
        let channel = self.conn.create_channel().await.unwrap();
        let options = QueueDeclareOptions { passive: true, ..Default::default() };
        let q = channel.queue_declare(queue.into(), options, FieldTable::default()).await.expect("queue exists");
        let _ = channel.close(200, "ok".into()).await;
        q.message_count()
    }

    /// A queue an app would bind to `calsync.changes` (every kind). It expires 10 minutes after
    /// its last use, so a test that dies leaves nothing behind for long.
    pub async fn listen_to_changes(&self) -> String {
        let queue = format!("{}.app-changes", self.prefix);
        let channel = self.conn.create_channel().await.unwrap();
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), lapin::types::AMQPValue::LongInt(600_000));
        let options = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(queue.as_str().into(), options, args).await.expect("declare the app's queue");
        let exchange = self.topology.changes_exchange();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the app's queue");
        let _ = channel.close(200, "ok".into()).await;
        queue
    }

    /// Takes every ready message out of `queue` (acking them).
    pub async fn drain(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
        let channel = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(msg) = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            out.push(msg);
        }
        let _ = channel.close(200, "ok".into()).await;
        out
    }

    /// Deletes the test's queues and exchange (also done on drop, so a failing test cleans up).
    pub async fn cleanup(mut self) {
        delete(&self.conn, &self.topology).await;
        self.cleaned = true;
    }
}

async fn delete(conn: &Connection, topology: &Topology) {
    if let Ok(channel) = conn.create_channel().await {
        let _ = topology.delete(&channel).await;
    }
}

impl Drop for IsolatedTopology {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let topology = self.topology.clone();
        // Drop cannot await, and the test's runtime may be shutting down: use a thread of our own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                if let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
                    delete(&conn, &topology).await;
                    let _ = conn.close(200, "test cleanup".into()).await;
                }
            });
        })
        .join();
    }
}

/// How many sessions of `pool`'s database hold the session-level advisory lock `key` (the one a
/// worker takes to lead a job, e.g. publishing the change feed): 0 or 1 when leadership works.
pub async fn advisory_lock_holders(pool: &sqlx::PgPool, key: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(key)
    .fetch_one(pool)
    .await
    .expect("read pg_locks")
}

/// The change-feed reader calsync must not be: `change_log` in insert order, after the last id it
/// saw (a plain `bigserial` read as `id > last`). It skips a change whose transaction drew its id
/// before one it read but committed after; tests run it beside the real cursor to show the cursor
/// does not. Returns the change ids read and moves `last`.
pub async fn read_changes_by_id(pool: &sqlx::PgPool, last: &mut i64) -> Vec<uuid::Uuid> {
    let rows: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT change_id, seq FROM change_log WHERE seq > $1 ORDER BY seq")
            .bind(*last)
            .fetch_all(pool)
            .await
            .expect("read change_log");
    *last = rows.last().map_or(*last, |(_, seq)| *seq);
    rows.into_iter().map(|(id, _)| id).collect()
}
