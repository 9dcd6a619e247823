//! The measured phases: a backlog worked off by N worker processes, and paced
//! load on a running worker.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use voip_push_worker::event::now_ms;

use crate::load::{Collector, Message, Producer};
use crate::procs::{round3, CpuSnapshot, WorkerProc};
use crate::report::{percentile, Latency, Throughput};
use crate::setup::{user_id, Bench};
use crate::slow::Slow;

/// A stride coprime with the user count spreads consecutive events over users
/// the way unrelated calls would, and gives every user the same share.
const USER_STRIDE: usize = 7919;

/// How long a worker may take to start consuming.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What producers publish: a call event stamped with `sentAt` (epoch ms).
pub fn event(call_id: String, user: usize, sent_at_ms: i64) -> Message {
    let body = format!(
        r#"{{"type":"call.incoming","callId":"{call_id}","toUserId":"{}","fromUserId":"bench-caller","fromDisplayName":"Bench Caller","room":"room-{call_id}","hasVideo":false,"sentAt":{sent_at_ms}}}"#,
        user_id(user)
    );
    (call_id, body.into_bytes())
}

/// The user event `i` of a phase rings.
pub fn user_of(bench: &Bench, phase: usize, i: usize) -> usize {
    (i * USER_STRIDE + phase * 101) % bench.users()
}

/// The worker processes of a phase and where their logs go.
pub async fn start_workers(
    bench: &Bench,
    bin: &Path,
    role: &str,
    n: usize,
) -> Result<Vec<WorkerProc>, String> {
    // Start them all before waiting for any, so they begin together.
    let mut workers = (0..n)
        .map(|k| {
            WorkerProc::spawn(
                bin,
                &bench.cfg,
                bench.dir.join(format!("worker-{role}-{k}.log")),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    for w in &mut workers {
        w.ready(READY_TIMEOUT).await?;
    }
    Ok(workers)
}

fn status_diff(
    after: BTreeMap<String, u64>,
    before: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .into_iter()
        .map(|(k, v)| {
            let b = before.get(&k).copied().unwrap_or(0);
            (k, v - b)
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Pre-loads `events` call events, starts `n` workers on the queue and times
/// them from the first result to the last. The workers keep running.
#[allow(clippy::too_many_arguments)]
pub async fn throughput(
    bench: &Bench,
    producer: &Producer,
    collector: &Collector,
    bin: &Path,
    phase: usize,
    n: usize,
    events: usize,
    reference_per_sec: f64,
    deadline: Instant,
) -> Result<(Throughput, Vec<WorkerProc>), String> {
    let a = &bench.cfg.amqp;
    let before = collector.count();
    let statuses_before = collector.by_status();
    let mut expected = 0;
    producer
        .backlog(&a.call_exchange, "call.initiate", events, |i| {
            let user = user_of(bench, phase, i);
            expected += bench.results_for(user);
            event(format!("p{phase}-{i}"), user, now_ms())
        })
        .await?;
    let cpu_before = CpuSnapshot::take(&[]);
    let role = format!("{n}w");
    let workers = start_workers(bench, bin, &role, n).await?;
    let pids: Vec<u32> = workers.iter().map(WorkerProc::pid).collect();
    let target = before + expected as usize;
    let (first, last) = collector
        .wait_for(before, target, deadline)
        .await
        .map_err(|got| {
            format!(
                "{n} worker(s): only {} of {expected} results before the deadline",
                got - before
            )
        })?;
    let cpu = CpuSnapshot::take(&pids).since(&cpu_before);
    let mut worker_cpu = 0.0;
    for w in &workers {
        worker_cpu += w.sample().await?.cpu_seconds;
    }
    let by_status = status_diff(collector.by_status(), &statuses_before);
    let pushes = by_status.get("delivered").copied().unwrap_or(0);
    let seconds = last.duration_since(first).as_secs_f64().max(1e-3);
    let mut apns: BTreeMap<u16, u64> = BTreeMap::new();
    for r in bench.sim.requests() {
        *apns.entry(r.status).or_default() += 1;
    }
    bench.reset_simulator();
    let events_per_sec = events as f64 / seconds;
    Ok((
        Throughput {
            workers: n,
            events,
            pushes,
            results_by_status: by_status,
            seconds: round3(seconds),
            events_per_sec: round3(events_per_sec),
            pushes_per_sec: round3(pushes as f64 / seconds),
            ratio_to_reference: round3(events_per_sec / reference_per_sec),
            worker_cpu_seconds: round3(worker_cpu),
            cpu_seconds_per_1000_pushes: round3(worker_cpu / pushes.max(1) as f64 * 1000.0),
            apns_requests_by_status: apns,
            cpu,
        },
        workers,
    ))
}

/// Publishes at `rate` for `duration` to running `workers` and measures, for
/// every push APNs accepted, the time from the event's `sentAt` to the
/// simulator's receipt of the request (matched by `apns-collapse-id` = call id).
#[allow(clippy::too_many_arguments)]
pub async fn latency(
    bench: &Bench,
    producer: &Producer,
    collector: &Collector,
    workers: &[WorkerProc],
    phase: usize,
    label: String,
    rate: f64,
    duration: Duration,
    deadline: Instant,
) -> Result<Latency, String> {
    let a = &bench.cfg.amqp;
    bench.reset_simulator();
    let before = collector.count();
    let mut expected = 0;
    let mut sent: HashMap<String, i64> = HashMap::new();
    // The workers run from an earlier phase: their CPU counts from here.
    let pids: Vec<u32> = workers.iter().map(WorkerProc::pid).collect();
    let cpu_before = CpuSnapshot::take(&pids);
    let paced = producer
        .paced(&a.call_exchange, "call.initiate", rate, duration, |i| {
            let user = user_of(bench, phase, i);
            expected += bench.results_for(user);
            let call_id = format!("p{phase}-{i}");
            let now = now_ms();
            sent.insert(call_id.clone(), now);
            event(call_id, user, now)
        })
        .await?;
    collector
        .wait_for(before, before + expected as usize, deadline)
        .await
        .map_err(|got| {
            format!(
                "{label}: only {} of {expected} results before the deadline",
                got - before
            )
        })?;
    let cpu = CpuSnapshot::take(&pids).since(&cpu_before);
    let samples: Vec<(i64, i64)> = bench
        .sim
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| {
            let sent = sent.get(r.headers.get("apns-collapse-id")?)?;
            Some((*sent, r.at_ms - sent))
        })
        .collect();
    bench.reset_simulator();
    let slow = Slow::of(&samples);
    let mut ms: Vec<i64> = samples.iter().map(|(_, ms)| *ms).collect();
    ms.sort_unstable();
    Ok(Latency {
        load: label,
        offered_per_sec: rate,
        achieved_per_sec: round3(paced.achieved_per_sec),
        events: paced.published,
        samples: ms.len(),
        p50_ms: percentile(&ms, 0.50),
        p95_ms: percentile(&ms, 0.95),
        p99_ms: percentile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(0) as f64,
        slow,
        cpu,
    })
}
