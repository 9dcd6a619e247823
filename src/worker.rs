//! The driver every lane runs on: take a slot (a semaphore permit), then the
//! next delivery; run the lane's [`Handler`] on it in a task of its own; settle
//! it exactly once from the returned [`Disposition`]; reconnect the [`Source`]
//! after any failure, with a backoff; at shutdown stop taking deliveries and
//! drain the ones in hand.
//!
//! The driver knows no broker. A source is anything that opens a [`Session`]
//! yielding [`Delivery`]s that can be acked, requeued or dead-lettered:
//! `amqp::source` is RabbitMQ's, the tests' is in memory. The lanes are `calls`
//! and `cancels` (the pipeline) and `devices` (`api::device_events`).

pub mod health;
mod source;
#[cfg(test)]
mod tests;

pub use health::ConsumerHealth;
pub use source::{Delivery, Session, Source, SourceError};

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::retry_policy::RetryPolicy;

/// A message as taken from the queue.
#[derive(Clone, Debug, Default)]
pub struct Incoming {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    /// AMQP `timestamp` property, UNIX seconds.
    pub timestamp: Option<u64>,
    /// The key it was published with (a device event's type when its body has none).
    pub routing_key: String,
    /// The owner recorded on this message's delivery claims: the worker's id and
    /// a sequence number, so two copies of one event in one worker still exclude
    /// each other.
    pub claim_owner: String,
}

/// How the driver settles a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Handled; every result is confirmed by the broker.
    Ack,
    /// Could not be handled now (database or broker trouble): tried again later.
    Retry(String),
    /// Never handleable: to the dead-letter queue with this reason.
    DeadLetter { kind: &'static str, message: String },
    /// Some devices' claims are held by a copy of the event on a live worker:
    /// look again later (they may be published, or their owner may die), without
    /// holding a slot meanwhile. Past `until` (the ring deadline) the owner's own
    /// message settles them: ack.
    Wait { until: Instant },
}

/// What a lane does with one message.
pub trait Handler: Send + Sync + 'static {
    /// Handles `msg` until it can be settled. `stop` is shutdown: a handler
    /// waiting out a fault then returns `Retry`, and the message goes back to the
    /// queue.
    fn handle(
        &self,
        msg: &Incoming,
        stop: &CancellationToken,
    ) -> impl Future<Output = Disposition> + Send;
}

/// One lane's settings.
pub struct Lane {
    /// `calls`, `cancels` or `devices`: its name in metrics and logs.
    pub name: &'static str,
    /// Messages handled at once.
    pub concurrency: u16,
    /// Messages delivered and unsettled at once (≥ `concurrency`).
    pub prefetch: u16,
    /// This process's worker id: each message's claims are owned by it plus a
    /// sequence number. A lane that claims nothing leaves it empty.
    pub claim_owner: String,
    /// How long in-flight messages may finish at shutdown before they are left
    /// to return to the queue.
    pub drain: Duration,
    /// Pauses between attempts to open a session.
    pub reconnect: RetryPolicy,
    pub metrics: Metrics,
    /// `None` for a lane `/healthz`, `/readyz`, the stall check and
    /// `voip_push_in_flight` do not watch.
    pub watched: Option<Watched>,
}

/// How a watched lane reports: consuming or not, its heartbeat, each message in
/// hand (overdue `overdue_after` after it was taken), and `voip_push_in_flight`.
#[derive(Clone)]
pub struct Watched {
    pub health: Arc<ConsumerHealth>,
    pub overdue_after: Duration,
}

/// How often the loop wakes while no message comes, so the heartbeat shows it
/// is alive (`http.rs` calls it stuck after three missed beats).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// How often a message whose claims a live worker holds is looked at again.
const WAIT_FOR_OWNER: RetryPolicy =
    RetryPolicy::doubling(Duration::from_millis(50), Duration::from_secs(1));

/// Runs `lane` on `source` with `handler` until `shutdown`, reconnecting after
/// any failure, then drains.
pub async fn run<S: Source, H: Handler>(
    lane: Lane,
    source: S,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let lane = Arc::new(lane);
    let name = lane.name;
    let slots = Arc::new(Slots {
        permits: Arc::new(Semaphore::new(usize::from(lane.concurrency))),
        wanted: Notify::new(),
    });
    let mut tasks = JoinSet::new();
    let mut delays = lane.reconnect.delays();
    let mut seq: u64 = 0;
    lane.beat();

    'connection: while !shutdown.is_cancelled() {
        let mut session = match source.open(lane.prefetch).await {
            Ok(s) => s,
            Err(e) => {
                let delay = delays.next_delay();
                warn!(lane = name, error = %e, retry_in_ms = delay.as_millis() as u64,
                    "cannot consume; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'connection,
                    _ = tokio::time::sleep(delay) => continue 'connection,
                }
            }
        };
        delays = lane.reconnect.delays();
        lane.up();
        info!(lane = name, queue = %source.name(), concurrency = lane.concurrency, "consuming");

        loop {
            lane.beat();
            // Reap finished tasks so the set does not grow without bound.
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(HEARTBEAT) => { drop(permit); continue; }
                // A message back from its wait is queued for a slot: give it
                // this one rather than hold it for a delivery that may not come.
                _ = slots.wanted.notified() => { drop(permit); continue; }
                n = session.next() => n,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    warn!(lane = name, error = %e, "consumer failed; reconnecting");
                    break;
                }
                None => {
                    warn!(
                        lane = name,
                        "broker cancelled the consumer or closed the channel; reconnecting"
                    );
                    break;
                }
            };
            seq += 1;
            let owner = format!("{}/{seq}", lane.claim_owner);
            let slot = Slot {
                permit,
                slots: slots.clone(),
            };
            // Boxed: the handling future is large, and a task's future is moved
            // when spawned and when it completes (memmove was the worker's top
            // symbol).
            tasks.spawn(Box::pin(work(
                lane.clone(),
                handler.clone(),
                delivery,
                owner,
                slot,
                shutdown.clone(),
            )));
        }
        lane.down();

        if shutdown.is_cancelled() {
            // Stop deliveries first, let in-flight work finish, then close: what is
            // still unsettled returns to the queue for another worker.
            session.stop().await;
            drain(name, &mut tasks, lane.drain).await;
            session.close("shutdown").await;
            return;
        }
        session.close("reconnecting").await;
    }
    drain(name, &mut tasks, lane.drain).await;
}

impl Lane {
    fn beat(&self) {
        if let Some(w) = &self.watched {
            w.health.beat();
        }
    }

    fn up(&self) {
        if let Some(w) = &self.watched {
            w.health.lane_up();
            w.health.sessions.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn down(&self) {
        if let Some(w) = &self.watched {
            w.health.lane_down();
        }
    }
}

/// A lane's slots: a permit each, and a bell a message back from its wait rings
/// when it is queued for one.
struct Slots {
    permits: Arc<Semaphore>,
    wanted: Notify,
}

impl Slots {
    /// A slot again, after a wait. Queued for one first, then the loop is asked
    /// for the one it holds while it waits for a delivery: without that, on an
    /// idle queue, the message would wait for the loop's heartbeat (5 s).
    async fn retake(&self) -> OwnedSemaphorePermit {
        let acquire = self.permits.clone().acquire_owned();
        tokio::pin!(acquire);
        let permit = match (&mut acquire).now_or_never() {
            Some(p) => p,
            None => {
                // The semaphore is fair: the loop's next permit comes after ours.
                self.wanted.notify_one();
                acquire.await
            }
        };
        permit.expect("semaphore is never closed")
    }
}

/// A message's slot: the permit it holds, and the lane's slots to take one
/// again from after a wait.
struct Slot {
    permit: OwnedSemaphorePermit,
    slots: Arc<Slots>,
}

/// One delivery's life: handled in its slot, then settled.
async fn work<D: Delivery, H: Handler>(
    lane: Arc<Lane>,
    handler: Arc<H>,
    delivery: D,
    owner: String,
    slot: Slot,
    stop: CancellationToken,
) {
    let _in_flight = lane
        .watched
        .as_ref()
        .map(|_| crate::metrics::Held::new(&lane.metrics.in_flight));
    let msg = delivery.incoming(owner);
    let _held = lane
        .watched
        .as_ref()
        .map(|w| w.health.hold(Instant::now() + w.overdue_after));
    let disposition = handle(&*handler, &msg, slot, &stop).await;
    settle(&lane, delivery, disposition).await;
}

async fn drain(lane: &'static str, tasks: &mut JoinSet<()>, timeout: Duration) {
    if tasks.is_empty() {
        return;
    }
    info!(lane, in_flight = tasks.len(), "draining in-flight events");
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(timeout, all).await.is_err() {
        warn!(
            lane,
            left = tasks.len(),
            "drain deadline passed; unfinished events return to the queue"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Handles a message in its slot until it can be settled. While a live worker
/// holds some of its claims, the slot is given back and the message looked at
/// again after a pause: a duplicate never keeps a new call from a slot.
async fn handle<H: Handler>(
    handler: &H,
    msg: &Incoming,
    slot: Slot,
    stop: &CancellationToken,
) -> Disposition {
    let Slot { permit, slots } = slot;
    let mut permit = Some(permit);
    let mut pauses = WAIT_FOR_OWNER.delays();
    loop {
        match guarded(handler.handle(msg, stop)).await {
            Disposition::Wait { until } if Instant::now() < until => {
                permit.take();
                tokio::select! {
                    _ = stop.cancelled() => {
                        return Disposition::Retry("shut down while another worker held its claims".into());
                    }
                    _ = tokio::time::sleep(pauses.next_delay()) => {}
                }
                permit = Some(slots.retake().await);
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

/// Settles one message, the one place that does.
async fn settle<D: Delivery>(lane: &Lane, d: D, disposition: Disposition) {
    let result = match disposition {
        // `handle` turns a wait into an ack once it is over.
        Disposition::Ack | Disposition::Wait { .. } => d.ack().await,
        Disposition::Retry(reason) => {
            // Only at shutdown: back to the queue for another worker.
            warn!(lane = lane.name, %reason, "returning the event to the queue");
            d.requeue().await
        }
        Disposition::DeadLetter { kind, message } => {
            lane.metrics.dead_lettered(lane.name, kind);
            d.dead_letter(kind, &message).await
        }
    };
    if let Err(e) = result {
        error!(lane = lane.name, error = %e, "could not settle the message; it will be redelivered");
    }
}
