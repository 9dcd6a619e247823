//! Fault injection: every event must end with a result for each device, and no
//! device may be rung twice for one call, whatever breaks. These tests restart
//! shared services (RabbitMQ connections, Postgres), so they run alone, one at a
//! time, in nextest's `faults` profile (`make test-faults`).
//!
//! Each prints one `fault-report:` line with its figures.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use voip_push_worker::amqp::connect;
use voip_push_worker::apns_sim::Scripted;
use voip_push_worker::config::Config;
use voip_push_worker::event::{Environment, PushResult, Status};

use crate::common::{delayed, eventually, random_token, scripted, TestEnv, BUNDLE};

/// Results collected from a durable queue of the test's own, so none are lost
/// while connections are being closed under the worker.
struct DurableResults {
    cfg: voip_push_worker::config::AmqpConfig,
    queue: String,
    seen: Vec<PushResult>,
}

impl DurableResults {
    async fn declare(cfg: &Config) -> Self {
        let queue = format!("{}.collected", cfg.amqp.results_exchange);
        let conn = connect(&cfg.amqp, "fault results").await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        voip_push_worker::amqp::declare_topology(&ch, &cfg.amqp)
            .await
            .unwrap();
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            queue.as_str().into(),
            cfg.amqp.results_exchange.as_str().into(),
            "push.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "done".into()).await;
        Self {
            cfg: cfg.amqp.clone(),
            queue,
            seen: Vec::new(),
        }
    }

    /// Reads whatever is queued; a broken connection just means "try later".
    async fn drain(&mut self) {
        let Ok(conn) = connect(&self.cfg, "fault results reader").await else {
            return;
        };
        if let Ok(ch) = conn.create_channel().await {
            while let Ok(Some(m)) = ch
                .basic_get(self.queue.as_str().into(), BasicGetOptions::default())
                .await
            {
                if let Ok(r) = serde_json::from_slice(&m.delivery.data) {
                    self.seen.push(r);
                }
                let _ = m.delivery.acker.ack(BasicAckOptions::default()).await;
            }
        }
        let _ = conn.close(200, "done".into()).await;
    }

    fn calls_done(&self) -> HashSet<String> {
        self.seen.iter().filter_map(|r| r.call_id.clone()).collect()
    }

    /// Polls until every call in `calls` has a result.
    async fn wait_all(&mut self, calls: &[String], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain().await;
            let done = self.calls_done();
            if calls.iter().all(|c| done.contains(c)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {} calls have results after {timeout:?}",
                calls.iter().filter(|c| done.contains(*c)).count(),
                calls.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_at_least(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.calls_done().len() < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} results after {timeout:?}"
            );
            self.drain().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Results per (call, device) beyond the first.
    fn duplicate_results(&self) -> usize {
        let mut per: HashMap<(String, Option<i64>), usize> = HashMap::new();
        for r in &self.seen {
            *per.entry((r.call_id.clone().unwrap_or_default(), r.device_id))
                .or_default() += 1;
        }
        per.values().map(|n| n - 1).sum()
    }

    async fn delete(&self) {
        if let Ok(conn) = connect(&self.cfg, "fault cleanup").await {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(200, "done".into()).await;
        }
    }
}

/// Registers `n` users with one production device each, every push answered
/// after `delay_ms` (so a load is still in flight when the fault strikes), and
/// returns the call ids to publish.
async fn load(env: &TestEnv, prefix: &str, n: usize, delay_ms: u64) -> Vec<(String, String)> {
    let mut calls = Vec::with_capacity(n);
    for i in 0..n {
        let user = format!("{prefix}-user-{i}");
        let token = env
            .device(
                &user,
                Some(Environment::Production),
                Environment::Production,
            )
            .await;
        env.sim
            .script(&token, std::iter::repeat_n(delayed(delay_ms), 4));
        calls.push((format!("{prefix}-call-{i}"), user));
    }
    calls
}

async fn publish_all(env: &TestEnv, calls: &[(String, String)]) {
    for (call, user) in calls {
        env.publish(json!({"callId": call, "toUserId": user, "ringTimeoutSecs": 120}))
            .await;
    }
}

/// Accepted pushes per (call, token) beyond the first: phones rung twice.
fn duplicate_pushes(env: &TestEnv) -> usize {
    let mut per: HashMap<(String, String), usize> = HashMap::new();
    for r in env.sim.requests().into_iter().filter(|r| r.status == 200) {
        *per.entry((r.headers["apns-collapse-id"].clone(), r.token))
            .or_default() += 1;
    }
    per.values().map(|n| n - 1).sum()
}

fn call_ids(calls: &[(String, String)]) -> Vec<String> {
    calls.iter().map(|(c, _)| c.clone()).collect()
}

/// The worker binary, configured like `env`'s in-process worker.
fn worker_process(env: &TestEnv, concurrency: u16) -> Child {
    crate::common::binary_for(&env.cfg)
        .arg("run")
        .env("VPW__WORKER__CONCURRENCY", concurrency.to_string())
        .env("VPW__WORKER__RETRY_MIN_DELAY_MS", "20")
        .env("VPW__WORKER__RETRY_MAX_DELAY_MS", "200")
        .env("VPW__WORKER__RETRY_DELAY_MS", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the worker binary")
}

/// How long the callee's phones wait at most: the longest pause between two
/// pushes from a kill until the end of the load.
fn longest_pause_after(env: &TestEnv, from_ms: i64) -> i64 {
    let mut at: Vec<i64> = env
        .sim
        .requests()
        .iter()
        .map(|r| r.at_ms)
        .filter(|&t| t >= from_ms)
        .collect();
    at.sort_unstable();
    at.insert(0, from_ms);
    at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
}

#[tokio::test]
async fn worker_killed_mid_load_loses_nothing_resumes_at_once_and_sigterm_drains() {
    // At the defaults users get: two replicas at concurrency 64, thousands of
    // events, APNs answering in 25 ms so 64 pushes are in flight at the kill.
    let env = TestEnv::without_worker(|_| {}).await;
    let mut results = DurableResults::declare(&env.cfg).await;
    let calls = load(&env, "kill", 2_000, 25).await;
    // A backlog, so the workers are busy when the kill comes.
    publish_all(&env, &calls).await;
    let mut first = worker_process(&env, 64);
    let mut second = worker_process(&env, 64);
    // Mid-load: kill once 400 pushes have reached APNs (results lag behind).
    eventually("400 pushes", Duration::from_secs(60), || {
        let n = env.sim.requests().len();
        async move { (n >= 400).then_some(()) }
    })
    .await;
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    let killed_ms = voip_push_worker::event::now_ms();
    let killed = Instant::now();
    let done_at_kill = results.calls_done().len();

    results
        .wait_all(&call_ids(&calls), Duration::from_secs(120))
        .await;
    let recovered = killed.elapsed();
    let pause_ms = longest_pause_after(&env, killed_ms);
    let duplicates = duplicate_pushes(&env);
    println!(
        "fault-report: kill -9 mid-load (2 workers, concurrency 64): events {}, results {} (done at kill {done_at_kill}), longest pause in ringing after the kill {pause_ms} ms, duplicate pushes {duplicates}, duplicate results {}, all results {:.1?} after the kill",
        calls.len(),
        results.seen.len(),
        results.duplicate_results(),
        recovered
    );
    assert!(results.seen.iter().all(|r| r.status == Status::Delivered));
    // The killed worker's events return to the queue and its claims are taken
    // over as soon as its Postgres sessions are gone: no wait for a lease.
    assert!(
        pause_ms <= 2_000,
        "ringing paused {pause_ms} ms after the kill"
    );
    // The only window for a second ring: a push in flight at the kill, whose
    // outcome was not yet recorded — at most one per concurrent slot.
    assert!(duplicates <= 64, "{duplicates} phones rung twice");

    // SIGTERM: drains and exits 0.
    let status = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || second.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
    results.delete().await;
    env.cleanup().await;
}

#[tokio::test]
async fn broker_closing_every_connection_loses_and_duplicates_nothing() {
    let env = TestEnv::with(|c| c.worker.concurrency = 4).await;
    let mut results = DurableResults::declare(&env.cfg).await;
    let calls = load(&env, "close", 200, 25).await;
    publish_all(&env, &calls).await;
    results.wait_at_least(50, Duration::from_secs(30)).await;
    let out = Command::new("rabbitmqctl")
        .args(["close_all_connections", "fault test"])
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let closed = Instant::now();
    let worker_health = env.worker().health.clone();
    let sessions_before = worker_health.sessions.load(Ordering::Relaxed);
    eventually("the consumer to reconnect", Duration::from_secs(30), || {
        let h = worker_health.clone();
        async move {
            (h.sessions.load(Ordering::Relaxed) >= sessions_before + 2
                && h.consuming.load(Ordering::Relaxed))
            .then_some(())
        }
    })
    .await;
    let reconnected = closed.elapsed();
    results
        .wait_all(&call_ids(&calls), Duration::from_secs(60))
        .await;
    let duplicates = duplicate_pushes(&env);
    println!(
        "fault-report: rabbitmqctl close_all_connections: events {}, results {}, duplicate pushes {duplicates}, duplicate results {}, consuming again {reconnected:.1?} after, all results {:.1?} after",
        calls.len(),
        results.seen.len(),
        results.duplicate_results(),
        closed.elapsed()
    );
    assert_eq!(duplicates, 0);
    results.delete().await;
    env.cleanup().await;
}

fn postgres_cluster() -> String {
    std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .expect("a cluster version")
}

#[tokio::test]
async fn postgres_restart_mid_load_loses_nothing() {
    let env = TestEnv::with(|c| c.worker.concurrency = 4).await;
    let mut results = DurableResults::declare(&env.cfg).await;
    let calls = load(&env, "pg", 200, 25).await;
    publish_all(&env, &calls).await;
    results.wait_at_least(50, Duration::from_secs(30)).await;
    let restarted = Instant::now();
    let out = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &postgres_cluster(),
            "main",
            "restart",
        ])
        .output()
        .expect("pg_ctlcluster");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    results
        .wait_all(&call_ids(&calls), Duration::from_secs(90))
        .await;
    let duplicates = duplicate_pushes(&env);
    println!(
        "fault-report: Postgres restart: events {}, results {}, duplicate pushes {duplicates}, duplicate results {}, all results {:.1?} after the restart began",
        calls.len(),
        results.seen.len(),
        results.duplicate_results(),
        restarted.elapsed()
    );
    assert!(duplicates <= 4, "{duplicates} phones rung twice");
    let (status, _) = env.http_get("/readyz").await;
    assert_eq!(status, 200, "ready again after Postgres returned");
    results.delete().await;
    env.cleanup().await;
}

/// A TCP relay that can black-hole the connections it carries: bytes are read
/// and dropped, nothing is closed, as when a network path silently dies.
struct Relay {
    addr: std::net::SocketAddr,
    blackholed_below: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Relay {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            blackholed_below: Arc::new(AtomicU64::new(0)),
            accepted: Arc::new(AtomicU64::new(0)),
            stop: CancellationToken::new(),
        };
        let (below, accepted, stop) = (
            relay.blackholed_below.clone(),
            relay.accepted.clone(),
            relay.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (down, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                let number = accepted.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let dead = Arc::new(AtomicBool::new(false));
                for (mut from, mut to) in [(dr, uw), (ur, dw)].map(|(a, b)| {
                    (
                        Box::new(a) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(b) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    )
                }) {
                    let below = below.clone();
                    let stop = stop.clone();
                    let dead = dead.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = tokio::select! {
                                _ = stop.cancelled() => return,
                                r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
                            };
                            if number < below.load(Ordering::SeqCst) || dead.load(Ordering::SeqCst)
                            {
                                dead.store(true, Ordering::SeqCst);
                                continue; // black hole: read and drop
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        relay
    }

    fn blackhole_existing(&self) {
        self.blackholed_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

#[tokio::test]
async fn blackholed_apns_path_is_replaced_within_the_ring() {
    let mut env = TestEnv::without_worker(|_| {}).await;
    let relay = Relay::start(env.sim.production_addr).await;
    env.cfg.apns.production_url = format!("https://{}", relay.addr);
    env.cfg.apns.connections_per_environment = 1;
    env.cfg.apns.request_timeout_ms = 2_000;
    env.cfg.apns.ping_interval_secs = 1;
    env.cfg.apns.ping_timeout_secs = 1;
    env.start_worker().await;
    env.device("bh", Some(Environment::Production), Environment::Production)
        .await;
    // Two calls: the first proves the token (on a probation connection), the
    // second opens the connection proven tokens use: the one the fault hits.
    for warm in ["bh-0", "bh-00"] {
        env.publish(json!({"callId": warm, "toUserId": "bh"})).await;
        assert_eq!(env.results_for(warm, 1).await[0].status, Status::Delivered);
    }

    relay.blackhole_existing();
    let struck = Instant::now();
    let calls: Vec<String> = (1..=5).map(|i| format!("bh-{i}")).collect();
    for c in &calls {
        env.publish(json!({"callId": c, "toUserId":"bh", "ringTimeoutSecs": 20}))
            .await;
    }
    let mut slowest = 0;
    for c in &calls {
        let r = &env.results_for(c, 1).await[0];
        assert_eq!(r.status, Status::Delivered, "{r:?}");
        slowest = slowest.max(r.latency_ms.unwrap());
    }
    let recovered = struck.elapsed();
    println!(
        "fault-report: black-holed APNs path: events {}, delivered {}, connections through the relay {}, slowest push {slowest} ms, all delivered {recovered:.1?} after the black hole",
        calls.len(),
        calls.len(),
        relay.accepted.load(Ordering::SeqCst)
    );
    assert!(
        relay.accepted.load(Ordering::SeqCst) >= 2,
        "a new connection replaced the dead one"
    );
    assert!(slowest < 20_000, "within the ring");
    relay.stop.cancel();
    env.cleanup().await;
}

#[tokio::test]
async fn two_workers_and_duplicated_messages_push_each_device_once() {
    let env = TestEnv::with(|c| c.worker.concurrency = 8).await;
    // Same configuration (HTTP already on an ephemeral port), same queue.
    let second = voip_push_worker::start(env.cfg.clone(), CancellationToken::new())
        .await
        .unwrap();
    let mut results = DurableResults::declare(&env.cfg).await;
    let calls = load(&env, "dup", 100, 10).await;
    // Every event twice, with the same message id, as a producer that retried
    // after a lost confirm would.
    for (call, user) in &calls {
        let body = json!({"callId": call, "toUserId": user}).to_string();
        let props = || {
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(format!("msg-{call}").into())
        };
        env.publish_with(body.as_bytes(), props()).await;
        env.publish_with(body.as_bytes(), props()).await;
    }
    results
        .wait_all(&call_ids(&calls), Duration::from_secs(60))
        .await;
    // Let stragglers (the second copies) finish, then count.
    crate::common::wait_idle(&[env.worker(), &second]).await;
    results.drain().await;
    let duplicates = duplicate_pushes(&env);
    let dup_results = results.duplicate_results();
    println!(
        "fault-report: two workers, every event published twice: events {}, messages {}, results {}, duplicate pushes {duplicates}, duplicate results {dup_results}",
        calls.len(),
        calls.len() * 2,
        results.seen.len()
    );
    assert_eq!(duplicates, 0);
    assert_eq!(dup_results, 0);
    assert_eq!(results.seen.len(), calls.len());
    second.stop().await;
    results.delete().await;
    env.cleanup().await;
}

/// Messages no producer should send, but some will.
fn malformed(rng: &mut rand::rngs::StdRng, i: usize) -> Vec<u8> {
    match i % 10 {
        0 => (0..rng.random_range(1..200))
            .map(|_| rng.random::<u8>())
            .collect(),
        1 => {
            let mut b = b"{\"callId\":\"x\",\"toUserId\":\"".to_vec();
            b.extend([0xc3, 0x28, b'"', b'}']);
            b
        }
        2 => json!({"callId": i, "toUserId": [1, 2]})
            .to_string()
            .into_bytes(),
        3 => json!({"toUserId": i}).to_string().into_bytes(),
        4 => json!({"callId": format!("fz-{i}")})
            .to_string()
            .into_bytes(),
        5 => json!({"callId": "x".repeat(65 + i % 50), "toUserId": 1})
            .to_string()
            .into_bytes(),
        6 => json!({"callId": format!("fz-{i}"), "toUserId": 1, "type": "call.ringing"})
            .to_string()
            .into_bytes(),
        7 => json!({"callId": format!("fz-{i}"), "toUserId": 1, "hasVideo": {"no": true}})
            .to_string()
            .into_bytes(),
        8 => {
            let big = "y".repeat(17 * 1024);
            json!({"callId": format!("fz-{i}"), "toUserId": 1, "room": big})
                .to_string()
                .into_bytes()
        }
        _ => {
            let shapes = ["null", "[]", "42", "\"call\"", "{", "{\"callId\":", "true"];
            shapes[rng.random_range(0..shapes.len())]
                .as_bytes()
                .to_vec()
        }
    }
}

#[tokio::test]
async fn fuzzed_messages_are_all_dead_lettered_and_good_events_flow() {
    let mut env = TestEnv::new().await;
    let token = random_token();
    env.sim
        .register_token(Environment::Production, &token, BUNDLE);
    env.store
        .register_device("fz", BUNDLE, &token, None)
        .await
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let bad = 300;
    let mut good = Vec::new();
    for i in 0..bad {
        env.publish_raw(&malformed(&mut rng, i)).await;
        if i % 15 == 0 {
            let call = format!("fz-good-{i}");
            env.publish(json!({"callId": call, "toUserId": "fz"})).await;
            good.push(call);
        }
    }
    for call in &good {
        assert_eq!(env.results_for(call, 1).await[0].status, Status::Delivered);
    }
    let mut dead = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead < bad {
        assert!(
            Instant::now() < deadline,
            "only {dead} of {bad} dead letters"
        );
        dead += env.dead_letters().await.len();
        if dead < bad {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(dead, bad);
    assert_eq!(env.http_get("/healthz").await.0, 200, "the worker is alive");
    println!(
        "fault-report: fuzz: malformed messages {bad}, dead-lettered {dead}, good events {}, delivered {}",
        good.len(),
        good.len()
    );
    env.cleanup().await;
}

/// Puts RabbitMQ's memory watermark back however the test ends: a broker left in
/// alarm would block every publisher on the machine.
struct WatermarkGuard(String);

impl WatermarkGuard {
    /// Remembers the current watermark (0.4 when it cannot be read).
    fn new() -> Self {
        let env = Command::new("rabbitmqctl").arg("environment").output().ok();
        let current = env
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                let at = text.find("{vm_memory_high_watermark,")?;
                let rest = &text[at + "{vm_memory_high_watermark,".len()..];
                Some(rest[..rest.find('}')?].trim().to_string())
            })
            .filter(|v| v.parse::<f64>().is_ok())
            .unwrap_or_else(|| "0.4".into());
        Self(current)
    }
}

impl Drop for WatermarkGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", &self.0])
            .output();
    }
}

#[tokio::test]
async fn broker_blocking_publishes_holds_events_until_it_lifts() {
    let env = TestEnv::with(|c| c.worker.concurrency = 2).await;
    let mut results = DurableResults::declare(&env.cfg).await;
    // Slow pushes, so events are still in flight when the alarm goes off.
    let calls = load(&env, "blk", 20, 400).await;
    publish_all(&env, &calls).await;
    results.wait_at_least(2, Duration::from_secs(30)).await;

    let guard = WatermarkGuard::new();
    let out = Command::new("rabbitmqctl")
        .args(["set_vm_memory_high_watermark", "0.0000001"])
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alarm = Instant::now();
    // The worker's next result publish is blocked: it says so, and leaves rotation.
    let (status, body) = eventually(
        "readyz to report the block",
        Duration::from_secs(30),
        || {
            let env = &env;
            async move {
                let (status, body) = env.http_get("/readyz").await;
                (status == 503 && body.contains("blocking publishes")).then_some((status, body))
            }
        },
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let (_, metrics) = env.http_get("/metrics").await;
    assert_eq!(
        crate::common::metric(&metrics, "voip_push_amqp_publish_blocked"),
        1.0
    );
    let blocked_for = alarm.elapsed();

    drop(guard);
    let lifted = Instant::now();
    results
        .wait_all(&call_ids(&calls), Duration::from_secs(60))
        .await;
    eventually("readyz to recover", Duration::from_secs(20), || {
        let env = &env;
        async move { (env.http_get("/readyz").await.0 == 200).then_some(()) }
    })
    .await;
    let duplicates = duplicate_pushes(&env);
    println!(
        "fault-report: broker memory alarm (publishes blocked): events {}, results {}, duplicate pushes {duplicates}, duplicate results {}, block seen {blocked_for:.1?} after the alarm, all results {:.1?} after it lifted",
        calls.len(),
        results.seen.len(),
        results.duplicate_results(),
        lifted.elapsed()
    );
    assert_eq!(duplicates, 0);
    assert_eq!(results.duplicate_results(), 0);
    results.delete().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_live_owner_keeps_its_claim_through_long_retries() {
    // Worker A retries one push for longer than a claim lease (10 s) while worker
    // B holds a duplicate of the event: A's renewals must keep B from taking over.
    let env = TestEnv::with(|c| c.worker.concurrency = 2).await;
    let second = voip_push_worker::start(env.cfg.clone(), CancellationToken::new())
        .await
        .unwrap();
    let mut results = DurableResults::declare(&env.cfg).await;
    let token = env
        .device(
            "lease",
            Some(Environment::Production),
            Environment::Production,
        )
        .await;
    env.sim.script(
        &token,
        std::iter::repeat_n(
            Scripted {
                delay_ms: 200,
                ..scripted(503, "ServiceUnavailable")
            },
            30,
        ),
    );
    let body = json!({"callId": "lease-1", "toUserId": "lease", "ringTimeoutSecs": 60}).to_string();
    let props = || {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("lease-msg".into())
    };
    env.publish_with(body.as_bytes(), props()).await;
    env.publish_with(body.as_bytes(), props()).await;
    results
        .wait_all(&["lease-1".to_string()], Duration::from_secs(60))
        .await;
    crate::common::wait_idle(&[env.worker(), &second]).await;
    results.drain().await;
    let requests = env.sim.requests();
    let accepted = requests.iter().filter(|r| r.status == 200).count();
    let span_ms = requests.iter().map(|r| r.at_ms).max().unwrap()
        - requests.iter().map(|r| r.at_ms).min().unwrap();
    println!(
        "fault-report: one push retried for {:.1} s with a duplicate on another worker: attempts {}, accepted {accepted}, results {}",
        span_ms as f64 / 1000.0,
        requests.len(),
        results.seen.len()
    );
    assert!(
        span_ms > 10_000,
        "the retries outlasted a lease ({span_ms} ms)"
    );
    assert_eq!(accepted, 1, "pushed once");
    assert_eq!(results.seen.len(), 1, "one result");
    second.stop().await;
    results.delete().await;
    env.cleanup().await;
}
