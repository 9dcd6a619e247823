//! The consumer loop: bounded concurrency (a semaphore permit before each delivery,
//! prefetch = permits), a reconnect loop with jittered backoff, and settling each
//! message exactly once from the pipeline's [`Disposition`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use lapin::types::{AMQPValue, LongString};
use lapin::BasicProperties;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{connect, declare_topology, AmqpError, Publisher};
use crate::pipeline::{Disposition, Incoming, Pipeline};

/// What `/healthz` and `/readyz` read, shared by the consumer loops (lanes).
#[derive(Default)]
pub struct ConsumerHealth {
    /// Every lane connected and consuming.
    pub consuming: AtomicBool,
    /// Lanes the worker runs, and how many are consuming now.
    pub lanes: AtomicUsize,
    consuming_lanes: AtomicUsize,
    /// Unix seconds of the loop's last sign of life.
    pub heartbeat: AtomicU64,
    /// Times the loop started consuming (1 + reconnects).
    pub sessions: AtomicU64,
}

impl ConsumerHealth {
    fn lane_up(&self) {
        let up = self.consuming_lanes.fetch_add(1, Ordering::SeqCst) + 1;
        self.consuming.store(
            up >= self.lanes.load(Ordering::SeqCst).max(1),
            Ordering::SeqCst,
        );
    }

    fn lane_down(&self) {
        self.consuming_lanes.fetch_sub(1, Ordering::SeqCst);
        self.consuming.store(false, Ordering::SeqCst);
    }

    fn beat(&self) {
        self.heartbeat
            .store(crate::apns::token::unix_now(), Ordering::Relaxed);
    }
}

pub struct Consumer {
    pub pipeline: Arc<Pipeline>,
    /// The queue this loop consumes, and how many of its messages it works on at once.
    pub queue: String,
    pub concurrency: u16,
    /// This process's id on delivery claims.
    pub worker_id: String,
    /// Publishes dead letters (with their reason) on the publisher connection.
    pub publisher: Arc<Publisher>,
    pub health: Arc<ConsumerHealth>,
}

impl Consumer {
    /// Consumes until `shutdown`, reconnecting after any broker failure, then drains.
    pub async fn run(self, shutdown: CancellationToken) {
        let cfg = self.pipeline.cfg.clone();
        let permits = Arc::new(Semaphore::new(self.concurrency as usize));
        let mut tasks = JoinSet::new();
        let backoff = super::reconnect_backoff();
        let mut delays = backoff.build();
        let mut seq: u64 = 0;
        self.health.beat();

        'connection: while !shutdown.is_cancelled() {
            let session = async {
                let conn = connect(&cfg.amqp, "consumer").await?;
                let ch = conn.create_channel().await?;
                declare_topology(&ch, &cfg.amqp).await?;
                let consumer = super::consume(&ch, &self.queue, self.concurrency).await?;
                Ok::<_, AmqpError>((conn, ch, consumer))
            }
            .await;
            let (conn, ch, mut consumer) = match session {
                Ok(s) => s,
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot consume; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'connection,
                        _ = tokio::time::sleep(delay) => continue 'connection,
                    }
                }
            };
            delays = backoff.build();
            self.health.lane_up();
            self.health.sessions.fetch_add(1, Ordering::Relaxed);
            info!(queue = %self.queue, concurrency = self.concurrency, "consuming");

            loop {
                self.health.beat();
                // Reap finished tasks so the set does not grow without bound.
                while tasks.try_join_next().is_some() {}
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
                };
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    // Wake up now and then so the heartbeat shows the loop is alive.
                    _ = tokio::time::sleep(Duration::from_secs(5)) => { drop(permit); continue; }
                    n = consumer.next() => n,
                };
                let delivery = match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        warn!(error = %e, "consumer failed; reconnecting");
                        break;
                    }
                    None => {
                        warn!("broker cancelled the consumer or closed the channel; reconnecting");
                        break;
                    }
                };
                let pipeline = self.pipeline.clone();
                let publisher = self.publisher.clone();
                let stop = shutdown.clone();
                seq += 1;
                let owner = format!("{}/{seq}", self.worker_id);
                tasks.spawn(async move {
                    let _permit = permit;
                    pipeline.metrics.in_flight.inc();
                    let msg = incoming(&delivery, owner);
                    let disposition = handle_until_settled(&pipeline, &msg, &stop).await;
                    settle(&pipeline, &publisher, &delivery, disposition).await;
                    pipeline.metrics.in_flight.dec();
                });
            }
            self.health.lane_down();

            if shutdown.is_cancelled() {
                // Stop deliveries first, let in-flight work finish, then close: what is
                // still unacknowledged returns to the queue for another worker.
                let _ = ch
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await;
                drain(
                    &mut tasks,
                    Duration::from_secs(cfg.worker.drain_timeout_secs),
                )
                .await;
                let _ = ch.close(200, "shutdown".into()).await;
                let _ = conn.close(200, "shutdown".into()).await;
                return;
            }
            let _ = conn.close(200, "reconnecting".into()).await;
        }
        drain(
            &mut tasks,
            Duration::from_secs(cfg.worker.drain_timeout_secs),
        )
        .await;
    }
}

async fn drain(tasks: &mut JoinSet<()>, timeout: Duration) {
    if tasks.is_empty() {
        return;
    }
    info!(in_flight = tasks.len(), "draining in-flight events");
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(timeout, all).await.is_err() {
        warn!(
            left = tasks.len(),
            "drain deadline passed; unfinished events return to the queue"
        );
        tasks.abort_all();
    }
}

/// Handles a message until it can be settled. A fault (database or broker down)
/// is retried here, with the message held unacknowledged and a growing pause,
/// rather than requeued: a requeue would count against the queue's delivery limit
/// and send good events to the dead-letter queue during an outage. Only shutdown
/// returns such a message to the queue.
async fn handle_until_settled(
    pipeline: &Pipeline,
    msg: &Incoming,
    shutdown: &CancellationToken,
) -> Disposition {
    let mut delay = Duration::from_millis(pipeline.cfg.worker.retry_delay_ms);
    loop {
        match pipeline.handle(msg).await {
            Disposition::Retry(reason) if !shutdown.is_cancelled() => {
                warn!(%reason, retry_in_ms = delay.as_millis() as u64, "event not handled; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Disposition::Retry(reason),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RETRY_PAUSE);
            }
            other => return other,
        }
    }
}

/// Longest pause between two tries of an event that hit a fault.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(15);

fn incoming(d: &Delivery, claim_owner: String) -> Incoming {
    Incoming {
        claim_owner,
        body: d.data.clone(),
        message_id: d
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string()),
        timestamp: *d.properties.timestamp(),
    }
}

/// Settles one message, exactly once.
async fn settle(
    pipeline: &Pipeline,
    publisher: &Publisher,
    d: &Delivery,
    disposition: Disposition,
) {
    let cfg = &pipeline.cfg;
    let result = match disposition {
        Disposition::Ack => d.acker.ack(BasicAckOptions::default()).await,
        Disposition::Retry(reason) => {
            // Only at shutdown: back to the queue for another worker.
            warn!(%reason, "returning the event to the queue");
            d.acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
        Disposition::DeadLetter { kind, message } => {
            // Publish it ourselves so the dead letter carries its reason; fall back to
            // the broker's dead-lettering if that fails.
            let mut headers = d.properties.headers().clone().unwrap_or_default();
            headers.insert(
                "x-vpw-reason".into(),
                AMQPValue::LongString(LongString::from(kind)),
            );
            headers.insert(
                "x-vpw-error".into(),
                AMQPValue::LongString(LongString::from(message.as_str())),
            );
            let props = BasicProperties::default()
                .with_headers(headers)
                .with_content_type(
                    d.properties
                        .content_type()
                        .clone()
                        .unwrap_or_else(|| "application/octet-stream".into()),
                );
            match publisher
                .publish(
                    &cfg.amqp.dead_letter_exchange,
                    d.routing_key.as_str(),
                    &d.data,
                    props,
                )
                .await
            {
                Ok(()) => d.acker.ack(BasicAckOptions::default()).await,
                Err(e) => {
                    warn!(error = %e, "could not publish the dead letter; rejecting to the broker's DLX");
                    d.acker
                        .nack(BasicNackOptions {
                            requeue: false,
                            ..Default::default()
                        })
                        .await
                }
            }
        }
    };
    match result {
        Ok(true) => {}
        Ok(false) => {
            warn!("the broker did not take the acknowledgement; the message will be redelivered")
        }
        Err(e) => error!(error = %e, "could not settle the message; it will be redelivered"),
    }
}
