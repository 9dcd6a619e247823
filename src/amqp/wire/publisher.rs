//! A publisher in confirm mode on a connection of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, confirm, AMQPClass};
use amq_protocol::types::ShortString;
use tokio::sync::oneshot;

use super::frames::{encode, method};
use super::{
    handshake, message_key, open_channel, BasicProperties, Confirm, Link, Unconfirmed, WireError,
    CHANNEL,
};
use crate::config::AmqpConfig;

/// A publisher in confirm mode on a connection of its own.
pub struct WirePublisher {
    link: Link,
}

impl WirePublisher {
    /// Connects as `name`; `blocked` follows the broker's `connection.blocked`
    /// and `unblocked` while the connection lives.
    pub async fn open(
        cfg: &AmqpConfig,
        name: &str,
        blocked: Arc<AtomicBool>,
    ) -> Result<Self, WireError> {
        let mut o = handshake::open(cfg, name).await?;
        open_channel(&mut o).await?;
        let select = confirm::Select { nowait: false };
        o.call(
            &[method(
                CHANNEL,
                AMQPClass::Confirm(confirm::AMQPMethod::Select(select)),
            )],
            "confirm.select-ok",
            |c| matches!(c, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))).then_some(()),
        )
        .await?;
        Ok(WirePublisher {
            link: Link::start(o, None, blocked),
        })
    }

    pub fn is_open(&self) -> bool {
        self.link.shared.open.load(Ordering::Acquire)
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<Confirm, WireError> {
        let publish = basic::Publish {
            exchange: ShortString::from(exchange),
            routing_key: ShortString::from(routing_key),
            mandatory,
            immediate: false,
        };
        let header = amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties,
        };
        let shared = &self.link.shared;
        let mut frames = vec![
            method(
                CHANNEL,
                AMQPClass::Basic(basic::AMQPMethod::Publish(publish)),
            ),
            AMQPFrame::Header(CHANNEL, header),
        ];
        frames.extend(
            body.chunks(shared.body_max)
                .map(|c| AMQPFrame::Body(CHANNEL, c.to_vec())),
        );
        shared.check_open()?;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = shared.state.lock().expect("wire lock");
            let tag = st.next_tag;
            st.next_tag += 1;
            st.unconfirmed.push_back(Unconfirmed {
                tag,
                answer: tx,
                returnable: mandatory.then(|| message_key(exchange, routing_key, body)),
                returned: false,
            });
            encode(&mut st.out, &frames);
        }
        shared.ready.notify_one();
        rx.await.map_err(|_| shared.ended())
    }

    pub async fn close(self, why: &str) {
        self.link.close(why).await
    }
}
