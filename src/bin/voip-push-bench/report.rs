//! The report: what each phase measured, the targets it is held against, the
//! table on stdout and the JSON in `target/bench/report.json`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::load::Reference;
use crate::procs::{round3, CpuUse, WorkerSample};
use crate::slow::Slow;

#[derive(Debug, Serialize)]
pub struct Report {
    pub started_at: String,
    pub commit: Option<String>,
    pub cores: usize,
    /// /proc/loadavg before the run: other work on the machine skews every figure.
    pub loadavg_before: String,
    pub users: usize,
    pub devices: usize,
    pub worker_concurrency: u16,
    /// The worker's prefetch, and the reference's.
    pub prefetch: u16,
    pub reference: Reference,
    pub throughput: Vec<Throughput>,
    pub latency: Vec<Latency>,
    pub workers: Vec<WorkerSummary>,
    pub targets: Vec<Target>,
    pub total_seconds: f64,
}

/// A pre-loaded backlog worked off by `workers` processes.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub workers: usize,
    pub events: usize,
    pub pushes: u64,
    pub results_by_status: BTreeMap<String, u64>,
    /// From the first result to the last.
    pub seconds: f64,
    pub events_per_sec: f64,
    pub pushes_per_sec: f64,
    pub ratio_to_reference: f64,
    pub worker_cpu_seconds: f64,
    pub cpu_seconds_per_1000_pushes: f64,
    /// APNs requests the simulator answered, by status code.
    pub apns_requests_by_status: BTreeMap<u16, u64>,
    pub cpu: CpuUse,
}

/// Publish → APNs request at one offered load.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub load: String,
    pub offered_per_sec: f64,
    pub achieved_per_sec: f64,
    pub events: usize,
    /// APNs requests answered 200 and matched to their event by `apns-collapse-id`.
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Where the samples slower than [`Slow::MS`] sit in the phase.
    pub slow: Slow,
    pub cpu: CpuUse,
}

#[derive(Debug, Serialize)]
pub struct WorkerSummary {
    pub role: String,
    #[serde(flatten)]
    pub sample: WorkerSample,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub name: &'static str,
    pub target: &'static str,
    pub measured: String,
    pub met: bool,
    pub note: String,
}

/// CPU seconds of one component in a phase.
fn cpu_of(cpu: &CpuUse, component: &str) -> f64 {
    cpu.cpu_seconds
        .iter()
        .filter(|(name, _)| name == component)
        .map(|(_, s)| s)
        .sum()
}

/// Whole-job cost of the one-worker phase, in ms of CPU per 1,000 events: the
/// worker, and the Postgres and RabbitMQ work it causes.
fn cost_targets(one: &Throughput, reference: &Reference) -> Vec<Target> {
    let per_1k = |secs: f64| secs * 1000.0 / one.events as f64 * 1000.0;
    // What RabbitMQ spends to hand out and take back the events alone.
    let floor =
        cpu_of(&reference.cpu, "rabbitmq") * 1000.0 / reference.messages.max(1) as f64 * 1000.0;
    let (pg, worker, mq) = (
        per_1k(cpu_of(&one.cpu, "postgres")),
        per_1k(cpu_of(&one.cpu, "worker")),
        per_1k(cpu_of(&one.cpu, "rabbitmq")),
    );
    let total = pg + worker + mq;
    let target = |name, target, limit: f64, ms: f64| Target {
        name,
        target,
        measured: format!("{ms:.0} ms"),
        met: ms <= limit,
        note: "CPU per 1,000 events, one-worker phase".into(),
    };
    let mut all = target(
        "worker + Postgres + RabbitMQ per 1,000",
        "<= 300 ms",
        300.0,
        total,
    );
    all.note = format!(
        "CPU per 1,000 events, one-worker phase; RabbitMQ {mq:.0} of it, against {floor:.0} \
         for the reference's consume + ack alone"
    );
    vec![
        target("Postgres CPU per 1,000 events", "<= 100 ms", 100.0, pg),
        target("worker CPU per 1,000 events", "<= 80 ms", 80.0, worker),
        all,
    ]
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

impl Report {
    /// Holds the figures against the targets.
    pub fn judge(&mut self) {
        let mut t = Vec::new();
        let one = self.throughput.iter().find(|x| x.workers == 1);
        let two = self.throughput.iter().find(|x| x.workers == 2);
        if let Some(one) = one {
            t.push(Target {
                name: "pipeline vs no-work reference",
                target: ">= 25%",
                measured: format!("{:.0}%", one.ratio_to_reference * 100.0),
                met: one.ratio_to_reference >= 0.25,
                note: format!(
                    "{:.0} events/s against {:.0} messages/s consumed and acked",
                    one.events_per_sec, self.reference.per_sec
                ),
            });
        }
        if let Some(one) = one {
            t.extend(cost_targets(one, &self.reference));
        }
        if let Some(l) = self.latency.iter().find(|l| l.offered_per_sec == 1000.0) {
            t.push(Target {
                name: "p99 publish -> APNs at 1,000 events/s",
                target: "<= 25 ms",
                measured: format!("{} ms", l.p99_ms),
                met: l.p99_ms <= 25.0,
                note: format!(
                    "p50 {} ms, p95 {} ms, {} samples",
                    l.p50_ms, l.p95_ms, l.samples
                ),
            });
        }
        if let Some(l) = self
            .latency
            .iter()
            .find(|l| l.load.starts_with("half of saturation"))
        {
            t.push(Target {
                name: "p99 publish -> APNs at half of saturation",
                target: "<= 50 ms",
                measured: format!("{} ms", l.p99_ms),
                met: l.p99_ms <= 50.0,
                note: format!("{}; p50 {} ms, p95 {} ms", l.load, l.p50_ms, l.p95_ms),
            });
        }
        if let (Some(one), Some(two)) = (one, two) {
            let scale = two.events_per_sec / one.events_per_sec;
            t.push(Target {
                name: "two workers vs one",
                target: ">= 1.6x where the machine is not the limit",
                measured: format!("{scale:.2}x"),
                met: scale >= 1.6,
                note: format!(
                    "machine {:.0}% busy with two workers ({}); one worker: {:.0}% busy",
                    two.cpu.machine_busy * 100.0,
                    breakdown(&two.cpu),
                    one.cpu.machine_busy * 100.0
                ),
            });
        }
        let peak = self
            .workers
            .iter()
            .map(|w| w.sample.peak_rss_mb)
            .fold(0.0, f64::max);
        t.push(Target {
            name: "worker peak RSS",
            target: "<= 50 MB",
            measured: format!("{peak:.1} MB"),
            met: peak > 0.0 && peak <= 50.0,
            note: "VmHWM of each worker process, at its end".into(),
        });
        let tokens: Vec<f64> = self
            .workers
            .iter()
            .map(|w| w.sample.provider_tokens_signed)
            .collect();
        t.push(Target {
            name: "provider tokens",
            target: "exactly 1 per key per 50 min (per process)",
            measured: tokens
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            met: !tokens.is_empty() && tokens.iter().all(|&n| n == 1.0),
            note: "one key; every worker process ran well under the refresh period".into(),
        });
        self.targets = t;
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "voip-push-worker benchmark  {}  commit {}  {} cores  load before {}",
            self.started_at,
            self.commit.as_deref().unwrap_or("?"),
            self.cores,
            self.loadavg_before
        );
        let _ = writeln!(
            s,
            "{} users, {} devices, worker concurrency {}, prefetch {} (the reference's too)\n",
            self.users, self.devices, self.worker_concurrency, self.prefetch
        );
        let _ = writeln!(s, "Throughput (pre-loaded backlog, first result to last)");
        let _ = writeln!(
            s,
            "  {:<28} {:>8} {:>9} {:>9} {:>7} {:>11} {:>6}",
            "", "events", "events/s", "pushes/s", "vs ref", "CPU s/1k", "busy"
        );
        let r = &self.reference;
        let _ = writeln!(
            s,
            "  {:<28} {:>8} {:>9.0} {:>9} {:>7} {:>11} {:>6}",
            format!("reference (consume+ack, {})", r.prefetch),
            r.messages,
            r.per_sec,
            "-",
            "100%",
            "-",
            "-"
        );
        for t in &self.throughput {
            let _ = writeln!(
                s,
                "  {:<28} {:>8} {:>9.0} {:>9.0} {:>6.0}% {:>11.3} {:>5.0}%",
                format!("pipeline, {} worker(s)", t.workers),
                t.events,
                t.events_per_sec,
                t.pushes_per_sec,
                t.ratio_to_reference * 100.0,
                t.cpu_seconds_per_1000_pushes,
                t.cpu.machine_busy * 100.0
            );
        }
        let _ = writeln!(s, "  CPU s, reference: {}", breakdown(&r.cpu));
        for t in &self.throughput {
            let _ = writeln!(s, "  CPU s, {} worker(s): {}", t.workers, breakdown(&t.cpu));
        }
        let _ = writeln!(
            s,
            "\nLatency, publish (sentAt) -> APNs request (one worker)"
        );
        let _ = writeln!(
            s,
            "  {:<22} {:>9} {:>8} {:>7} {:>7} {:>7} {:>7}",
            "offered load", "achieved", "samples", "p50 ms", "p95 ms", "p99 ms", "max ms"
        );
        for l in &self.latency {
            let _ = writeln!(
                s,
                "  {:<22} {:>9.0} {:>8} {:>7} {:>7} {:>7} {:>7}",
                l.load, l.achieved_per_sec, l.samples, l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms
            );
        }
        // A queue that grows (saturation) is slow throughout: only stalls are told.
        for l in self
            .latency
            .iter()
            .filter(|l| l.slow.samples * 2 < l.samples)
        {
            if let Some(from) = &l.slow.from {
                let seconds: Vec<String> = (l.slow.by_second.iter())
                    .map(|(s, n)| format!("{s} ({n})"))
                    .collect();
                let _ = writeln!(
                    s,
                    "  {}: {} samples over {} ms, by second of the phase: {}; from {from}",
                    l.load,
                    l.slow.samples,
                    Slow::MS,
                    seconds.join(", ")
                );
            }
        }
        let _ = writeln!(s, "\nWorker processes");
        let _ = writeln!(
            s,
            "  {:<22} {:>7} {:>12} {:>15} {:>17}",
            "", "CPU s", "peak RSS MB", "provider tokens", "APNs connections"
        );
        for w in &self.workers {
            let _ = writeln!(
                s,
                "  {:<22} {:>7.2} {:>12.1} {:>15} {:>17}",
                w.role,
                w.sample.cpu_seconds,
                w.sample.peak_rss_mb,
                w.sample.provider_tokens_signed,
                w.sample.apns_connections_opened
            );
        }
        for w in &self.workers {
            let stages: Vec<String> = w
                .sample
                .stage_mean_ms
                .iter()
                .map(|m| format!("{} {:.1}", m.stage, m.mean_ms))
                .collect();
            let _ = writeln!(
                s,
                "  {:<22} mean ms per step: {}",
                w.role,
                stages.join(", ")
            );
            let batches: Vec<String> = w
                .sample
                .batch_mean_requests
                .iter()
                .filter(|b| b.mean_requests > 0.0)
                .map(|b| format!("{} {:.1}", b.statement, b.mean_requests))
                .collect();
            if !batches.is_empty() {
                let _ = writeln!(
                    s,
                    "  {:<22} mean requests per shared statement: {}",
                    "",
                    batches.join(", ")
                );
            }
        }
        let _ = writeln!(s, "\nTargets");
        for t in &self.targets {
            let _ = writeln!(
                s,
                "  [{}] {:<40} {:<12} target {}  ({})",
                if t.met { "met" } else { "MISSED" },
                t.name,
                t.measured,
                t.target,
                t.note
            );
        }
        let _ = writeln!(s, "\ntotal {:.0} s", self.total_seconds);
        s
    }
}

/// "worker 12.3, rabbitmq 8.1, ..." from a CPU use.
pub fn breakdown(c: &CpuUse) -> String {
    c.cpu_seconds
        .iter()
        .map(|(n, v)| format!("{n} {}", round3(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}
