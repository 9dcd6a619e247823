//! A RabbitMQ queue as the driver's source (`crate::worker`): connect, declare
//! the lane's topology, consume with a prefetch; ack, requeue, and dead letters
//! published with their reason ([`super::dead_letter`]) then acked, or rejected
//! when that publish fails.

use std::sync::Arc;

use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};
use tracing::{error, warn};

use super::wire::{Settler, WireConsumer, WireDelivery};
use super::{connect, declare_exchange, declare_quorum_queue, AmqpError, Publisher};
use crate::config::{AmqpConfig, DevicesConfig};
use crate::worker::{self, Incoming, SourceError};

/// A queue a lane consumes.
pub struct QueueSource {
    pub amqp: AmqpConfig,
    /// The connection's name: `voip-push-worker {role}` in `rabbitmqctl`.
    pub role: &'static str,
    pub queue: String,
    pub topology: Topology,
    /// Publishes dead letters (with their reason) on the publisher connection.
    pub publisher: Arc<Publisher>,
}

/// What a lane declares before it consumes, and where its dead letters go.
pub enum Topology {
    /// The call lanes': [`super::declare_topology`]; dead letters to
    /// `amqp.dead_letter_exchange`, which the work queues also name as their
    /// broker-side dead-letter exchange.
    Calls,
    /// Device registration events: their exchange, queue and dead-letter queue;
    /// dead letters to `devices.dead_letter_exchange`. The queue has no
    /// broker-side dead-lettering.
    Devices(DevicesConfig),
}

impl Topology {
    async fn declare(&self, ch: &Channel, amqp: &AmqpConfig) -> Result<(), AmqpError> {
        let cfg = match self {
            Topology::Calls => return super::declare_topology(ch, amqp).await,
            Topology::Devices(cfg) => cfg,
        };
        declare_exchange(ch, &cfg.exchange, ExchangeKind::Topic).await?;
        super::declare_dead_letters(ch, &cfg.dead_letter_exchange, &cfg.dead_letter_queue).await?;
        declare_quorum_queue(
            ch,
            &cfg.queue,
            FieldTable::default(),
            &cfg.exchange,
            "device.*",
        )
        .await
    }

    fn dead_letters(&self, amqp: &AmqpConfig, publisher: Arc<Publisher>) -> DeadLetters {
        let (exchange, broker_fallback) = match self {
            Topology::Calls => (amqp.dead_letter_exchange.clone(), true),
            Topology::Devices(cfg) => (cfg.dead_letter_exchange.clone(), false),
        };
        DeadLetters {
            publisher,
            exchange,
            broker_fallback,
        }
    }
}

/// Where a session's dead letters go.
struct DeadLetters {
    publisher: Arc<Publisher>,
    exchange: String,
    /// The queue has a dead-letter exchange of its own: a rejected message
    /// still ends there (without its reason). Without one it is dropped.
    broker_fallback: bool,
}

impl worker::Source for QueueSource {
    type Session = QueueSession;

    fn name(&self) -> &str {
        &self.queue
    }

    async fn open(&self, prefetch: u16) -> Result<QueueSession, SourceError> {
        // The topology through lapin, on a short-lived connection; the
        // deliveries on our own (`wire`), the hot path.
        let conn = connect(&self.amqp, self.role).await?;
        let ch = conn.create_channel().await.map_err(AmqpError::from)?;
        let declared = self.topology.declare(&ch, &self.amqp).await;
        let _ = conn.close(200, "declared".into()).await;
        declared?;
        let name = super::connection_name(self.role);
        let consumer = WireConsumer::open(&self.amqp, &name, &self.queue, prefetch)
            .await
            .map_err(|e| AmqpError::wire(&self.amqp, e))?;
        let dead_letters = Arc::new(
            self.topology
                .dead_letters(&self.amqp, self.publisher.clone()),
        );
        Ok(QueueSession {
            consumer,
            dead_letters,
        })
    }
}

/// One connection consuming the queue.
pub struct QueueSession {
    consumer: WireConsumer,
    dead_letters: Arc<DeadLetters>,
}

impl worker::Session for QueueSession {
    type Delivery = QueueDelivery;

    async fn next(&mut self) -> Option<Result<QueueDelivery, SourceError>> {
        Some(
            self.consumer
                .next()
                .await
                .map(|d| QueueDelivery {
                    d,
                    settler: self.consumer.settler(),
                    dead_letters: self.dead_letters.clone(),
                })
                .map_err(|e| AmqpError::from(e).into()),
        )
    }

    async fn stop(&mut self) {
        let _ = self.consumer.cancel();
    }

    async fn close(self, why: &'static str) {
        self.consumer.close(why).await;
    }
}

/// One message from the queue.
pub struct QueueDelivery {
    d: WireDelivery,
    settler: Settler,
    dead_letters: Arc<DeadLetters>,
}

impl worker::Delivery for QueueDelivery {
    fn incoming(&self, claim_owner: String) -> Incoming {
        let d = &self.d;
        Incoming {
            claim_owner,
            body: d.body.clone(),
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string()),
            timestamp: *d.properties.timestamp(),
            routing_key: d.routing_key.clone(),
        }
    }

    async fn ack(self) -> Result<(), SourceError> {
        settled(self.settler.ack(self.d.delivery_tag))
    }

    async fn requeue(self) -> Result<(), SourceError> {
        settled(self.settler.nack(self.d.delivery_tag, true))
    }

    async fn dead_letter(self, reason: &'static str, detail: &str) -> Result<(), SourceError> {
        // Published by us so the dead letter carries its reason; the broker's own
        // dead-lettering only if that fails.
        let dl = &self.dead_letters;
        let d = &self.d;
        let published = super::dead_letter::publish(
            &dl.publisher,
            &dl.exchange,
            (&d.routing_key, &d.properties, &d.body),
            reason,
            detail,
        )
        .await;
        match published {
            Ok(()) => return self.ack().await,
            Err(e) if dl.broker_fallback => {
                warn!(error = %e, "could not publish the dead letter; rejecting to the broker's DLX")
            }
            Err(e) => error!(error = %e, routing_key = %self.d.routing_key,
                "could not publish the dead letter; the queue has no dead-lettering of its own: it is dropped"),
        }
        settled(self.settler.reject(self.d.delivery_tag, false))
    }
}

/// A settlement: it fails when the connection is gone (the broker delivers
/// the message again).
fn settled(sent: Result<(), super::wire::WireError>) -> Result<(), SourceError> {
    sent.map_err(|_| AmqpError::Unsettled.into())
}
