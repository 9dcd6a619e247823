//! Postgres: the connection pool, migrations, and the device queries.

pub mod admit;
mod batch;
pub mod calls;
pub mod claims;
pub mod external;
pub mod liveness;
pub mod migrate;
mod outcomes;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::config::PostgresConfig;
use crate::event::Environment;
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

/// Tokens are hex of opaque bytes; Apple's are 32 bytes today, but the length is
/// not promised, so any even length up to 200 digits is accepted.
pub const MAX_TOKEN_HEX: usize = 200;

/// Lower-cases and checks a device token: hex only, an even number of digits.
pub fn normalize_token(token: &str) -> Result<String, StoreError> {
    let t = token.trim().to_ascii_lowercase();
    if t.is_empty() {
        return Err(StoreError::BadToken("empty"));
    }
    if t.len() > MAX_TOKEN_HEX {
        return Err(StoreError::BadToken("longer than 200 hex digits"));
    }
    if !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StoreError::BadToken("not hexadecimal"));
    }
    if t.len() % 2 != 0 {
        return Err(StoreError::BadToken("odd number of hex digits"));
    }
    Ok(t)
}

/// What a registration did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub id: i64,
    /// The user the token belonged to, when this registration moved it.
    pub moved_from: Option<String>,
}

/// A live device of a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub id: i64,
    pub token: String,
    /// `None` while unknown.
    pub environment: Option<Environment>,
    /// Last registration, ms since epoch (compared with APNs' 410 timestamp).
    pub updated_at_ms: i64,
    /// APNs has accepted a push to this token before.
    pub proven: bool,
}

/// Batched statements find every row by key (`= ANY` on an index). A table
/// whose statistics call it small (new, or not analyzed since it grew) gets a
/// sequential scan in the statement's cached plan instead, and keeps it as the
/// table grows: measured 5.5 ms per batch against 40,000 claims, the largest
/// cost of the whole pipeline. These connections never scan a table.
fn without_seqscan(mut pg: tokio_postgres::Config) -> tokio_postgres::Config {
    let options = format!("{} -c enable_seqscan=off", pg.get_options().unwrap_or(""));
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
    record_outcome: OnceLock<batch::Batcher<outcomes::Outcome, ()>>,
    finish_event: OnceLock<batch::Batcher<claims::Finished, ()>>,
    is_cancelled: OnceLock<batch::Batcher<String, bool>>,
}

/// Most requests in one batched statement, and batches of one kind under way
/// at once.
const BATCH_MAX: usize = 64;
const BATCHES_IN_FLIGHT: usize = 1;
/// Connections of the batches' pool: one for each of the three statements of
/// every ring (admit, record, publish-and-settle); the rarer kinds share them.
const BATCH_CONNECTIONS: usize = 3;

/// The batcher in `slot`, started with `run` on first use.
fn batcher<'a, R, T, Fut>(
    name: &'static str,
    slot: &'a OnceLock<batch::Batcher<R, T>>,
    batches: &Batches,
    run: fn(Pool, Vec<R>) -> Fut,
) -> &'a batch::Batcher<R, T>
where
    R: Clone + Send + 'static,
    T: Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<T>, StoreError>> + Send + 'static,
{
    slot.get_or_init(|| {
        let pool = batches.pool.clone();
        batch::Batcher::spawn(name, BATCH_MAX, BATCHES_IN_FLIGHT, move |reqs| {
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
                pool: build_pool(without_seqscan(pg), tls, BATCH_CONNECTIONS, timeout)?,
                admit_ring: OnceLock::new(),
                live_devices: OnceLock::new(),
                record_outcome: OnceLock::new(),
                finish_event: OnceLock::new(),
                is_cancelled: OnceLock::new(),
            }),
        })
    }

    /// Reads tokens with `store.token_query` (when set) instead of our `devices`
    /// table; see [`external`].
    pub fn with_token_queries(mut self, cfg: &crate::config::StoreConfig) -> Self {
        self.external = external::ExternalTokens::from_config(cfg).map(Arc::new);
        self
    }

    /// Forgets a token (every app): `DELETE /v1/devices/{token}`.
    pub async fn unregister_token(&self, token: &str) -> Result<u64, StoreError> {
        let token = normalize_token(token)?;
        let client = self.pool.get().await?;
        Ok(client
            .execute("DELETE FROM devices WHERE voip_token = $1", &[&token])
            .await?)
    }

    pub async fn migrate(&self) -> Result<Vec<i32>, StoreError> {
        let mut client = self.pool.get().await?;
        migrate::migrate(&mut client).await
    }

    /// Answers when the database does (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Registers or refreshes a token: re-registration clears any invalidation and
    /// moves the token to `user_id` (recording whom it moved from, and when).
    /// `environment` `None` keeps what was known.
    pub async fn register_device(
        &self,
        user_id: &str,
        bundle_id: &str,
        token: &str,
        environment: Option<Environment>,
    ) -> Result<Registration, StoreError> {
        let token = normalize_token(token)?;
        let client = self.pool.get().await?;
        let env = environment.map(Environment::as_str);
        // `moved_at = now()` only when this statement moved it: `now()` is the
        // transaction's start, and any earlier move committed before it.
        let row = client
            .query_one(
                "INSERT INTO devices (user_id, bundle_id, voip_token, environment)
                 VALUES ($1, $2, $3, COALESCE($4, 'unknown'))
                 ON CONFLICT (bundle_id, voip_token) DO UPDATE SET
                     user_id = EXCLUDED.user_id,
                     previous_user_id = CASE WHEN devices.user_id <> EXCLUDED.user_id
                         THEN devices.user_id ELSE devices.previous_user_id END,
                     moved_at = CASE WHEN devices.user_id <> EXCLUDED.user_id
                         THEN now() ELSE devices.moved_at END,
                     environment = COALESCE($4, devices.environment),
                     updated_at = now(),
                     invalidated_at = NULL,
                     invalid_reason = NULL
                 RETURNING id, CASE WHEN moved_at = now() THEN previous_user_id END",
                &[&user_id, &bundle_id, &token, &env],
            )
            .await?;
        Ok(Registration {
            id: row.get(0),
            moved_from: row.get(1),
        })
    }

    /// A user's live (not invalidated) devices for one app, oldest first.
    pub async fn live_devices(
        &self,
        user_id: &str,
        bundle_id: &str,
    ) -> Result<Vec<Device>, StoreError> {
        if let Some(ext) = &self.external {
            return ext.live_devices(&self.pool, user_id, bundle_id).await;
        }
        batcher(
            "live_devices",
            &self.batches.live_devices,
            &self.batches,
            live_devices_of,
        )
        .call((user_id.to_string(), bundle_id.to_string()))
        .await
    }

    /// Records a success and the environment that accepted the token, so the next
    /// call goes straight there. (The pipeline records them with each push's
    /// outcome; this is for tools and tests.)
    pub async fn record_success(
        &self,
        device_id: i64,
        environment: Environment,
    ) -> Result<(), StoreError> {
        if let (Some(ext), true) = (&self.external, device_id < 0) {
            return ext.record_success(&self.pool, device_id, environment).await;
        }
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE devices SET last_success_at = now(), environment = $2 WHERE id = $1",
                &[&device_id, &environment.as_str()],
            )
            .await?;
        Ok(())
    }

    /// Marks a token invalid. With `unless_registered_after_ms` (APNs' 410
    /// timestamp), a token re-registered after that moment stays live. Returns
    /// whether the token was invalidated.
    pub async fn invalidate(
        &self,
        device_id: i64,
        reason: &str,
        unless_registered_after_ms: Option<i64>,
    ) -> Result<bool, StoreError> {
        if let (Some(ext), true) = (&self.external, device_id < 0) {
            return ext.invalidate(&self.pool, device_id, reason).await;
        }
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE devices SET invalidated_at = now(), invalid_reason = $2
                 WHERE id = $1 AND invalidated_at IS NULL
                   AND ($3::bigint IS NULL OR updated_at <= to_timestamp($3::bigint / 1000.0))",
                &[&device_id, &reason, &unless_registered_after_ms],
            )
            .await?;
        Ok(n == 1)
    }
}

/// The live devices of many (user, bundle) pairs in one statement.
async fn live_devices_of(
    pool: Pool,
    keys: Vec<(String, String)>,
) -> Result<Vec<Vec<Device>>, StoreError> {
    let mut users: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let mut bundles: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    for v in [&mut users, &mut bundles] {
        v.sort_unstable();
        v.dedup();
    }
    let client = pool.get().await?;
    // `= ANY` on both columns keeps to the (user_id, bundle_id) index; pairs
    // nobody asked for (another user's app) are dropped below.
    let stmt = client
        .prepare_cached(
            "SELECT id, voip_token, environment, (extract(epoch FROM updated_at) * 1000)::bigint,
                    last_success_at IS NOT NULL, user_id, bundle_id
             FROM devices
             WHERE user_id = ANY($1) AND bundle_id = ANY($2) AND invalidated_at IS NULL
             ORDER BY id",
        )
        .await?;
    let rows = client.query(&stmt, &[&users, &bundles]).await?;
    let mut found: std::collections::HashMap<(&str, &str), Vec<Device>> =
        std::collections::HashMap::new();
    for r in &rows {
        found.entry((r.get(5), r.get(6))).or_default().push(Device {
            id: r.get(0),
            token: r.get(1),
            environment: Environment::parse(r.get::<_, &str>(2)),
            updated_at_ms: r.get(3),
            proven: r.get(4),
        });
    }
    Ok(keys
        .iter()
        .map(|(u, b)| {
            found
                .get(&(u.as_str(), b.as_str()))
                .cloned()
                .unwrap_or_default()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_normalised_and_checked() {
        assert_eq!(normalize_token(" ABCDEF01 ").unwrap(), "abcdef01");
        assert!(normalize_token("").is_err());
        assert!(normalize_token("abc").is_err());
        assert!(normalize_token("zz").is_err());
        assert!(normalize_token(&"a".repeat(202)).is_err());
        assert!(normalize_token(&"a".repeat(200)).is_ok());
    }
}
