//! RabbitMQ: connections, the topology of CONTRACT §3, the result publisher, and
//! queues as the driver's sources (`source.rs`; the consumer loop itself is
//! `crate::worker`).

pub mod dead_letter;
pub mod publisher;
pub mod source;
pub mod watch;
pub mod wire;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

pub use publisher::{Publisher, ResultsExchange};

use crate::config::{redact_url, AmqpConfig};
use crate::retry_policy::RetryPolicy;

/// After this many deliveries a message that keeps failing (a poison message that
/// crashes workers, say) goes to the dead-letter queue instead of looping forever.
pub const DELIVERY_LIMIT: i64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("RabbitMQ at {url}: {source}")]
    Connect { url: String, source: lapin::Error },
    #[error("RabbitMQ at {url}: {source}")]
    WireConnect {
        url: String,
        source: wire::WireError,
    },
    #[error("RabbitMQ at {url}: TLS settings: {reason}")]
    Tls { url: String, reason: String },
    #[error("RabbitMQ: {0}")]
    Protocol(#[from] lapin::Error),
    #[error("RabbitMQ: {0}")]
    Wire(#[from] wire::WireError),
    #[error("RabbitMQ refused (nack) a published message")]
    Nacked,
    /// lapin's answer to an ack, nack or reject on a channel that is gone.
    #[error("RabbitMQ: the channel closed before the message was settled")]
    Unsettled,
    /// A mandatory message came back: nothing is bound to take it.
    #[error("RabbitMQ routed the message to no queue (exchange {exchange:?}, routing key {routing_key:?}): is the queue declared and bound?")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
}

impl AmqpError {
    /// A failure of our own connection (`wire`) to `cfg`'s broker: opening
    /// it names the broker (its URL without the password).
    pub fn wire(cfg: &AmqpConfig, e: wire::WireError) -> Self {
        match e {
            wire::WireError::Tls(reason) => AmqpError::Tls {
                url: redact_url(&cfg.url),
                reason,
            },
            e => AmqpError::WireConnect {
                url: redact_url(&cfg.url),
                source: e,
            },
        }
    }

    /// A broker fault passes; so may a missing binding (an operator re-creates the
    /// queue), and the retry says why meanwhile.
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// Deletes `queues` and `exchanges` (a supervisor's own, after a run: see
/// `Config::amqp_objects`), on a connection of its own. Best effort: what
/// cannot be deleted, or is already gone, is left.
pub async fn delete_objects<'a>(
    cfg: &AmqpConfig,
    role: &str,
    queues: impl IntoIterator<Item = &'a str>,
    exchanges: impl IntoIterator<Item = &'a str>,
) {
    let Ok(conn) = connect(cfg, role).await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in queues {
            let _ = ch
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await;
        }
        for x in exchanges {
            let _ = ch
                .exchange_delete(x.into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
}

/// What `rabbitmqctl list_connections` shows for a connection of `role`, on
/// lapin's connections and ours (`wire`) alike.
pub fn connection_name(role: &str) -> String {
    format!("voip-push-worker {role}")
}

/// Opens a connection named after its role, so `rabbitmqctl list_connections`
/// shows which is which.
pub async fn connect(cfg: &AmqpConfig, role: &str) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(connection_name(role).into());
    let url = redact_url(&cfg.url);
    let tls = crate::tls::amqp::tls_config(cfg).map_err(|e| AmqpError::Tls {
        url: url.clone(),
        reason: e,
    })?;
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connect_with_config(&cfg.url, props, tls, runtime)
        .await
        .map_err(|source| AmqpError::Connect { url, source })
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Pauses between reconnects to the broker: 200 ms doubling to 10 s, jittered,
/// with no attempt cap (a worker waits for its broker as long as it takes).
pub const RECONNECT: RetryPolicy = RetryPolicy::doubling(
    std::time::Duration::from_millis(200),
    std::time::Duration::from_secs(10),
)
.jittered();

/// Declares a durable exchange (idempotent).
pub async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), AmqpError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(name.into(), kind, durable, FieldTable::default())
        .await?;
    Ok(())
}

/// Declares a durable quorum queue (with `args` besides its type) and binds it
/// to `exchange` with `key` (idempotent).
pub async fn declare_quorum_queue(
    ch: &Channel,
    queue: &str,
    mut args: FieldTable,
    exchange: &str,
    key: &str,
) -> Result<(), AmqpError> {
    args.insert("x-queue-type".into(), text("quorum"));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, args).await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// The prefetch of a lane with `concurrency` slots: room beyond the slots for
/// messages waiting on another worker's claims (they give their slot back).
pub fn prefetch_for(concurrency: u16) -> u16 {
    concurrency.saturating_mul(2)
}

/// Declares a dead-letter exchange (fanout) and the quorum queue that keeps
/// what it takes.
pub async fn declare_dead_letters(
    ch: &Channel,
    exchange: &str,
    queue: &str,
) -> Result<(), AmqpError> {
    declare_exchange(ch, exchange, ExchangeKind::Fanout).await?;
    declare_quorum_queue(ch, queue, FieldTable::default(), exchange, "").await
}

/// Declares every object of the topology. Idempotent: replicas starting together
/// all declare the same thing.
pub async fn declare_topology(ch: &Channel, cfg: &AmqpConfig) -> Result<(), AmqpError> {
    declare_exchange(ch, &cfg.call_exchange, ExchangeKind::Topic).await?;
    declare_exchange(ch, &cfg.results_exchange, ExchangeKind::Topic).await?;
    declare_dead_letters(ch, &cfg.dead_letter_exchange, &cfg.dead_letter_queue).await?;

    let mut work_args = FieldTable::default();
    work_args.insert(
        "x-dead-letter-exchange".into(),
        text(&cfg.dead_letter_exchange),
    );
    work_args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    // The work queue takes every call event; the cancel lane takes cancels again,
    // so a cancel never waits behind a backlog of rings (handling one twice is
    // harmless: cancels are idempotent and their pushes are claimed).
    for (queue, key) in [
        (&cfg.work_queue, "call.*"),
        (&cfg.cancel_queue, "call.cancel"),
    ] {
        declare_quorum_queue(ch, queue, work_args.clone(), &cfg.call_exchange, key).await?;
    }
    Ok(())
}
