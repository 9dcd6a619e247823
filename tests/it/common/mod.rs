//! Test harness: each test gets its own database, its own AMQP names, its own APNs
//! simulator (real TLS + HTTP/2) and signing key, and a worker started in-process
//! through the same `start` that `main` uses.

use std::path::PathBuf;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use voip_push_worker::amqp::watch::ResultWatch;
use voip_push_worker::amqp::{connect, delete_objects, Publisher};
use voip_push_worker::apns::token::generate_p8_pem;
use voip_push_worker::apns_sim::{ApnsSim, Scripted, SimApp, SimOptions};
use voip_push_worker::config::{AppConfig, Config};
use voip_push_worker::event::{Environment, PushResult};
use voip_push_worker::store::history::CallTrace;
use voip_push_worker::store::Store;
use voip_push_worker::Worker;

mod http;
pub mod relay;
pub use http::{http_get, http_post, http_request_with_headers, metric};

pub const ADMIN_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const BUNDLE: &str = "com.example.chat";
/// A second app, of another team with its own key (several-apps tests).
pub const BUNDLE2: &str = "com.example.work";

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A random 32-byte device token, hex.
pub fn random_token() -> String {
    (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Waits until none of these workers has an event in flight.
pub async fn wait_idle(workers: &[&Worker]) {
    let metrics: Vec<_> = workers.iter().map(|w| w.metrics.clone()).collect();
    eventually(
        "the workers to settle every event",
        Duration::from_secs(30),
        || {
            let idle = metrics.iter().all(|m| m.in_flight.get() == 0);
            async move { idle.then_some(()) }
        },
    )
    .await;
}

/// Polls `f` until it returns `Some`, or panics at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The simulator's answer `status` with APNs' `reason`.
pub fn scripted(status: u16, reason: &str) -> Scripted {
    Scripted {
        status,
        reason: Some(reason.into()),
        ..Default::default()
    }
}

/// The simulator's 200, `ms` late.
pub fn delayed(ms: u64) -> Scripted {
    Scripted {
        status: 200,
        delay_ms: ms,
        ..Default::default()
    }
}

/// An isolated database (created, migrated) and the config pointing at it.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = unique("vpw_it_");
        let (client, conn) = tokio_postgres::connect(ADMIN_PG, tokio_postgres::NoTls)
            .await
            .expect("postgres");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        Self {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            name,
        }
    }

    /// A plain connection to the test's database, for what a test writes or
    /// reads behind the worker's back.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("postgres");
        tokio::spawn(conn);
        client
    }

    pub async fn drop_db(&self) {
        if let Ok((client, conn)) = tokio_postgres::connect(ADMIN_PG, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            let _ = client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
        }
    }
}

/// A signing key written as a .p8 file, and the app it signs for.
pub struct TestKey {
    pub dir: PathBuf,
    pub app: AppConfig,
}

impl TestKey {
    pub fn new(bundle_id: &str, team_id: &str, key_id: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("vpw-it-"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let key_file = dir.join(format!("AuthKey_{key_id}.p8"));
        std::fs::write(&key_file, generate_p8_pem()).expect("write key");
        Self {
            dir,
            app: AppConfig {
                bundle_id: bundle_id.into(),
                team_id: team_id.into(),
                key_id: key_id.into(),
                key_file,
                ..Default::default()
            },
        }
    }
}

impl Drop for TestKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct TestEnv {
    pub cfg: Config,
    pub sim: ApnsSim,
    pub store: Store,
    pub worker: Option<Worker>,
    pub watch: ResultWatch,
    /// Results read while waiting for another call's.
    unclaimed: Vec<PushResult>,
    pub publisher: Publisher,
    pub db: TestDb,
    /// Kept alive for the key files and CA they hold.
    _keys: [TestKey; 2],
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// Like `new`, with a chance to adjust the configuration first.
    pub async fn with(adjust: impl FnOnce(&mut Config)) -> Self {
        let mut env = Self::without_worker(adjust).await;
        env.start_worker().await;
        env
    }

    /// Everything but the worker (tests that run workers as processes).
    pub async fn without_worker(adjust: impl FnOnce(&mut Config)) -> Self {
        let key = TestKey::new(BUNDLE, "TEAM000001", "KEY0000001");
        let key2 = TestKey::new(BUNDLE2, "TEAM000002", "KEY0000002");
        let apps = vec![key.app.clone(), key2.app.clone()];
        let sim = ApnsSim::start(SimOptions::local(
            SimApp::from_config(&apps).expect("sim apps"),
        ))
        .await
        .expect("simulator");
        let ca_file = key.dir.join("ca.pem");
        std::fs::write(&ca_file, &sim.ca_pem).expect("write CA");
        let db = TestDb::create().await;

        let id = unique("");
        let mut cfg = Config::default();
        cfg.postgres.url = db.url.clone();
        cfg.postgres.pool_size = 4;
        cfg.name_amqp_objects(&format!("it.{id}"));
        cfg.http.listen = "127.0.0.1:0".into();
        cfg.apns.production_url = sim.production_url();
        cfg.apns.sandbox_url = sim.sandbox_url();
        cfg.apns.ca_file = Some(ca_file);
        cfg.apns.apps = apps;
        cfg.worker.retry_min_delay_ms = 20;
        cfg.worker.retry_max_delay_ms = 200;
        cfg.worker.retry_delay_ms = 100;
        adjust(&mut cfg);

        let store = Store::connect(&cfg.postgres).expect("store");
        store.migrate().await.expect("migrate");
        let watch = ResultWatch::open(&cfg.amqp).await.expect("result watch");
        let publisher = Publisher::new(cfg.amqp.clone(), "test producer");
        Self {
            cfg,
            sim,
            store,
            worker: None,
            watch,
            unclaimed: Vec::new(),
            publisher,
            db,
            _keys: [key, key2],
        }
    }

    pub async fn start_worker(&mut self) {
        let worker = voip_push_worker::start(self.cfg.clone(), CancellationToken::new())
            .await
            .expect("worker starts");
        let health = worker.health.clone();
        eventually("the worker to consume", Duration::from_secs(20), || {
            let h = health.clone();
            async move {
                h.consuming
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .then_some(())
            }
        })
        .await;
        self.worker = Some(worker);
    }

    pub fn worker(&self) -> &Worker {
        self.worker.as_ref().expect("worker running")
    }

    /// Registers a token in our table (as `registered`) and in the simulator (as
    /// valid in `actual` only). Returns the token.
    pub async fn device(
        &self,
        user: &str,
        registered: Option<Environment>,
        actual: Environment,
    ) -> String {
        let token = random_token();
        self.sim.register_token(actual, &token, BUNDLE);
        self.store
            .register_device(user, BUNDLE, &token, registered)
            .await
            .expect("register device");
        token
    }

    /// Proves the first app's configuration in each of `envs` with a delivered
    /// push to a device of its own user: only then may APNs' refusal of a
    /// token invalidate it (the misconfiguration guard, `apns::guard`).
    pub async fn prove_app(&mut self, envs: &[Environment]) {
        let user = unique("prover-");
        for env in envs {
            self.device(&user, Some(*env), *env).await;
        }
        let call = unique("prove-");
        self.publish(serde_json::json!({"callId": call, "toUserId": user}))
            .await;
        let results = self.results_for(&call, envs.len()).await;
        assert!(
            results
                .iter()
                .all(|r| r.status == voip_push_worker::event::Status::Delivered),
            "{results:#?}"
        );
    }

    /// Publishes raw bytes to the call exchange as a producer would.
    pub async fn publish_raw(&self, body: &[u8]) {
        self.publish_with(
            body,
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await;
    }

    pub async fn publish_with(&self, body: &[u8], props: BasicProperties) {
        self.publisher
            .publish(&self.cfg.amqp.call_exchange, "call.initiate", body, props)
            .await
            .expect("publish event");
    }

    /// Publishes a cancel as producers do: routing key `call.cancel`.
    pub async fn publish_cancel(&self, event: serde_json::Value) {
        self.publisher
            .publish(
                &self.cfg.amqp.call_exchange,
                "call.cancel",
                event.to_string().as_bytes(),
                BasicProperties::default().with_content_type("application/json".into()),
            )
            .await
            .expect("publish cancel");
    }

    pub async fn publish(&self, event: serde_json::Value) {
        self.publish_raw(event.to_string().as_bytes()).await;
    }

    /// The call's trace once each of its deliveries has its outcome recorded:
    /// a result is published first and recorded right after the broker's
    /// confirm, so a trace read at the result may not hold it yet.
    pub async fn recorded_trace(&self, call_id: &str) -> CallTrace {
        let what = format!("the outcomes of {call_id} recorded");
        eventually(&what, Duration::from_secs(10), || async {
            let t = self.store.trace_call(call_id).await.ok()??;
            let recorded =
                !t.deliveries.is_empty() && t.deliveries.iter().all(|d| d.status != "ringing");
            recorded.then_some(t)
        })
        .await
    }

    /// Waits for `n` results of `call_id`; results of other calls that arrive
    /// meanwhile are kept for later calls.
    pub async fn results_for(&mut self, call_id: &str, n: usize) -> Vec<PushResult> {
        let (mut got, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unclaimed)
            .into_iter()
            .partition(|r| r.call_id.as_deref() == Some(call_id));
        self.unclaimed = rest;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while got.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.watch.next(left).await {
                Some(r) if r.call_id.as_deref() == Some(call_id) => got.push(r),
                Some(r) => self.unclaimed.push(r),
                None => panic!(
                    "only {} of {n} results for {call_id} arrived: {got:#?}",
                    got.len()
                ),
            }
        }
        got
    }

    /// Takes every message from the dead-letter queue: (body, x-vpw-reason).
    pub async fn dead_letters(&self) -> Vec<(Vec<u8>, Option<String>)> {
        self.dead_letters_in(&self.cfg.amqp.dead_letter_queue).await
    }

    /// Takes every message from `queue`: (body, x-vpw-reason).
    pub async fn dead_letters_in(&self, queue: &str) -> Vec<(Vec<u8>, Option<String>)> {
        let conn = connect(&self.cfg.amqp, "test dlq reader")
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            let reason = m
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-vpw-reason").cloned())
                .and_then(|v| match v {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                });
            m.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            out.push((m.delivery.data.clone(), reason));
        }
        let _ = conn.close(200, "done".into()).await;
        out
    }

    /// Polls `/metrics` until the series `name_and_labels` reads `want` (counters
    /// move just after results are published, so a test may see a result first).
    pub async fn wait_metric(&self, name_and_labels: &str, want: f64) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, text) = self.http_get("/metrics").await;
            let got = metric(&text, name_and_labels);
            if got == want {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name_and_labels} is {got}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// GET on the worker's HTTP listener: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.worker().http_addr, path).await
    }

    pub async fn cleanup(mut self) {
        if let Some(w) = self.worker.take() {
            w.stop().await;
        }
        self.publisher.close().await;
        let (queues, exchanges) = self.cfg.amqp_objects();
        delete_objects(&self.cfg.amqp, "test cleanup", queues, exchanges).await;
        self.db.drop_db().await;
    }
}

/// The worker binary configured like `cfg` (database, AMQP names, APNs URLs and
/// CA, its first app), through the environment an operator would set.
pub fn binary_for(cfg: &Config) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_voip-push-worker"));
    c.env_remove("VPW_CONFIG")
        .env("VPW_LOG", "warn")
        .envs(cfg.process_env())
        .env("VPW__HTTP__LISTEN", "127.0.0.1:0");
    c
}
