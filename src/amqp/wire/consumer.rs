//! A queue's consumer on a connection of its own, and the handle that
//! settles its deliveries.

use std::sync::Arc;

use amq_protocol::protocol::{basic, AMQPClass};
use amq_protocol::types::{FieldTable, ShortString};
use tokio::sync::mpsc;

use super::frames::method;
use super::{handshake, open_channel, Link, Shared, WireDelivery, WireError, CHANNEL};
use crate::config::AmqpConfig;

/// A queue's consumer on a connection of its own.
pub struct WireConsumer {
    link: Link,
    deliveries: mpsc::UnboundedReceiver<WireDelivery>,
    tag: ShortString,
}

impl WireConsumer {
    /// Connects as `name`, then consumes `queue` with manual acks and at most
    /// `prefetch` unacknowledged messages.
    pub async fn open(
        cfg: &AmqpConfig,
        name: &str,
        queue: &str,
        prefetch: u16,
    ) -> Result<Self, WireError> {
        let mut o = handshake::open(cfg, name).await?;
        open_channel(&mut o).await?;
        let qos = basic::Qos {
            prefetch_count: prefetch,
            global: false,
        };
        o.call(
            &[method(
                CHANNEL,
                AMQPClass::Basic(basic::AMQPMethod::Qos(qos)),
            )],
            "basic.qos-ok",
            |c| matches!(c, AMQPClass::Basic(basic::AMQPMethod::QosOk(_))).then_some(()),
        )
        .await?;
        let consume = basic::Consume {
            queue: ShortString::from(queue),
            consumer_tag: ShortString::from(""),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        };
        let tag = o
            .call(
                &[method(
                    CHANNEL,
                    AMQPClass::Basic(basic::AMQPMethod::Consume(consume)),
                )],
                "basic.consume-ok",
                |c| match c {
                    AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)) => Some(ok.consumer_tag),
                    _ => None,
                },
            )
            .await?;
        let (tx, deliveries) = mpsc::unbounded_channel();
        Ok(WireConsumer {
            link: Link::start(o, Some(tx), Arc::default()),
            deliveries,
            tag,
        })
    }

    /// The next delivery; `Err` once the connection has ended.
    pub async fn next(&mut self) -> Result<WireDelivery, WireError> {
        match self.deliveries.recv().await {
            Some(d) => Ok(d),
            None => Err(self.link.shared.ended()),
        }
    }

    /// Takes no more deliveries; those in hand can still be settled.
    pub fn cancel(&self) -> Result<(), WireError> {
        let cancel = basic::Cancel {
            consumer_tag: self.tag.clone(),
            nowait: false,
        };
        self.link.shared.send(&[method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)),
        )])
    }

    /// A handle that settles deliveries (acks, nacks, rejects) of this consumer.
    pub fn settler(&self) -> Settler {
        Settler(self.link.shared.clone())
    }

    pub async fn close(self, why: &str) {
        self.link.close(why).await
    }
}

/// Settles a consumer's deliveries from anywhere; fails once its connection
/// has ended (the broker then delivers the message again).
#[derive(Clone)]
pub struct Settler(Arc<Shared>);

impl Settler {
    fn alone(&self, delivery_tag: u64, m: basic::AMQPMethod) -> Result<(), WireError> {
        (self.0).settle_alone(delivery_tag, method(CHANNEL, AMQPClass::Basic(m)))
    }

    /// Acks at the connection's next write, in a run with the acks beside it
    /// (`wire::acks`).
    pub fn ack(&self, delivery_tag: u64) -> Result<(), WireError> {
        self.0.ack(delivery_tag)
    }

    pub fn nack(&self, delivery_tag: u64, requeue: bool) -> Result<(), WireError> {
        let nack = basic::Nack {
            delivery_tag,
            multiple: false,
            requeue,
        };
        self.alone(delivery_tag, basic::AMQPMethod::Nack(nack))
    }

    pub fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), WireError> {
        let reject = basic::Reject {
            delivery_tag,
            requeue,
        };
        self.alone(delivery_tag, basic::AMQPMethod::Reject(reject))
    }
}
