//! Fault injection: every event must end with a result for each device, and no
//! device may be rung twice for one call, whatever breaks. These tests restart
//! shared services (RabbitMQ connections, Postgres), so they run alone, one at a
//! time, in nextest's `faults` profile (`make test-faults`).
//!
//! Each prints one `fault-report:` line with its figures.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use voip_push_worker::amqp::connect;
use voip_push_worker::apns_sim::Scripted;
use voip_push_worker::config::Config;
use voip_push_worker::event::{Environment, PushResult, Status};

use crate::common::{delayed, eventually, random_token, scripted, TestEnv, BUNDLE};

mod fuzz;
mod services;
mod workers;

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

/// Runs a service's admin command (it restarts or reconfigures a shared service)
/// and fails the test, with the command's stderr, if the command failed.
fn run_ok(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// A worker process killed when the test lets go of it: a failed assertion
/// must not leave it consuming from the next test's queues.
struct WorkerProcess(Child);

impl std::ops::Deref for WorkerProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for WorkerProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The worker binary, configured like `env`'s in-process worker.
fn worker_process(env: &TestEnv, concurrency: u16) -> WorkerProcess {
    let child = crate::common::binary_for(&env.cfg)
        .arg("run")
        .env("VPW__WORKER__CONCURRENCY", concurrency.to_string())
        .env("VPW__WORKER__RETRY_MIN_DELAY_MS", "20")
        .env("VPW__WORKER__RETRY_MAX_DELAY_MS", "200")
        .env("VPW__WORKER__RETRY_DELAY_MS", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the worker binary");
    WorkerProcess(child)
}
