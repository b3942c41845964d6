//! A private RabbitMQ cluster for failover tests: three nodes of the machine's installed
//! `rabbitmq-server`, each with its own node name, ports, data and log folders and an Erlang cookie
//! of our own, so the machine's own node (on 5672) is never touched. Nodes can be killed with
//! SIGKILL and restarted; everything is killed and removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
const QUEUES: &str = "/usr/lib/rabbitmq/bin/rabbitmq-queues";

pub struct RabbitCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

struct Node {
    name: String,
    amqp_port: u16,
    dist_port: u16,
    /// RabbitMQ's Prometheus plugin listens here, when the cluster was started with it.
    prometheus_port: Option<u16>,
}

/// A free port below Linux's ephemeral range (32768+): a port from that range, freed again for the
/// node to bind, can meanwhile be taken by any outgoing connection on the machine.
fn free_port() -> u16 {
    loop {
        let port = rand::random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn short_hostname() -> String {
    let out = Command::new("hostname").arg("-s").output().expect("hostname");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl RabbitCluster {
    /// Starts `size` clustered nodes, or returns `None` (saying why) where `rabbitmq-server` is not
    /// installed.
    pub fn start(size: usize) -> Option<Self> {
        Self::start_with(size, false)
    }

    /// One node with RabbitMQ's Prometheus plugin on a port of its own (the metrics operators
    /// scrape for the backlog), or `None` as [`Self::start`].
    pub fn start_with_prometheus() -> Option<Self> {
        Self::start_with(1, true)
    }

    fn start_with(size: usize, prometheus: bool) -> Option<Self> {
        if !Path::new(SERVER).exists() {
            eprintln!("skipping: no rabbitmq-server installed at {SERVER}; cluster tests need one");
            return None;
        }
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let dir = std::env::temp_dir().join(format!("calsync-cluster-{run}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cookie = dir.join(".erlang.cookie");
        std::fs::write(&cookie, format!("calsync-test-cookie-{run}")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        // No plugins but Prometheus' (on ports of our own): the management plugin's fixed ports
        // would clash with the machine's node.
        let plugins = if prometheus { "[rabbitmq_prometheus]." } else { "[]." };
        std::fs::write(dir.join("enabled_plugins"), plugins).unwrap();
        let host = short_hostname();
        let nodes = (1..=size)
            .map(|n| Node {
                name: format!("calsync-{run}-{n}@{host}"),
                amqp_port: free_port(),
                dist_port: free_port(),
                prometheus_port: prometheus.then(free_port),
            })
            .collect();
        let mut cluster = Self { dir, nodes };
        for n in 0..size {
            cluster.start_node(n);
        }
        for n in 1..size {
            let first = cluster.nodes[0].name.clone();
            cluster.ctl(n, &["stop_app"]);
            cluster.ctl(n, &["join_cluster", &first]);
            cluster.ctl(n, &["start_app"]);
        }
        Some(cluster)
    }

    fn node_dir(&self, n: usize) -> PathBuf {
        self.dir.join(format!("node{}", n + 1))
    }

    fn boot(&self, n: usize) {
        let node = &self.nodes[n];
        let base = self.node_dir(n);
        std::fs::create_dir_all(&base).unwrap();
        if let Some(port) = node.prometheus_port {
            let conf = format!("prometheus.tcp.ip = 127.0.0.1\nprometheus.tcp.port = {port}\n");
            std::fs::write(base.join("rabbitmq.conf"), conf).unwrap();
        }
        let status = Command::new(SERVER)
            .arg("-detached")
            .current_dir(&base)
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", base.join("log"))
            .env("RABBITMQ_PID_FILE", base.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", base.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", base.join("advanced.config"))
            .status()
            .expect("start rabbitmq-server");
        assert!(status.success(), "rabbitmq-server -detached failed for {}", node.name);
    }

    /// Boots node `n`, trying fresh ports when it does not come up (a port taken meanwhile).
    fn start_node(&mut self, n: usize) {
        for attempt in 1..=3 {
            self.boot(n);
            if self.await_startup(n) {
                return;
            }
            self.kill(n);
            eprintln!("{} did not start (attempt {attempt}); its log ends:\n{}", self.nodes[n].name, self.log_tail(n));
            self.nodes[n].amqp_port = free_port();
            self.nodes[n].dist_port = free_port();
            if self.nodes[n].prometheus_port.is_some() {
                self.nodes[n].prometheus_port = Some(free_port());
            }
        }
        panic!("{} did not start after 3 attempts", self.nodes[n].name);
    }

    fn await_startup(&self, n: usize) -> bool {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(45) {
            if self.ctl_output(n, &["await_startup", "--timeout", "10"]).status.success() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    }

    fn log_tail(&self, n: usize) -> String {
        let log = self.node_dir(n).join("log").join(format!("{}.log", self.nodes[n].name));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn ctl_output(&self, n: usize, args: &[&str]) -> std::process::Output {
        self.tool_output(CTL, n, args)
    }

    fn tool_output(&self, tool: &str, n: usize, args: &[&str]) -> std::process::Output {
        Command::new(tool)
            .arg("-n")
            .arg(&self.nodes[n].name)
            .args(args)
            .env("HOME", &self.dir)
            .output()
            .expect("rabbitmqctl")
    }

    fn ctl(&self, n: usize, args: &[&str]) {
        let out = self.ctl_output(n, args);
        assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The node leading quorum queue `queue` (of vhost `/`), asked of node `via`.
    pub fn leader_of(&self, queue: &str, via: usize) -> Option<usize> {
        let out = self.ctl_output(via, &["-q", "list_queues", "--no-table-headers", "name", "leader"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let leader = text.lines().find_map(|line| {
            let mut columns = line.split_whitespace();
            (columns.next() == Some(queue)).then(|| columns.next().unwrap_or_default().to_owned())
        })?;
        self.nodes.iter().position(|node| node.name == leader)
    }

    /// Makes node `n` the leader of quorum queue `queue`, which has a member on every node: the
    /// other members are removed (a leader is elected among who is left, so at the end that is
    /// `n`) and added back (adding members never moves the leadership). Every node must be up.
    pub fn make_leader(&self, queue: &str, n: usize) {
        let others: Vec<usize> = (0..self.nodes.len()).filter(|m| *m != n).collect();
        for &m in &others {
            self.queues(n, &["delete_member", queue, &self.nodes[m].name]);
        }
        for &m in &others {
            self.queues(n, &["add_member", queue, &self.nodes[m].name]);
        }
        let started = Instant::now();
        while self.leader_of(queue, n) != Some(n) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} did not become the leader of {queue}",
                self.nodes[n].name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn queues(&self, n: usize, args: &[&str]) {
        let out = self.tool_output(QUEUES, n, args);
        assert!(out.status.success(), "rabbitmq-queues {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `AMQP_URL` for the whole cluster (every node, comma-separated).
    pub fn amqp_url(&self) -> String {
        (0..self.nodes.len()).map(|n| self.node_url(n)).collect::<Vec<_>>().join(",")
    }

    pub fn node_url(&self, n: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[n].amqp_port)
    }

    /// Node `n`'s Prometheus endpoint (`http://127.0.0.1:<port>`), when started with the plugin.
    pub fn prometheus_url(&self, n: usize) -> Option<String> {
        self.nodes[n].prometheus_port.map(|port| format!("http://127.0.0.1:{port}"))
    }

    /// The node listening on `127.0.0.1:<port>`.
    pub fn node_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|node| node.amqp_port == port)
    }

    /// SIGKILL: the node dies without a word to its peers or clients. A node already dead (killed
    /// earlier in the run; teardown kills every node) is left alone.
    pub fn kill(&self, n: usize) {
        let pid = std::fs::read_to_string(self.node_dir(n).join("pid")).unwrap_or_default();
        let Ok(pid) = pid.trim().parse::<i32>() else { return };
        let alive = || Path::new(&format!("/proc/{pid}")).exists();
        if !alive() {
            return;
        }
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        let started = Instant::now();
        while alive() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a killed node again (same name, ports and data: it rejoins the cluster).
    pub fn restart(&self, n: usize) {
        self.boot(n);
        assert!(self.await_startup(n), "{} did not restart; its log ends:\n{}", self.nodes[n].name, self.log_tail(n));
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for n in 0..self.nodes.len() {
            self.kill(n);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
