//! What every phase shares: the bench's own database, AMQP names, signing key,
//! the APNs simulator and the registered devices. Nothing here touches the
//! default names a real deployment uses.

use std::path::PathBuf;
use std::time::Duration;

use voip_push_worker::amqp::{connect, declare_topology, delete_objects};
use voip_push_worker::apns::token::generate_p8_pem;
use voip_push_worker::apns_sim::{ApnsSim, SimApp, SimOptions};
use voip_push_worker::config::{AppConfig, Config};
use voip_push_worker::event::Environment;
use voip_push_worker::store::{ensure_database, Store};

pub const BUNDLE: &str = "com.example.bench";
/// Every AMQP name the bench uses starts with this; they are deleted before and
/// after each run.
const PREFIX: &str = "vpw-bench";

/// One registered device: its user and token, and where the token really lives.
pub struct Device {
    pub user: usize,
    pub token: String,
    pub actual: Environment,
    /// What we registered: `None` (unknown) makes the worker learn it by fallback.
    pub registered: Option<Environment>,
}

pub struct Bench {
    pub cfg: Config,
    pub sim: ApnsSim,
    pub devices: Vec<Device>,
    /// Devices per user, indexed by user number.
    pub devices_of: Vec<u8>,
    pub reference_queue: String,
    pub results_queue: String,
    pub dir: PathBuf,
    db_name: String,
}

/// Users whose number is a multiple of this have two devices (an iPhone and an
/// iPad, say); the rest one.
const TWO_DEVICES_EVERY: usize = 5;

/// Device `i`'s environment: 6 in 10 production tokens registered as such, 3 in
/// 10 sandbox tokens registered as such, 1 in 10 sandbox tokens registered
/// without an environment (a client that does not say): the worker tries
/// production first, falls back, and remembers.
fn environments(i: usize) -> (Environment, Option<Environment>) {
    match i % 10 {
        0..=5 => (Environment::Production, Some(Environment::Production)),
        6..=8 => (Environment::Sandbox, Some(Environment::Sandbox)),
        _ => (Environment::Sandbox, None),
    }
}

fn token_for(i: usize) -> String {
    // Random, like real tokens: the unique index on (bundle_id, voip_token) sees
    // realistic keys rather than a sorted sequence.
    (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .chain(std::iter::once(format!("{i:08x}")))
        .collect()
}

impl Bench {
    /// Creates the database afresh, registers `users` users' devices in it and
    /// in a simulator started here, and declares the AMQP topology.
    pub async fn prepare(
        mut cfg: Config,
        postgres_url: &str,
        users: usize,
    ) -> Result<Self, String> {
        let dir = PathBuf::from("target/bench");
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let key_file = dir.join("AuthKey_BENCHKEY01.p8");
        std::fs::write(&key_file, generate_p8_pem()).map_err(|e| e.to_string())?;
        let app = AppConfig {
            bundle_id: BUNDLE.into(),
            team_id: "BENCHTEAM1".into(),
            key_id: "BENCHKEY01".into(),
            key_file,
            ..Default::default()
        };
        let sim = ApnsSim::start(SimOptions::local(
            SimApp::from_config(std::slice::from_ref(&app)).map_err(|e| e.to_string())?,
        ))
        .await?;
        let ca_file = dir.join("apns-sim-ca.pem");
        std::fs::write(&ca_file, &sim.ca_pem).map_err(|e| e.to_string())?;

        cfg.postgres.url = postgres_url.to_string();
        cfg.name_amqp_objects(PREFIX);
        cfg.apns.production_url = sim.production_url();
        cfg.apns.sandbox_url = sim.sandbox_url();
        cfg.apns.ca_file = Some(ca_file);
        cfg.apns.apps = vec![app];
        cfg.apns.bundle_id.clear();

        let db_name = pg_config(&cfg.postgres)?
            .0
            .get_dbname()
            .map(str::to_string)
            .ok_or("the bench's Postgres URL names no database")?;
        let mut bench = Self {
            cfg,
            sim,
            devices: Vec::new(),
            devices_of: vec![0; users],
            reference_queue: format!("{PREFIX}.reference"),
            results_queue: format!("{PREFIX}.results.collected"),
            dir,
            db_name,
        };
        bench.delete_amqp_objects().await;
        bench.drop_database().await?;
        ensure_database(&bench.cfg.postgres)
            .await
            .map_err(|e| e.to_string())?;
        let store = Store::connect(&bench.cfg.postgres).map_err(|e| e.to_string())?;
        store.migrate().await.map_err(|e| e.to_string())?;
        bench.register_devices(users).await?;
        let conn = connect(&bench.cfg.amqp, "bench setup")
            .await
            .map_err(|e| e.to_string())?;
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        declare_topology(&ch, &bench.cfg.amqp)
            .await
            .map_err(|e| e.to_string())?;
        let _ = conn.close(200, "done".into()).await;
        Ok(bench)
    }

    /// One multi-row INSERT (arrays unnested server-side): 10,000 users register
    /// in one round trip instead of 12,000.
    async fn register_devices(&mut self, users: usize) -> Result<(), String> {
        let mut i = 0;
        for user in 0..users {
            let n = if user % TWO_DEVICES_EVERY == 0 { 2 } else { 1 };
            for _ in 0..n {
                let (actual, registered) = environments(i);
                self.devices.push(Device {
                    user,
                    token: token_for(i),
                    actual,
                    registered,
                });
                i += 1;
            }
            self.devices_of[user] = n;
        }
        let (pg, tls) = pg_config(&self.cfg.postgres)?;
        let (client, conn) = pg
            .connect(tls)
            .await
            .map_err(|e| format!("postgres: {e}"))?;
        let task = tokio::spawn(conn);
        // Its backend's parent is the server's postmaster (a local server).
        if let Ok(row) = client.query_one("SELECT pg_backend_pid()", &[]).await {
            let backend = row.get::<_, i32>(0) as u32;
            if let Some(postmaster) = crate::procs::parent_pid(backend) {
                let _ = crate::procs::POSTMASTER.set(postmaster);
            }
        }
        let user_ids: Vec<String> = self.devices.iter().map(|d| user_id(d.user)).collect();
        let tokens: Vec<&str> = self.devices.iter().map(|d| d.token.as_str()).collect();
        let envs: Vec<&str> = self
            .devices
            .iter()
            .map(|d| d.registered.map(Environment::as_str).unwrap_or("unknown"))
            .collect();
        client
            .execute(
                "INSERT INTO devices (user_id, bundle_id, voip_token, environment)
                 SELECT u, $2, t, e FROM unnest($1::text[], $3::text[], $4::text[]) AS x(u, t, e)",
                &[&user_ids, &BUNDLE, &tokens, &envs],
            )
            .await
            .map_err(|e| format!("registering devices: {e}"))?;
        // Fresh statistics, as a long-running database would have.
        client
            .batch_execute("ANALYZE devices")
            .await
            .map_err(|e| format!("analyze: {e}"))?;
        drop(client);
        let _ = task.await;
        self.register_in_simulator();
        Ok(())
    }

    /// Makes every token valid in its real environment in the simulator.
    pub fn register_in_simulator(&self) {
        for d in &self.devices {
            self.sim.register_token(d.actual, &d.token, BUNDLE);
        }
    }

    /// Forgets the simulator's recorded requests (and, with them, its tokens,
    /// which are registered again) so memory stays flat across phases.
    pub fn reset_simulator(&self) {
        self.sim.reset();
        self.register_in_simulator();
    }

    /// How many results an event for `user` produces: one per device.
    pub fn results_for(&self, user: usize) -> u64 {
        u64::from(self.devices_of[user])
    }

    pub fn users(&self) -> usize {
        self.devices_of.len()
    }

    async fn delete_amqp_objects(&self) {
        let (queues, exchanges) = self.cfg.amqp_objects();
        let own = [self.reference_queue.as_str(), self.results_queue.as_str()];
        let queues = queues.into_iter().chain(own);
        delete_objects(&self.cfg.amqp, "bench cleanup", queues, exchanges).await;
    }

    async fn drop_database(&self) -> Result<(), String> {
        let (mut admin, tls) = pg_config(&self.cfg.postgres)?;
        admin.dbname("postgres");
        admin.connect_timeout(Duration::from_secs(5));
        let (client, conn) = admin
            .connect(tls)
            .await
            .map_err(|e| format!("postgres: {e}"))?;
        let task = tokio::spawn(conn);
        let quoted = self.db_name.replace('"', "\"\"");
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{quoted}\" WITH (FORCE)"
            ))
            .await
            .map_err(|e| format!("dropping the bench database: {e}"))?;
        drop(client);
        let _ = task.await;
        Ok(())
    }

    /// Deletes the bench's queues, exchanges and database.
    pub async fn teardown(&self) {
        self.sim.stop();
        self.delete_amqp_objects().await;
        if let Err(e) = self.drop_database().await {
            eprintln!("bench: {e}");
        }
        let _ = std::fs::remove_file(self.dir.join("AuthKey_BENCHKEY01.p8"));
    }
}

pub fn user_id(user: usize) -> String {
    format!("bench-user-{user}")
}

fn pg_config(
    pg: &voip_push_worker::config::PostgresConfig,
) -> Result<
    (
        tokio_postgres::Config,
        voip_push_worker::tls::postgres::PgTls,
    ),
    String,
> {
    voip_push_worker::tls::postgres::connect_config(pg)
        .map_err(|e| format!("bad Postgres URL: {e}"))
}
