//! Worker processes of the release binary, and what /proc and `/metrics` say
//! about them and about the rest of the machine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use voip_push_worker::config::Config;

/// A `voip-push-worker run` process. Dropping it kills the process, so a bench
/// that fails or times out leaves nothing behind.
pub struct WorkerProc {
    child: Child,
    pub http: SocketAddr,
    pub log: std::path::PathBuf,
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free loopback port: bound, read and released, so the worker's `/metrics`
/// is at a known address.
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

impl WorkerProc {
    /// Starts the worker configured like `cfg`, through the environment an
    /// operator would set. Other `VPW__*` variables of the bench's environment
    /// (concurrency, pool size) pass through.
    pub fn spawn(bin: &Path, cfg: &Config, log: std::path::PathBuf) -> Result<Self, String> {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()?)
            .parse()
            .map_err(|e| format!("{e}"))?;
        let stderr = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = Command::new(bin);
        // The values themselves come from process_env: a *_FILE variable of
        // ours beside them would be "set both".
        for var in voip_push_worker::config::secrets::file_env_vars() {
            command.env_remove(var);
        }
        let child = command
            .arg("run")
            .env_remove("VPW_CONFIG")
            .env("VPW_LOG", std::env::var("VPW_LOG").unwrap_or("warn".into()))
            .envs(cfg.process_env())
            .env("VPW__HTTP__LISTEN", http.to_string())
            // A short drain: at the end of a phase nothing is in flight.
            .env("VPW__WORKER__DRAIN_TIMEOUT_SECS", "5")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        Ok(Self { child, http, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/readyz` answers 200 (consuming, Postgres answering).
    pub async fn ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the worker exited ({status}) before it was ready; see {}",
                    self.log.display()
                ));
            }
            if let Ok((200, _)) = http_get(self.http, "/readyz").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the worker was not ready within {timeout:?}; see {}",
                    self.log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the process has cost so far, and what its metrics say.
    pub async fn sample(&self) -> Result<WorkerSample, String> {
        let metrics = http_get(self.http, "/metrics").await?.1;
        Ok(WorkerSample {
            cpu_seconds: cpu_seconds(self.pid()).unwrap_or(0.0),
            peak_rss_mb: peak_rss_kb(self.pid()).unwrap_or(0) as f64 / 1024.0,
            provider_tokens_signed: metric_sum(&metrics, "voip_push_provider_tokens_signed_total"),
            apns_connections_opened: metric_sum(
                &metrics,
                "voip_push_apns_connections_opened_total",
            ),
            apns_requests: metric_sum(&metrics, "voip_push_apns_requests_total"),
            stage_mean_ms: stage_means(&metrics),
            batch_mean_requests: batch_means(&metrics),
        })
    }

    /// SIGTERM (a clean drain and exit), then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Drop kills it.
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WorkerSample {
    pub cpu_seconds: f64,
    pub peak_rss_mb: f64,
    pub provider_tokens_signed: f64,
    pub apns_connections_opened: f64,
    pub apns_requests: f64,
    /// Mean milliseconds an event spent in each step, over the process's life
    /// (`voip_push_stage_duration_seconds`).
    pub stage_mean_ms: Vec<StageMean>,
    /// Mean requests each shared statement served, over the process's life
    /// (`voip_push_batch_requests`).
    pub batch_mean_requests: Vec<BatchMean>,
}

/// A minimal HTTP/1.1 GET on loopback: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| format!("GET {path}: no answer within 5 s"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: no status line"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on Linux
/// everywhere we run).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The postmaster of the bench's Postgres server, once known: only its
/// processes count as Postgres (another cluster on the machine, or another
/// database user's tests, are not the worker's cost).
pub static POSTMASTER: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// The parent of a process (field 4 of /proc/PID/stat).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// Whether a `postgres` process belongs to the bench's server.
fn ours(pid: u32) -> bool {
    match POSTMASTER.get() {
        Some(&postmaster) => pid == postmaster || parent_pid(pid) == Some(postmaster),
        None => true,
    }
}

/// User + system CPU ticks of a process (fields 14 and 15 of /proc/PID/stat,
/// counted after the parenthesised command name, which may contain spaces).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub fn cpu_seconds(pid: u32) -> Option<f64> {
    Some(cpu_ticks(pid)? as f64 / clock_ticks())
}

/// Peak resident set size (VmHWM), kB.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU use of the whole machine and of the programs that share it, between two
/// snapshots: to tell whether a phase was limited by the machine.
#[derive(Clone)]
pub struct CpuSnapshot {
    at: Instant,
    /// (busy, total) ticks of all CPUs, from /proc/stat.
    machine: (u64, u64),
    /// Ticks per process of the programs we name.
    by_pid: HashMap<u32, (Component, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Broker,
    Postgres,
    Bench,
    Worker,
}

impl Component {
    pub fn label(self) -> &'static str {
        match self {
            Component::Broker => "rabbitmq",
            Component::Postgres => "postgres",
            Component::Bench => "bench (simulator, producer, collector)",
            Component::Worker => "worker",
        }
    }
}

fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

impl CpuSnapshot {
    /// Now: the machine, RabbitMQ (`beam.smp`), the processes of the bench's
    /// Postgres server, this bench, and the given workers.
    pub fn take(workers: &[u32]) -> Self {
        let mut by_pid = HashMap::new();
        let me = std::process::id();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let component = match comm.trim() {
                    _ if pid == me => Component::Bench,
                    _ if workers.contains(&pid) => Component::Worker,
                    "beam.smp" => Component::Broker,
                    "postgres" if ours(pid) => Component::Postgres,
                    _ => continue,
                };
                if let Some(t) = cpu_ticks(pid) {
                    by_pid.insert(pid, (component, t));
                }
            }
        }
        Self {
            at: Instant::now(),
            machine: machine_ticks(),
            by_pid,
        }
    }

    /// CPU seconds per component since `earlier` (processes that started in
    /// between count from zero), and the machine's busy share (0..1) and
    /// its busy CPU seconds.
    pub fn since(&self, earlier: &CpuSnapshot) -> CpuUse {
        let hz = clock_ticks();
        let mut by_component: HashMap<Component, f64> = HashMap::new();
        for (pid, (c, t)) in &self.by_pid {
            let before = earlier.by_pid.get(pid).map(|(_, t)| *t).unwrap_or(0);
            *by_component.entry(*c).or_default() += t.saturating_sub(before) as f64 / hz;
        }
        let busy = self.machine.0.saturating_sub(earlier.machine.0) as f64;
        let total = self.machine.1.saturating_sub(earlier.machine.1) as f64;
        let mut components: Vec<(String, f64)> = by_component
            .into_iter()
            .map(|(c, s)| (c.label().to_string(), round3(s)))
            .collect();
        components.sort_by(|a, b| b.1.total_cmp(&a.1));
        let busy_seconds = busy / hz;
        let named: f64 = components.iter().map(|c| c.1).sum();
        components.push(("other".into(), round3((busy_seconds - named).max(0.0))));
        CpuUse {
            wall_seconds: round3(self.at.duration_since(earlier.at).as_secs_f64()),
            machine_busy: round3(if total > 0.0 { busy / total } else { 0.0 }),
            cpu_seconds: components,
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CpuUse {
    pub wall_seconds: f64,
    /// Share of all cores busy, 0..1.
    pub machine_busy: f64,
    /// CPU seconds per component, largest first, then `other`.
    pub cpu_seconds: Vec<(String, f64)>,
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

mod scrape;
#[cfg(test)]
mod tests;

use scrape::{batch_means, metric_sum, stage_means};
pub use scrape::{BatchMean, StageMean};
