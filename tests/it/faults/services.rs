//! The services under the worker fail: RabbitMQ closing connections or blocking
//! publishes, Postgres restarting, the APNs path black-holed.

use super::*;
use crate::common::relay::Relay;

#[tokio::test]
async fn broker_closing_every_connection_loses_and_duplicates_nothing() {
    let env = TestEnv::with(|c| c.worker.concurrency = 4).await;
    let mut results = DurableResults::declare(&env.cfg).await;
    let calls = load(&env, "close", 200, 25).await;
    publish_all(&env, &calls).await;
    results.wait_at_least(50, Duration::from_secs(30)).await;
    run_ok("rabbitmqctl", &["close_all_connections", "fault test"]);
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
    run_ok(
        "pg_ctlcluster",
        &[
            "--skip-systemctl-redirect",
            &postgres_cluster(),
            "main",
            "restart",
        ],
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

/// A load at the default concurrency and APNs settings; the relay
/// black-holes every APNs connection a third of the way through. Pushes left
/// unanswered get their connection PINGed after `apns.probe_after_ms`; the PING
/// goes unanswered too, the connection is retired and its pushes resent on a
/// fresh one. Ringing must resume within a few seconds (not the 10 s request
/// timeout), nothing may be lost, and every phone rung twice (its push reached
/// APNs, the answer was lost) must show an `unanswered` attempt in `trace`.
#[tokio::test]
async fn blackholed_apns_path_is_replaced_within_the_ring() {
    const EVENTS: usize = 2_000;
    let mut env = TestEnv::without_worker(|_| {}).await;
    let relay = Relay::start(env.sim.production_addr).await;
    env.cfg.apns.production_url = format!("https://{}", relay.addr);
    env.start_worker().await;
    // 20 ms per answer, so pushes are in flight on the path when it dies.
    let calls = load(&env, "bh", EVENTS, 20).await;
    publish_all(&env, &calls).await;
    let accepted = |env: &TestEnv| {
        env.sim
            .requests()
            .iter()
            .filter(|r| r.status == 200)
            .count()
    };
    eventually(
        "a third of the load delivered",
        Duration::from_secs(60),
        || {
            let n = accepted(&env);
            async move { (n >= EVENTS / 3).then_some(()) }
        },
    )
    .await;

    let connections_before = env.sim.connections_accepted();
    relay.blackhole_existing();
    let struck_ms = voip_push_worker::event::now_ms();
    let struck = Instant::now();
    for (call, _) in &calls {
        let r = env.results_for(call, 1).await.remove(0);
        assert_eq!(r.status, Status::Delivered, "{r:?}");
    }
    let recovered = struck.elapsed();
    // Ringing resumed with the first push APNs received on a new connection.
    let resumed_ms = env
        .sim
        .requests()
        .iter()
        .filter(|r| r.connection >= connections_before && r.status == 200)
        .map(|r| r.at_ms - struck_ms)
        .min()
        .expect("pushes on a new connection");
    let twice = rung_twice(&env);
    let mut unexplained = Vec::new();
    for (collapse_id, _) in &twice {
        let trace = env.recorded_trace(collapse_id).await;
        let explained = trace.deliveries.iter().any(|d| {
            d.attempts
                .iter()
                .any(|a| a.reason.as_deref() == Some("unanswered"))
        });
        if !explained {
            unexplained.push(collapse_id.clone());
        }
    }
    println!(
        "fault-report: black-holed APNs path: events {EVENTS}, all delivered, connections through the relay {}, ringing resumed {resumed_ms} ms after the black hole, all delivered {recovered:.1?} after it, rung twice {}",
        relay.accepted.load(Ordering::SeqCst),
        twice.len()
    );
    assert!(
        resumed_ms <= 5_000,
        "ringing resumed {resumed_ms} ms after the black hole"
    );
    assert!(
        unexplained.is_empty(),
        "rung twice without an unanswered attempt: {unexplained:?}"
    );
    relay.stop.cancel();
    env.cleanup().await;
}

/// (collapse id, token) of every phone that accepted more than one push.
fn rung_twice(env: &TestEnv) -> Vec<(String, String)> {
    let mut per: HashMap<(String, String), usize> = HashMap::new();
    for r in env.sim.requests().into_iter().filter(|r| r.status == 200) {
        *per.entry((r.headers["apns-collapse-id"].clone(), r.token))
            .or_default() += 1;
    }
    per.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(k, _)| k)
        .collect()
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
    run_ok(
        "rabbitmqctl",
        &["set_vm_memory_high_watermark", "0.0000001"],
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
