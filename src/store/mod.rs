//! Postgres: the connection pool, its errors and migrations; the queries live in
//! the modules by what they store (devices, calls, claims, outcomes).

pub mod admit;
mod batch;
pub mod calls;
pub mod claims;
mod devices;
pub mod external;
pub mod history;
pub mod liveness;
pub mod migrate;

pub use devices::{normalize_token, Device, Registration, MAX_TOKEN_HEX};
mod outcomes;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::config::PostgresConfig;
use crate::tls::postgres::PgTls;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // tokio-postgres keeps the reason (the server's message, a TLS failure) in
    // the error's source, not in its Display.
    #[error("postgres: {}", crate::tls::error_chain(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("postgres pool: {}", crate::tls::error_chain(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("postgres URL is invalid: {0}")]
    Url(String),
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: i32,
        name: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("invalid device token: {0}")]
    BadToken(&'static str),
    /// A batched statement failed for every request in it (see `batch`).
    #[error("postgres (batched statement): {0}")]
    Batch(String),
}

impl StoreError {
    /// A database that is down or slow is worth waiting for; a bad token is not,
    /// and neither is a statement Postgres refuses for its values or its shape
    /// (SQLSTATE classes 22 data exception, 23 integrity, 42 syntax or undefined
    /// object): the same statement fails the same way every time.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::BadToken(_) | StoreError::Url(_) => false,
            StoreError::Db(e) => !e
                .code()
                .is_some_and(|c| matches!(&c.code()[..2], "22" | "23" | "42")),
            _ => true,
        }
    }

    /// Postgres refused the statement itself (a value, a constraint, a deadlock),
    /// as opposed to a lost connection or a server shutting down.
    fn is_statement_error(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            StoreError::Db(e) => e.code().is_some_and(|c| {
                let class = &c.code()[..2];
                matches!(class, "22" | "23" | "42") || *c == SqlState::T_R_DEADLOCK_DETECTED
            }),
            StoreError::BadToken(_) => true,
            _ => false,
        }
    }
}

/// The batch pool's session settings.
///
/// Batched statements find every row by key (`= ANY` on an index). A table
/// whose statistics call it small (new, or not analyzed since it grew) gets a
/// sequential scan in the statement's cached plan instead, and keeps it as the
/// table grows: measured 5.5 ms per batch against 40,000 claims, the largest
/// cost of the whole pipeline. These connections never scan a table.
///
/// Their statements are prepared once and their plans are the same whatever
/// the batch holds (index probes per key), yet Postgres plans a prepared
/// statement afresh for each execution while a plan for the given arrays looks
/// cheaper than the generic one: the finishing statement spent 43% of its time
/// in the planner (`pg_stat_statements`). These connections always use the
/// generic plan.
fn batch_session(mut pg: tokio_postgres::Config) -> tokio_postgres::Config {
    let options = format!(
        "{} -c enable_seqscan=off -c plan_cache_mode=force_generic_plan",
        pg.get_options().unwrap_or("")
    );
    pg.options(options.trim());
    pg
}

fn build_pool(
    pg: tokio_postgres::Config,
    tls: PgTls,
    size: usize,
    timeout: Duration,
) -> Result<Pool, StoreError> {
    let mgr = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Url(e.to_string()))
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Set when `store.token_query` points at a team's own token table.
    external: Option<Arc<external::ExternalTokens>>,
    batches: Arc<Batches>,
}

/// The per-event statements that concurrent events share (see `batch`), each
/// started on first use, with connections of their own so that the API or a
/// cancel waiting for its rings never delays them.
struct Batches {
    pool: Pool,
    admit_ring: OnceLock<batch::Batcher<admit::Ring, admit::Admitted>>,
    live_devices: OnceLock<batch::Batcher<(String, String), Vec<Device>>>,
    finish_event: OnceLock<batch::Batcher<outcomes::Finished, ()>>,
    is_cancelled: OnceLock<batch::Batcher<String, bool>>,
    /// `voip_push_batch_requests`, once the worker's metrics are given
    /// ([`Store::with_batch_metrics`]); a batcher started before counts nothing.
    sizes: OnceLock<prometheus::HistogramVec>,
    /// A ring's two statements (admit, finish) take turns: one of them runs
    /// at a time, so each batch gathers the requests that arrived while the
    /// other ran. Each statement has a fixed cost larger than that of several
    /// more events in it (see the README's design notes).
    ring_turns: Arc<tokio::sync::Semaphore>,
}

/// Whose turns a batcher takes (see [`Batches::ring_turns`]).
#[derive(Clone, Copy)]
enum Turns {
    /// The ring's statements, one at a time between them.
    Ring,
    /// Its own: one batch of its kind at a time.
    Own,
}

/// The batches of a statement on an event's way to its ring: at once.
const PROMPT: batch::Shape = batch::Shape {
    max: 64,
    linger: Duration::ZERO,
};
/// The batches of a statement after the ring (recording outcomes): under a
/// paced load they would hold one event each, so a small one waits a little
/// for more while the admitting statement is idle (the README's design notes:
/// *Outcomes recorded in handfuls*).
const LINGERING: batch::Shape = batch::Shape {
    max: 64,
    linger: Duration::from_millis(10),
};
/// Connections of the batches' pool: the ring's statements (which take turns,
/// see [`Batches::ring_turns`]), the rarer kinds (a retry's look at its call,
/// device lookups), one to spare for a statement whose connection is being
/// replaced.
const BATCH_CONNECTIONS: usize = 3;

/// The batcher in `slot`, started with `run` on first use.
fn batcher<'a, R, T, Fut>(
    name: &'static str,
    slot: &'a OnceLock<batch::Batcher<R, T>>,
    turns: Turns,
    shape: batch::Shape,
    batches: &Batches,
    run: fn(Pool, batch::Requests<R>) -> Fut,
) -> &'a batch::Batcher<R, T>
where
    R: Clone + Send + Sync + 'static,
    T: Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<T>, StoreError>> + Send + 'static,
{
    slot.get_or_init(|| {
        let pool = batches.pool.clone();
        let turns = match turns {
            Turns::Ring => batches.ring_turns.clone(),
            Turns::Own => Arc::new(tokio::sync::Semaphore::new(1)),
        };
        debug_assert!(
            crate::metrics::BATCHED_STATEMENTS.contains(&name),
            "{name} is not among the exported statements"
        );
        let sizes = batches.sizes.get().map(|h| h.with_label_values(&[name]));
        batch::Batcher::spawn(name, shape, turns, sizes, move |reqs| {
            run(pool.clone(), reqs)
        })
    })
}

pub(crate) fn pg_config(
    pg: &PostgresConfig,
) -> Result<(tokio_postgres::Config, PgTls), StoreError> {
    let (mut cfg, tls) = crate::tls::postgres::connect_config(pg).map_err(StoreError::Url)?;
    // Without this a black-holed database makes every connect hang for minutes.
    cfg.connect_timeout(Duration::from_secs(5));
    cfg.application_name("voip-push-worker");
    Ok((cfg, tls))
}

/// Creates the database named in `url` if it does not exist (connecting to the
/// `postgres` maintenance database of the same server), so `migrate` works on a
/// fresh server.
pub async fn ensure_database(pg: &PostgresConfig) -> Result<bool, StoreError> {
    let (cfg, tls) = pg_config(pg)?;
    let Some(name) = cfg.get_dbname().map(str::to_string) else {
        return Ok(false);
    };
    let mut admin = cfg.clone();
    admin.dbname("postgres");
    let (client, conn) = admin.connect(tls).await?;
    let task = tokio::spawn(conn);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = name.replace('"', "\"\"");
        if let Err(e) = client
            .batch_execute(&format!("CREATE DATABASE \"{quoted}\""))
            .await
        {
            // Another replica may have created it between our check and now.
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                return Err(e.into());
            }
        }
    }
    drop(client);
    let _ = task.await;
    Ok(!exists)
}

impl Store {
    pub fn connect(cfg: &PostgresConfig) -> Result<Self, StoreError> {
        let (mut pg, tls) = pg_config(cfg)?;
        if !cfg.synchronous_commit {
            // The worker's writes are many and small; waiting for each WAL flush
            // makes Postgres the bottleneck. A Postgres crash (not a restart) can
            // then lose the last fraction of a second of them; cancels are always
            // committed synchronously (see `cancel_call`).
            pg.options("-c synchronous_commit=off");
        }
        let timeout = Duration::from_millis(cfg.pool_timeout_ms);
        Ok(Self {
            pool: build_pool(pg.clone(), tls.clone(), cfg.pool_size, timeout)?,
            external: None,
            batches: Arc::new(Batches {
                pool: build_pool(batch_session(pg), tls, BATCH_CONNECTIONS, timeout)?,
                admit_ring: OnceLock::new(),
                live_devices: OnceLock::new(),
                finish_event: OnceLock::new(),
                is_cancelled: OnceLock::new(),
                sizes: OnceLock::new(),
                ring_turns: Arc::new(tokio::sync::Semaphore::new(1)),
            }),
        })
    }

    /// Reads tokens with `store.token_query` (when set) instead of our `devices`
    /// table; see [`external`].
    pub fn with_token_queries(mut self, cfg: &crate::config::StoreConfig) -> Self {
        self.external = external::ExternalTokens::from_config(cfg).map(Arc::new);
        self
    }

    /// Counts each shared statement's requests in `sizes` (by statement name).
    pub fn with_batch_metrics(self, sizes: &prometheus::HistogramVec) -> Self {
        let _ = self.batches.sizes.set(sizes.clone());
        self
    }

    pub async fn migrate(&self) -> Result<Vec<i32>, StoreError> {
        let mut client = self.pool.get().await?;
        migrate::migrate(&mut client).await
    }

    /// The migrations this binary knows that the database has not applied.
    pub async fn pending_migrations(&self) -> Result<Vec<i32>, StoreError> {
        let client = self.pool.get().await?;
        migrate::pending(&client).await
    }

    /// How the batched statements prepared on the batch pool's connections were
    /// planned: (statement, generic plans, custom plans) each (see
    /// [`batch_session`]). For tests and diagnosis.
    pub async fn batch_plans(&self) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let mut held = Vec::new();
        let mut plans = Vec::new();
        // Every connection of the pool at once, so each is asked once.
        for _ in 0..BATCH_CONNECTIONS {
            let client = self.batches.pool.get().await?;
            let rows = client
                .query(
                    "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements",
                    &[],
                )
                .await?;
            plans.extend(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))));
            held.push(client);
        }
        Ok(plans)
    }

    /// Answers when the database does (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }
}
