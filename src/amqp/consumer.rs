//! The consumer loop: bounded concurrency (a semaphore permit before each delivery,
//! prefetch = permits), a reconnect loop with jittered backoff, and settling each
//! message exactly once from the pipeline's [`Disposition`].

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use super::health::ConsumerHealth;
use super::{connect, declare_topology, AmqpError, Publisher};
use crate::pipeline::{Disposition, Incoming, Pipeline};
use crate::retry_policy::RetryPolicy;

pub struct Consumer {
    pub pipeline: Arc<Pipeline>,
    /// `calls` or `cancels`: the lane's name in metrics.
    pub lane: &'static str,
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
        let mut delays = super::RECONNECT.delays();
        let mut seq: u64 = 0;
        // How long a message may be held before it counts as overdue (health).
        let hold_for = self.pipeline.longest_retry() + OVERDUE_GRACE;
        self.health.beat();

        'connection: while !shutdown.is_cancelled() {
            let session = async {
                let conn = connect(&cfg.amqp, "consumer").await?;
                let ch = conn.create_channel().await?;
                declare_topology(&ch, &cfg.amqp).await?;
                let prefetch = super::prefetch_for(self.concurrency);
                let consumer = super::consume(&ch, &self.queue, prefetch).await?;
                Ok::<_, AmqpError>((conn, ch, consumer))
            }
            .await;
            let (conn, ch, mut consumer) = match session {
                Ok(s) => s,
                Err(e) => {
                    let delay = delays.next_delay();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot consume; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'connection,
                        _ = tokio::time::sleep(delay) => continue 'connection,
                    }
                }
            };
            delays = super::RECONNECT.delays();
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
                let health = self.health.clone();
                let lane = self.lane;
                let stop = shutdown.clone();
                seq += 1;
                let owner = format!("{}/{seq}", self.worker_id);
                let slots = permits.clone();
                // Boxed: the handling future is large, and a task's future is
                // moved when spawned and when it completes (memmove was the
                // worker's top symbol).
                tasks.spawn(Box::pin(async move {
                    pipeline.metrics.in_flight.inc();
                    let msg = incoming(&delivery, owner);
                    let held = health.hold(Instant::now() + hold_for);
                    let disposition = handle(&pipeline, &msg, permit, &slots, &stop).await;
                    settle(&pipeline, &publisher, lane, &delivery, disposition).await;
                    drop(held);
                    pipeline.metrics.in_flight.dec();
                }));
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

/// A message is overdue this long after the longest retry bound: one last try
/// may still be waiting out the store's or the broker's patience (30 s each).
const OVERDUE_GRACE: Duration = Duration::from_secs(60);

/// How often a message whose claims a live worker holds is looked at again.
const WAIT_FOR_OWNER: RetryPolicy =
    RetryPolicy::doubling(Duration::from_millis(50), Duration::from_secs(1));

/// Handles a message in its slot (`permit`) until it can be settled. While a
/// live worker holds some of its claims, the slot is given back and the
/// message looked at again after a pause: a duplicate never keeps a new call
/// from a slot.
async fn handle(
    pipeline: &Pipeline,
    msg: &Incoming,
    permit: tokio::sync::OwnedSemaphorePermit,
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Disposition {
    let mut permit = Some(permit);
    let mut pauses = WAIT_FOR_OWNER.delays();
    loop {
        match guarded(pipeline.handle_until_settled(msg, stop)).await {
            Disposition::Wait { until } if Instant::now() < until => {
                permit.take();
                tokio::select! {
                    _ = stop.cancelled() => {
                        return Disposition::Retry("shut down while another worker held its claims".into());
                    }
                    _ = tokio::time::sleep(pauses.next_delay()) => {}
                }
                permit = Some(
                    slots
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("semaphore is never closed"),
                );
            }
            // The live owner's own message settles the rest.
            Disposition::Wait { .. } => return Disposition::Ack,
            other => return other,
        }
    }
}

/// Runs the handling of one message; a panic inside becomes a dead letter
/// (`internal_error`) instead of a task that dies with its message unsettled,
/// holding a prefetch slot for ever.
async fn guarded(handling: impl Future<Output = Disposition>) -> Disposition {
    match AssertUnwindSafe(handling).catch_unwind().await {
        Ok(disposition) => disposition,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            error!(panic = %what, "handling an event panicked; it goes to the dead-letter queue");
            Disposition::DeadLetter {
                kind: "internal_error",
                message: format!("panicked: {what}"),
            }
        }
    }
}

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
    lane: &'static str,
    d: &Delivery,
    disposition: Disposition,
) {
    let cfg = &pipeline.cfg;
    let result = match disposition {
        // `handle` turns a wait into an ack once it is over.
        Disposition::Ack | Disposition::Wait { .. } => {
            d.acker.ack(BasicAckOptions::default()).await
        }
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
            pipeline.metrics.dead_lettered(lane, kind);
            if matches!(kind, "non_retryable" | "retry_exhausted" | "internal_error") {
                pipeline
                    .metrics
                    .events
                    .with_label_values(&["dead_lettered"])
                    .inc();
            }
            // Publish it ourselves so the dead letter carries its reason; fall back to
            // the broker's dead-lettering if that fails.
            let exchange = &cfg.amqp.dead_letter_exchange;
            match super::dead_letter::publish(publisher, exchange, d, kind, &message).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_while_handling_becomes_an_internal_error_dead_letter() {
        let calm = guarded(async { Disposition::Ack }).await;
        assert_eq!(calm, Disposition::Ack);
        let panicked = guarded(async {
            let parts: Vec<&str> = Vec::new();
            Disposition::Retry(
                parts
                    .first()
                    .map_or_else(|| panic!("a collapse id"), |p| p.to_string()),
            )
        })
        .await;
        assert_eq!(
            panicked,
            Disposition::DeadLetter {
                kind: "internal_error",
                message: "panicked: a collapse id".into()
            }
        );
    }
}
