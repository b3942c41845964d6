//! Starting the release binaries as processes and reading their memory.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// Resident memory of a process: idle, and the peak under the benchmark's load.
pub struct Memory {
    pub idle_mib: f64,
    pub peak_mib: f64,
}

pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("exe dir")?.join(name);
    if !path.exists() {
        bail!("{} missing: run through `cargo run --release -p calsync-bench`, which builds it", path.display());
    }
    Ok(path)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, envs: &[(&str, String)], args: &[&str]) -> anyhow::Result<Self> {
        let mut command = Command::new(bin(name)?);
        command
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.clone())))
            .env("RUST_LOG", "warn")
            .env("LOG_FORMAT", "json");
        command.stdout(Stdio::null()).stderr(Stdio::null()).stdin(Stdio::null()).kill_on_drop(true);
        Ok(Self { child: command.spawn().with_context(|| format!("starting {name}"))? })
    }

    fn status_kb(&self, field: &str) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
    }

    /// Resident set size now, in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.status_kb("VmRSS:").unwrap_or(0) as f64 / 1024.0
    }

    /// Peak resident set size since start, in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// What a bench run gives calsync-ingest besides its address and `DATABASE_URL`; `extra` adds
/// settings to those.
pub struct IngestArgs<'a> {
    pub amqp_url: String,
    pub prefix: &'a str,
    pub signing_key: &'a str,
    pub token_key: String,
    pub extra: Vec<(&'static str, String)>,
}

/// Starts calsync-ingest on a free port and waits until it is ready: the process and its base URL.
pub async fn start_ingest(ctx: &crate::Ctx, args: IngestArgs<'_>) -> anyhow::Result<(Proc, String)> {
    let port = free_port()?;
    let mut env = vec![
        ("INGEST_ADDR", format!("127.0.0.1:{port}")),
        ("CALENDLY_WEBHOOK_SIGNING_KEYS", args.signing_key.to_owned()),
        ("TOKEN_ENCRYPTION_KEY", args.token_key),
        ("AMQP_URL", args.amqp_url),
        ("AMQP_TOPOLOGY_PREFIX", args.prefix.to_owned()),
        ("DATABASE_URL", ctx.db_url.clone()),
    ];
    env.extend(args.extra);
    let ingest = Proc::spawn("calsync-ingest", &env, &[])?;
    let url = format!("http://127.0.0.1:{port}");
    wait_ok(&ctx.http, &format!("{url}/readyz")).await?;
    Ok((ingest, url))
}

/// Polls `url` until it answers 2xx.
pub async fn wait_ok(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    for _ in 0..600 {
        if http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} never became ready")
}

/// CPU time (user + system) process `pid` has used so far, from `/proc/<pid>/stat`.
pub fn cpu_of(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces), counted from field 3: utime is 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / CLOCK_TICKS_PER_SECOND))
}

/// Linux's USER_HZ, what `/proc/<pid>/stat` counts CPU time in.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// The machine's own RabbitMQ node (Debian's service: `-home /var/lib/rabbitmq`), not a private
/// cluster node a benchmark started.
pub fn machine_broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (cmdline.contains("beam.smp") && cmdline.contains("-home /var/lib/rabbitmq")).then_some(pid)
    })
}

/// Whose CPU a [`CpuMeter`] measures.
#[derive(Clone, Copy)]
pub enum Who {
    /// One process (`None`: unknown, reported as `?`).
    Pid(Option<u32>),
    /// Every process with this command name (PostgreSQL's backends come and go with the pools: a
    /// backend that exits during the stretch takes its CPU with it, so this is a lower bound).
    Comm(&'static str),
}

impl Who {
    fn pids(self) -> Vec<u32> {
        match self {
            Self::Pid(pid) => pid.into_iter().collect(),
            Self::Comm(name) => std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == name))
                .collect(),
        }
    }
}

/// CPU used by the measured processes over a stretch of a benchmark, and by the whole machine.
pub struct CpuMeter {
    who: Vec<Who>,
    start: Vec<std::collections::HashMap<u32, Duration>>,
    machine_start: Option<Duration>,
}

impl CpuMeter {
    pub fn start(who: Vec<Who>) -> Self {
        let start = who.iter().map(|w| w.pids().into_iter().filter_map(|p| Some((p, cpu_of(p)?))).collect()).collect();
        Self { who, start, machine_start: machine_busy() }
    }

    /// CPU each of them used since [`Self::start`], in the order given.
    pub fn used(&self) -> Vec<Option<Duration>> {
        self.who
            .iter()
            .zip(&self.start)
            .map(|(who, start)| {
                let pids = who.pids();
                if pids.is_empty() {
                    return None;
                }
                Some(
                    pids.into_iter()
                        .filter_map(|p| Some(cpu_of(p)?.saturating_sub(*start.get(&p).unwrap_or(&Duration::ZERO))))
                        .sum(),
                )
            })
            .collect()
    }

    /// CPU the whole machine spent (all cores, everything but idle and I/O wait) since the start.
    pub fn machine(&self) -> Option<Duration> {
        Some(machine_busy()?.saturating_sub(self.machine_start?))
    }

    /// The machine's busy share of all its cores over the `seconds` since the start (0.0–1.0).
    pub fn busy_share(&self, seconds: f64) -> Option<f64> {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
        Some(self.machine()?.as_secs_f64() / (seconds * cores))
    }
}

/// How long [`settle`] watches the machine at a time.
const SETTLE_WINDOW: Duration = Duration::from_millis(500);

/// Waits, for at most `limit`, until the whole machine has spent under a tenth of its cores for one
/// [`SETTLE_WINDOW`]: what a loop leaves behind (RabbitMQ trimming a purged quorum queue's log,
/// say) is then not charged to the next loop. How long it waited, and whether the machine got
/// that quiet (when not, the next loop runs anyway and the caller says so).
pub async fn settle(limit: Duration) -> (Duration, bool) {
    let started = std::time::Instant::now();
    loop {
        let meter = CpuMeter::start(Vec::new());
        tokio::time::sleep(SETTLE_WINDOW).await;
        if meter.busy_share(SETTLE_WINDOW.as_secs_f64()).is_some_and(|busy| busy < 0.1) {
            return (started.elapsed(), true);
        }
        if started.elapsed() >= limit {
            return (started.elapsed(), false);
        }
    }
}

/// Busy CPU time of the machine since boot, from `/proc/stat`'s first line.
fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle (3) and iowait (4).
    let busy: u64 = fields.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    Some(Duration::from_secs_f64(busy as f64 / CLOCK_TICKS_PER_SECOND))
}

/// CPU per unit of work, in µs, when known.
pub fn micros(cpu: Option<Duration>, units: u64) -> Option<f64> {
    cpu.filter(|_| units > 0).map(|cpu| cpu.as_secs_f64() * 1e6 / units as f64)
}

/// [`micros`] as text (`?` when unknown).
pub fn micros_per(cpu: Option<Duration>, units: u64) -> String {
    micros_text(micros(cpu, units))
}

/// µs as text (`?` when unknown).
pub fn micros_text(us: Option<f64>) -> String {
    us.map_or("?".into(), |us| format!("{us:.0} µs"))
}

/// A share (0.0–1.0) as a whole percentage (`?` when unknown).
pub fn share_text(share: Option<f64>) -> String {
    share.map_or("?".into(), |s| format!("{:.0}%", 100.0 * s))
}
