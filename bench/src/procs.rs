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
