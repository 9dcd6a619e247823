//! `voip-push-bench`: the end-to-end benchmark behind `make bench`.
//!
//! Everything runs on this machine: the APNs simulator (TLS + HTTP/2) in this
//! process, real RabbitMQ and Postgres, and the worker as separate processes of
//! the release binary, so their CPU time and peak memory can be read from /proc.
//! The bench uses its own database and AMQP names, deletes them at the end, and
//! stops by itself at its deadline. See the README's "Benchmark" section.

mod load;
mod phases;
mod procs;
mod report;
mod setup;
mod slow;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use voip_push_worker::config::Config;
use voip_push_worker::event::{now_ms, now_rfc3339};

use crate::load::{Collector, Producer};
use crate::phases::{event, latency, throughput, user_of};
use crate::procs::round3;
use crate::report::{Report, WorkerSummary};
use crate::setup::Bench;

#[derive(Parser)]
#[command(
    name = "voip-push-bench",
    about = "End-to-end benchmark: throughput, latency and cost per push"
)]
struct Args {
    /// Registered users; every fifth has two devices.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Events in each pre-loaded backlog (reference, one worker, two workers).
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Fixed offered loads for the latency phases, events/s; two last phases run at
    /// half of the one-worker throughput and at all of it (saturation).
    #[arg(long, value_delimiter = ',', default_value = "200,1000")]
    rates: Vec<f64>,
    /// How long each latency phase publishes.
    #[arg(long, default_value_t = 10)]
    paced_secs: u64,
    /// The bench's own database: dropped and created at the start, dropped at the end.
    /// Plaintext on loopback by default, so figures compare across versions (the
    /// worker's own default, libpq's `prefer`, encrypts when the server offers TLS).
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/vpw_bench?sslmode=disable"
    )]
    postgres_url: String,
    #[arg(long, default_value = "target/release/voip-push-worker")]
    worker_bin: PathBuf,
    #[arg(long, default_value = "target/bench/report.json")]
    out: PathBuf,
    /// The whole run stops here, whatever it is doing.
    #[arg(long, default_value_t = 420)]
    deadline_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    let started_at = now_rfc3339();
    let deadline = started + Duration::from_secs(args.deadline_secs);
    if !args.worker_bin.exists() {
        eprintln!(
            "bench: {} not found; build it first (cargo build --release --bins)",
            args.worker_bin.display()
        );
        return ExitCode::from(2);
    }
    // VPW__AMQP__URL and the worker's tuning (VPW__WORKER__CONCURRENCY, …) come
    // from the environment; names and the database are the bench's own.
    let cfg = match Config::load(None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let loadavg_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("bench: preparing database, devices, simulator");
    let prepare = Bench::prepare(cfg, &args.postgres_url, args.users);
    let bench = match tokio::time::timeout(Duration::from_secs(120), prepare).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            eprintln!("bench: setup failed: {e}");
            return ExitCode::FAILURE;
        }
        Err(_) => {
            eprintln!("bench: setup took over 120 s");
            return ExitCode::FAILURE;
        }
    };
    let outcome = tokio::select! {
        r = run(&bench, &args, deadline) => r,
        _ = tokio::time::sleep_until(deadline.into()) => {
            Err(format!("deadline of {} s reached", args.deadline_secs))
        }
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    // Workers were killed when their handles dropped; now the bench's objects go.
    bench.teardown().await;
    let mut report = match outcome {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    report.started_at = started_at;
    report.loadavg_before = loadavg_before;
    report.total_seconds = round3(started.elapsed().as_secs_f64());
    report.judge();
    print!("{}", report.table());
    let json = serde_json::to_string_pretty(&report).expect("the report serialises");
    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&args.out, json + "\n") {
        eprintln!("bench: cannot write {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    println!("report: {}", args.out.display());
    ExitCode::SUCCESS
}

/// Stopping a worker: SIGTERM, then SIGKILL after this.
const STOP_GRACE: Duration = Duration::from_secs(10);

async fn run(bench: &Bench, args: &Args, deadline: Instant) -> Result<Report, String> {
    let cfg = &bench.cfg;
    // The reference consumes with the worker's own prefetch.
    let prefetch = voip_push_worker::amqp::prefetch_for(cfg.worker.concurrency);
    let collector = Collector::start(&cfg.amqp, &bench.results_queue).await?;
    let producer = Producer::open(&cfg.amqp).await?;
    let mut workers_seen = Vec::new();

    eprintln!(
        "bench: reference — {} events on a quorum queue, consume + ack",
        args.events
    );
    let reference = load::reference(
        &cfg.amqp,
        &bench.reference_queue,
        prefetch,
        args.events,
        |i| event(format!("ref-{i}"), user_of(bench, 0, i), now_ms()),
        deadline,
    )
    .await?;
    eprintln!("bench:   {:.0} messages/s", reference.per_sec);

    eprintln!("bench: one worker — backlog of {} events", args.events);
    let (one, mut w1) = throughput(
        bench,
        &producer,
        &collector,
        &args.worker_bin,
        1,
        1,
        args.events,
        reference.per_sec,
        deadline,
    )
    .await?;
    eprintln!("bench:   {:.0} events/s", one.events_per_sec);

    let mut loads: Vec<(String, f64)> = args
        .rates
        .iter()
        .map(|r| (format!("{r:.0}/s"), *r))
        .collect();
    let saturation = one.events_per_sec.floor().max(1.0);
    let half = (saturation / 2.0).floor().max(1.0);
    loads.push((format!("half of saturation ({half:.0}/s)"), half));
    loads.push((format!("saturation ({saturation:.0}/s)"), saturation));
    let mut lat = Vec::new();
    for (k, (label, rate)) in loads.into_iter().enumerate() {
        eprintln!("bench: latency at {label} for {} s", args.paced_secs);
        let l = latency(
            bench,
            &producer,
            &collector,
            &w1,
            2 + k,
            label,
            rate,
            Duration::from_secs(args.paced_secs),
            deadline,
        )
        .await?;
        eprintln!(
            "bench:   p50 {} p95 {} p99 {} ms",
            l.p50_ms, l.p95_ms, l.p99_ms
        );
        lat.push(l);
    }
    let w = w1.remove(0);
    workers_seen.push(WorkerSummary {
        role: "one worker".into(),
        sample: w.sample().await?,
    });
    w.stop(STOP_GRACE).await;

    eprintln!("bench: two workers — backlog of {} events", args.events);
    let (two, w2) = throughput(
        bench,
        &producer,
        &collector,
        &args.worker_bin,
        10,
        2,
        args.events,
        reference.per_sec,
        deadline,
    )
    .await?;
    eprintln!("bench:   {:.0} events/s", two.events_per_sec);
    for (k, w) in w2.into_iter().enumerate() {
        workers_seen.push(WorkerSummary {
            role: format!("two workers, #{}", k + 1),
            sample: w.sample().await?,
        });
        w.stop(STOP_GRACE).await;
    }
    producer.close().await;
    collector.close().await;

    Ok(Report {
        started_at: String::new(),
        commit: git_commit(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg_before: String::new(),
        users: bench.users(),
        devices: bench.devices.len(),
        worker_concurrency: cfg.worker.concurrency,
        prefetch,
        reference,
        throughput: vec![one, two],
        latency: lat,
        workers: workers_seen,
        targets: Vec::new(),
        total_seconds: 0.0,
    })
}

/// The commit measured, with `+dirty` when the tree has changes.
fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty=+dirty"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
