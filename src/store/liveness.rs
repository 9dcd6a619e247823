//! How other workers know this one is alive: a Postgres session of its own that
//! holds an advisory lock named after the worker's id for as long as the worker
//! runs.
//!
//! When the process dies (`kill -9`, OOM) the kernel closes its sockets, Postgres
//! ends the session at once, and the lock is free: the next claimant of one of
//! its delivery claims sees that (`pg_try_advisory_xact_lock_shared` succeeds) and
//! takes the claim over in the same statement, instead of waiting out a lease. A
//! host that vanishes without closing its sockets is found by the session's TCP
//! keepalives (about 15 s). A worker whose own liveness session is lost (a
//! Postgres restart) locks its id again as soon as it reconnects.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::StoreError;
use crate::config::PostgresConfig;
use crate::retry_policy::RetryPolicy;
use crate::tls::postgres::PgTls;

/// Pauses between attempts to open the liveness session.
const SESSION_RETRY: RetryPolicy =
    RetryPolicy::doubling(Duration::from_millis(100), Duration::from_secs(5));

/// The first key of every liveness lock (the second is `hashtext(worker_id)`):
/// "vpw1". Appears as a literal in the claim statements (see `claims`).
pub const LOCK_CLASS: i32 = 0x7670_7731;

/// A worker id whose liveness lock is held, and the task that keeps holding it.
pub struct Liveness {
    pub worker_id: String,
}

/// Settings for the liveness session: Postgres notices a vanished peer within
/// about 15 s instead of the kernel's default two hours.
const KEEPALIVE_OPTIONS: &str = "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 \
     -c tcp_keepalives_count=3 -c tcp_user_timeout=15000";

impl Liveness {
    /// Picks a worker id and takes its lock (a new id if another live worker's
    /// id hashes the same), waiting for Postgres as long as it takes, then keeps
    /// the session alive, reconnecting and re-locking whenever it is lost, until
    /// `stop`.
    pub async fn start(cfg: &PostgresConfig, stop: CancellationToken) -> Result<Self, StoreError> {
        let (mut pg, tls) = super::pg_config(cfg)?;
        pg.options(KEEPALIVE_OPTIONS);
        pg.keepalives(true).keepalives_idle(Duration::from_secs(5));
        pg.application_name("voip-push-worker liveness");
        let mut delays = SESSION_RETRY.delays();
        let mut delay = delays.next_delay();
        loop {
            let worker_id = uuid::Uuid::new_v4().simple().to_string();
            match Session::open(&pg, &tls, &worker_id).await {
                Ok(Some(session)) => {
                    info!(%worker_id, "worker id (owner of its delivery claims) locked");
                    tokio::spawn(session.keep(pg, tls, stop));
                    return Ok(Self { worker_id });
                }
                Ok(None) => continue,
                Err(e) => {
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                        "cannot open the liveness session to Postgres; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return Err(e),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = delays.next_delay();
                }
            }
        }
    }
}

/// One liveness session holding the lock.
struct Session {
    /// Kept: dropping it would end the session.
    _client: tokio_postgres::Client,
    conn: tokio::task::JoinHandle<()>,
    worker_id: String,
}

impl Session {
    /// `None`: the lock is taken (by a live worker whose id hashes the same).
    async fn open(
        pg: &tokio_postgres::Config,
        tls: &PgTls,
        worker_id: &str,
    ) -> Result<Option<Self>, StoreError> {
        let (client, conn) = pg.connect(tls.clone()).await?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&LOCK_CLASS, &worker_id],
            )
            .await?
            .get(0);
        if !locked {
            conn.abort();
            return Ok(None);
        }
        Ok(Some(Self {
            _client: client,
            conn,
            worker_id: worker_id.to_string(),
        }))
    }

    /// Holds the lock until `shutdown`; when the session is lost, opens a new
    /// one and locks the same id again.
    async fn keep(mut self, pg: tokio_postgres::Config, tls: PgTls, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut self.conn => {}
            }
            warn!("liveness session to Postgres lost; reconnecting");
            let mut delays = SESSION_RETRY.delays();
            let mut delay = delays.next_delay();
            self = loop {
                match Session::open(&pg, &tls, &self.worker_id).await {
                    Ok(Some(s)) => break s,
                    Ok(None) => warn!("liveness lock held by another session; retrying"),
                    Err(e) => warn!(error = %e, "cannot reopen the liveness session; retrying"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = delays.next_delay();
            };
            info!("liveness session reopened");
        }
    }
}
