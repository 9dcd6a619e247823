//! The load and its counting: a producer with pipelined publisher confirms (as a
//! backlog or at a paced rate), the collector of results, and the reference — a
//! consumer that does no work at all.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};
use voip_push_worker::amqp::{connect, DELIVERY_LIMIT};
use voip_push_worker::config::AmqpConfig;

use crate::procs::{round3, CpuSnapshot, CpuUse};

/// Publishes in flight before the producer waits for the oldest confirm: enough
/// to keep the broker busy, few enough that a slow broker pushes back.
const CONFIRM_WINDOW: usize = 1_000;

/// How often the paced producer looks at the clock: 2 ms keeps bursts at
/// 1,000 events/s down to two messages.
const PACE_TICK: Duration = Duration::from_millis(2);

/// One message: the call id (also its AMQP `message_id`) and the body.
pub type Message = (String, Vec<u8>);

pub struct Producer {
    conn: Connection,
    ch: Channel,
}

#[derive(Debug)]
pub struct Paced {
    pub published: usize,
    pub achieved_per_sec: f64,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Producer {
    pub async fn open(cfg: &AmqpConfig) -> Result<Self, String> {
        let conn = connect(cfg, "bench producer").await.map_err(err)?;
        let ch = conn.create_channel().await.map_err(err)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(err)?;
        Ok(Self { conn, ch })
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        (call_id, body): Message,
    ) -> Result<PublisherConfirm, String> {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(call_id.into());
        self.ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .map_err(err)
    }

    /// Publishes `n` messages as fast as the broker confirms them, keeping
    /// [`CONFIRM_WINDOW`] unconfirmed. Returns how long it took.
    pub async fn backlog(
        &self,
        exchange: &str,
        routing_key: &str,
        n: usize,
        mut message: impl FnMut(usize) -> Message,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let mut window = VecDeque::with_capacity(CONFIRM_WINDOW);
        for i in 0..n {
            if window.len() >= CONFIRM_WINDOW {
                confirmed(window.pop_front()).await?;
            }
            window.push_back(self.publish(exchange, routing_key, message(i)).await?);
        }
        for c in window {
            confirmed(Some(c)).await?;
        }
        Ok(started.elapsed())
    }

    /// Publishes at `rate` per second for `duration`; confirms are awaited by a
    /// task of their own so that waiting never delays the next publish.
    pub async fn paced(
        &self,
        exchange: &str,
        routing_key: &str,
        rate: f64,
        duration: Duration,
        mut message: impl FnMut(usize) -> Message,
    ) -> Result<Paced, String> {
        let total = (rate * duration.as_secs_f64()).round() as usize;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PublisherConfirm>();
        let confirmer = tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                confirmed(Some(c)).await?;
            }
            Ok::<_, String>(())
        });
        let started = Instant::now();
        let mut tick = tokio::time::interval(PACE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sent = 0;
        while sent < total {
            tick.tick().await;
            let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(total);
            while sent < due {
                let c = self.publish(exchange, routing_key, message(sent)).await?;
                let _ = tx.send(c);
                sent += 1;
            }
        }
        let elapsed = started.elapsed();
        drop(tx);
        confirmer.await.map_err(err)??;
        Ok(Paced {
            published: sent,
            achieved_per_sec: sent as f64 / elapsed.as_secs_f64(),
        })
    }

    pub async fn close(self) {
        let _ = self.ch.close(200, "done".into()).await;
        let _ = self.conn.close(200, "done".into()).await;
    }
}

async fn confirmed(c: Option<PublisherConfirm>) -> Result<(), String> {
    let Some(c) = c else { return Ok(()) };
    let confirmation = c.await.map_err(err)?;
    if confirmation.is_nack() {
        return Err("the broker refused (nacked) a published message".into());
    }
    Ok(())
}

#[derive(Default)]
struct Collected {
    /// When each result arrived, in order.
    arrivals: Vec<Instant>,
    /// Results per routing key (`push.<status>`).
    by_key: BTreeMap<String, u64>,
}

/// Counts the results the workers publish, from a durable queue of the bench's
/// own bound to the results exchange (so none are missed between phases).
pub struct Collector {
    state: Arc<Mutex<Collected>>,
    conn: Connection,
}

impl Collector {
    pub async fn start(cfg: &AmqpConfig, queue: &str) -> Result<Self, String> {
        let conn = connect(cfg, "bench results").await.map_err(err)?;
        let ch = conn.create_channel().await.map_err(err)?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(queue.into(), durable, FieldTable::default())
            .await
            .map_err(err)?;
        ch.queue_bind(
            queue.into(),
            cfg.results_exchange.as_str().into(),
            "push.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(err)?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let mut consumer = ch
            .basic_consume(queue.into(), "".into(), no_ack, FieldTable::default())
            .await
            .map_err(err)?;
        let state = Arc::new(Mutex::new(Collected::default()));
        let s = state.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let now = Instant::now();
                let mut s = s.lock().expect("collector lock");
                s.arrivals.push(now);
                *s.by_key.entry(d.routing_key.to_string()).or_default() += 1;
            }
        });
        Ok(Self { state, conn })
    }

    pub fn count(&self) -> usize {
        self.state.lock().expect("collector lock").arrivals.len()
    }

    pub fn by_status(&self) -> BTreeMap<String, u64> {
        self.state
            .lock()
            .expect("collector lock")
            .by_key
            .iter()
            .map(|(k, v)| (k.trim_start_matches("push.").to_string(), *v))
            .collect()
    }

    /// Waits until `target` results have arrived in all; returns the arrival
    /// times of result number `from` and of the last one, or `Err` with how many
    /// came by `deadline`.
    pub async fn wait_for(
        &self,
        from: usize,
        target: usize,
        deadline: Instant,
    ) -> Result<(Instant, Instant), usize> {
        loop {
            {
                let s = self.state.lock().expect("collector lock");
                if s.arrivals.len() >= target {
                    return Ok((s.arrivals[from], s.arrivals[target - 1]));
                }
                if Instant::now() > deadline {
                    return Err(s.arrivals.len());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// What the reference consumer measured.
#[derive(Debug, serde::Serialize)]
pub struct Reference {
    pub messages: usize,
    pub prefetch: u16,
    pub seconds: f64,
    pub per_sec: f64,
    pub backlog_publish_per_sec: f64,
    /// CPU while it consumed (RabbitMQ's share is the floor of any worker's
    /// broker cost: it consumes and acknowledges every event too).
    pub cpu: CpuUse,
}

/// The upper bound: a quorum queue like the work queue, loaded with `n` events,
/// consumed and acknowledged one by one with the worker's prefetch, doing
/// nothing else.
pub async fn reference(
    cfg: &AmqpConfig,
    queue: &str,
    prefetch: u16,
    n: usize,
    message: impl FnMut(usize) -> Message,
    deadline: Instant,
) -> Result<Reference, String> {
    let conn = connect(cfg, "bench reference").await.map_err(err)?;
    let ch = conn.create_channel().await.map_err(err)?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, args)
        .await
        .map_err(err)?;

    let producer = Producer::open(cfg).await?;
    let publish = producer.backlog("", queue, n, message).await?;
    producer.close().await;

    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(err)?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(err)?;
    let cpu_before = CpuSnapshot::take(&[]);
    let mut first = None;
    let mut acked = 0;
    while acked < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(other) => return Err(format!("reference consumer stopped: {other:?}")),
            Err(_) => return Err(format!("reference: only {acked} of {n} consumed in time")),
        };
        first.get_or_insert_with(Instant::now);
        d.acker.ack(BasicAckOptions::default()).await.map_err(err)?;
        acked += 1;
    }
    let seconds = first.map(|f| f.elapsed()).unwrap_or_default().as_secs_f64();
    let cpu = CpuSnapshot::take(&[]).since(&cpu_before);
    let _ = conn.close(200, "done".into()).await;
    Ok(Reference {
        messages: n,
        prefetch,
        seconds: round3(seconds),
        per_sec: round3(n as f64 / seconds.max(1e-3)),
        backlog_publish_per_sec: round3(n as f64 / publish.as_secs_f64().max(1e-3)),
        cpu,
    })
}
