//! voip-push-worker: consumes "call started" events from RabbitMQ, rings the
//! callee's iPhones with APNs VoIP pushes, and publishes each outcome.
//!
//! [`start`] wires the parts together; `main.rs` and the tests both call it.

pub mod amqp;
pub mod api;
pub mod apns;
pub mod apns_sim;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod event;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod retry_policy;
pub mod store;
pub mod tls;
pub mod trace;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::source::{QueueSource, Topology};
use crate::amqp::{Publisher, ResultsExchange};
use crate::apns::Apns;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::pipeline::{Disposition, Incoming, Pipeline};
use crate::store::{Store, StoreError};
use crate::worker::{ConsumerHealth, Lane, Watched};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Apns(#[from] apns::SetupError),
    /// The database lacks migrations this binary's statements need: every
    /// event would fail on them (and be dead-lettered), so nothing is consumed.
    #[error("the database is not migrated for this version: migrations {0:?} pending (run `voip-push-worker migrate` first)")]
    Unmigrated(Vec<i32>),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// A running worker.
pub struct Worker {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (the real port when the
    /// configuration asked for port 0).
    pub http_addr: SocketAddr,
    pub metrics: Metrics,
    pub health: Arc<ConsumerHealth>,
    consumer: JoinHandle<()>,
    http: JoinHandle<()>,
    shutdown: CancellationToken,
}

impl Worker {
    /// Waits until `shutdown` is cancelled and in-flight work has drained.
    pub async fn wait(self) {
        let _ = self.consumer.await;
        self.shutdown.cancel();
        let _ = self.http.await;
    }

    /// Cancels and waits.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

/// Starts the worker: HTTP listener, APNs client, publisher and the lanes on the
/// driver (`worker`). Nothing here waits for RabbitMQ: each lane connects (and
/// reconnects) by itself, and `/readyz` tells when it is consuming.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Worker, StartError> {
    config.validate_for_push()?;
    let cfg = Arc::new(config);
    let metrics = Metrics::new();
    let store = Store::connect(&cfg.postgres)?
        .with_token_queries(&cfg.store)
        .with_batch_metrics(&metrics.batch_requests);
    let apns = Arc::new(Apns::from_config(&cfg, metrics.clone())?);
    for app in apns.apps() {
        info!(bundle_id = %app.config.bundle_id, topic = %app.topic, team_id = %app.config.team_id,
            key_id = %app.config.key_id, "APNs app configured");
    }
    let publisher = Arc::new(Publisher::new(cfg.amqp.clone(), "publisher"));
    let health = Arc::new(ConsumerHealth::default());

    let listener = tokio::net::TcpListener::bind(&cfg.http.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: cfg.http.listen.clone(),
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: cfg.http.listen.clone(),
        source,
    })?;
    let api_state = api::ApiState::new(
        cfg.clone(),
        store.clone(),
        publisher.clone(),
        metrics.clone(),
    )?;
    api_state.log_groups();
    let devices = tokio::spawn(api::device_events::run(api_state.clone(), shutdown.clone()));
    let router = http::router(http::HttpState {
        metrics: metrics.clone(),
        health: health.clone(),
        store: store.clone(),
        api: api_state,
    });
    let listener = http::serve::Listener {
        listener,
        router,
        metrics: metrics.clone(),
        max_connections: cfg.http.max_connections,
        header_read_timeout: cfg.http.header_read_timeout(),
        drain: Duration::from_secs(cfg.worker.drain_timeout_secs),
    };
    let http = tokio::spawn(listener.serve(shutdown.clone()));
    info!(%http_addr, "serving /metrics, /healthz, /readyz");

    let pipeline = Arc::new(Pipeline {
        cfg: cfg.clone(),
        store: Arc::new(store.clone()),
        apns,
        results: Arc::new(ResultsExchange {
            publisher: publisher.clone(),
            exchange: cfg.amqp.results_exchange.clone(),
        }),
        metrics: metrics.clone(),
    });
    // The worker's id, locked in a session of its own for as long as its claims
    // may be open: until its lanes have drained, not just until shutdown starts.
    let alive = CancellationToken::new();
    let worker_id = store::liveness::Liveness::start(&cfg.postgres, alive.clone())
        .await?
        .worker_id;
    // Postgres answers by now (the liveness session waits for it). A worker
    // started before `migrate` ran would dead-letter every event on a missing
    // column: it stops instead, with the fix in its error, having consumed
    // nothing (the API and registration tasks started above stop with it).
    match store.pending_migrations().await {
        Ok(pending) if !pending.is_empty() => {
            alive.cancel();
            shutdown.cancel();
            return Err(StartError::Unmigrated(pending));
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not check the database's migrations"),
    }
    tokio::spawn(upkeep(
        store,
        Duration::from_secs(cfg.worker.claim_retention_hours * 3600),
        Duration::from_secs(cfg.worker.call_retention_days * 86_400),
        shutdown.clone(),
    ));
    // Two lanes: rings on the work queue, cancels on their own queue so that a
    // cancel never waits behind a backlog of rings.
    health.lanes.store(2, std::sync::atomic::Ordering::SeqCst);
    let watched = Watched {
        health: health.clone(),
        overdue_after: pipeline.longest_retry() + worker::health::OVERDUE_GRACE,
    };
    let lanes = [
        ("calls", cfg.amqp.work_queue.clone(), cfg.worker.concurrency),
        (
            "cancels",
            cfg.amqp.cancel_queue.clone(),
            cfg.worker.cancel_concurrency,
        ),
    ]
    .map(|(name, queue, concurrency)| {
        let lane = Lane {
            name,
            concurrency,
            prefetch: amqp::prefetch_for(concurrency),
            claim_owner: worker_id.clone(),
            drain: Duration::from_secs(cfg.worker.drain_timeout_secs),
            reconnect: amqp::RECONNECT,
            metrics: metrics.clone(),
            watched: Some(watched.clone()),
        };
        let source = QueueSource {
            amqp: cfg.amqp.clone(),
            role: "consumer",
            queue,
            topology: Topology::Calls,
            publisher: publisher.clone(),
        };
        tokio::spawn(worker::run(
            lane,
            source,
            pipeline.clone(),
            shutdown.clone(),
        ))
    });
    let consumer = tokio::spawn(async move {
        for lane in lanes.into_iter().chain([devices]) {
            let _ = lane.await;
        }
        publisher.close().await;
        alive.cancel();
    });
    Ok(Worker {
        http_addr,
        metrics,
        health,
        consumer,
        http,
        shutdown,
    })
}

/// The call lanes' handler: the pipeline, which retries a fault itself, the
/// message held, until it can be settled.
impl worker::Handler for Pipeline {
    fn handle(
        &self,
        msg: &Incoming,
        stop: &CancellationToken,
    ) -> impl std::future::Future<Output = Disposition> + Send {
        self.handle_until_settled(msg, stop)
    }
}

/// Purges old claims, calls and attempts, every 10 minutes.
async fn upkeep(
    store: Store,
    retention: Duration,
    call_retention: Duration,
    shutdown: CancellationToken,
) {
    const PURGE_EVERY: Duration = Duration::from_secs(600);
    loop {
        match store.purge_claims(retention).await {
            Ok(n) if n > 0 => info!(purged = n, "old delivery claims purged"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not purge old delivery claims"),
        }
        match store.purge_calls(call_retention).await {
            Ok(n) if n > 0 => info!(purged = n, "old calls and attempts purged"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not purge old calls"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PURGE_EVERY) => {}
        }
    }
}

/// Runs until `shutdown` is cancelled (SIGTERM/SIGINT in `main`).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    let worker = start(config, shutdown).await?;
    worker.wait().await;
    Ok(())
}
