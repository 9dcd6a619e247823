//! The worker's HTTP listener: `/metrics`, `/healthz`, `/readyz`, and the API
//! (`crate::api`); [`serve`] holds it against slow and greedy clients.

pub mod serve;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;
use crate::store::Store;
use crate::worker::ConsumerHealth;

/// The consumer loop wakes at least every 5 s; three missed beats mean it is stuck.
const HEARTBEAT_STALE_SECS: u64 = 15;
/// `/readyz` answers within this even when Postgres hangs.
const READY_DB_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub health: Arc<ConsumerHealth>,
    pub store: Store,
    /// The API for existing backends (`crate::api`), served on this listener too.
    pub api: crate::api::ApiState,
}

pub fn router(state: HttpState) -> Router {
    let api = crate::api::router(state.api.clone());
    let body_limits = serve::BodyLimits::new(&state.api.cfg.http, state.metrics.clone());
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(api)
        .layer(axum::middleware::from_fn_with_state(
            body_limits,
            serve::read_body_in_time,
        ))
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    s.metrics
        .amqp_publish_blocked
        .set(i64::from(s.api.publisher.is_blocked()));
    s.metrics
        .events_overdue
        .set(s.health.overdue(Instant::now()) as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    let last = s.health.heartbeat.load(Ordering::Relaxed);
    let age = crate::apns::token::unix_now().saturating_sub(last);
    if age <= HEARTBEAT_STALE_SECS {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("consumer loop silent for {age} s\n"),
        )
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if !s.health.consuming.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not consuming from RabbitMQ\n".to_string(),
        );
    }
    let now = Instant::now();
    s.metrics.events_overdue.set(s.health.overdue(now) as i64);
    if let Some(why) = s.health.stalled(now) {
        // Every slot may be taken by messages that no longer move: new calls
        // would wait behind them, so send traffic to another replica.
        return (StatusCode::SERVICE_UNAVAILABLE, format!("stalled: {why}\n"));
    }
    if s.api.publisher.is_blocked() {
        // Results cannot be published, so no event can be settled: take this
        // replica out of rotation until the broker's alarm clears.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "RabbitMQ is blocking publishes (resource alarm)\n".to_string(),
        );
    }
    match tokio::time::timeout(READY_DB_TIMEOUT, s.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_string()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("postgres: {e}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "postgres did not answer\n".to_string(),
        ),
    }
}
