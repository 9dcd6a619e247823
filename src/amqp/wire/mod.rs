//! AMQP 0-9-1 on the tokio reactor itself, for the hot path: a queue's
//! consumer and the confirming publisher. A connection's socket is read by a
//! task of ours and written by another, frames by `amq-protocol` (lapin's own
//! codec). lapin runs an I/O thread per connection, so every delivery, ack,
//! publish and confirm crossed threads; here they stay on the runtime's, and
//! what is written in a burst (acks, publishes) goes out in one write. The
//! topology is still declared through lapin (README, "Design notes").
//!
//! One channel per connection (number 1): a consumer, or a publisher in
//! confirm mode.

mod acks;
mod consumer;
mod frames;
mod handshake;
mod io;
mod publisher;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, channel, connection, AMQPClass};
use amq_protocol::types::ShortString;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use acks::AckRuns;
pub use amq_protocol::protocol::BasicProperties;
pub use consumer::{Settler, WireConsumer};
use frames::{encode, method};
use handshake::Opened;
use io::{read_loop, write_loop};
pub use publisher::WirePublisher;

pub(super) const CHANNEL: u16 = 1;

#[derive(Clone, Debug, thiserror::Error)]
pub enum WireError {
    #[error("AMQP URL: {0}")]
    Url(String),
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("{0}")]
    Io(Arc<std::io::Error>),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("connection closed: {0}")]
    Closed(String),
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        WireError::Io(Arc::new(e))
    }
}

/// A message delivered to the consumer.
#[derive(Debug)]
pub struct WireDelivery {
    pub delivery_tag: u64,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

/// The broker's answer to a confirmed publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirm {
    /// Taken; `returned` when it was mandatory and no queue took it.
    Ack {
        returned: bool,
    },
    Nack,
}

/// What the tasks and the handles share.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Wakes the writer: frames to write, or the end.
    pub(super) ready: Notify,
    /// Why the connection ended, once it has.
    ended: Mutex<Option<WireError>>,
    pub(super) open: AtomicBool,
    /// `connection.blocked` (a resource alarm) until `connection.unblocked`.
    pub(super) blocked: Arc<AtomicBool>,
    /// When the last bytes came in (ms since `epoch`, so 0 at the start):
    /// missed heartbeats.
    pub(super) last_read_ms: AtomicU64,
    epoch: Instant,
    /// The most body bytes a frame may carry.
    pub(super) body_max: usize,
}

#[derive(Default)]
pub(super) struct State {
    /// Frames not yet written: whatever is queued before the writer runs goes
    /// out in one write.
    pub(super) out: Vec<u8>,
    /// Confirm mode: the next publish's tag and the unconfirmed ones, in order.
    pub(super) next_tag: u64,
    pub(super) unconfirmed: VecDeque<Unconfirmed>,
    /// A consumer's deliveries in hand and the acks held for the next write.
    acks: AckRuns,
}

impl State {
    /// Queues the acks held for this write (before any frame queued after
    /// them, so a nack or a close never overtakes an earlier ack).
    pub(super) fn drain_acks(&mut self) {
        let State { out, acks, .. } = self;
        acks.drain(|delivery_tag, multiple| encode(out, &[ack_frame(delivery_tag, multiple)]));
    }
}

pub(super) fn ack_frame(delivery_tag: u64, multiple: bool) -> AMQPFrame {
    method(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag,
            multiple,
        })),
    )
}

/// A publish awaiting its confirm.
pub(super) struct Unconfirmed {
    pub(super) tag: u64,
    pub(super) answer: oneshot::Sender<Confirm>,
    /// A mandatory publish's [`message_key`], to find it when it comes back.
    pub(super) returnable: Option<u64>,
    /// It came back (`basic.return`): no queue took it.
    pub(super) returned: bool,
}

/// What identifies a message the broker returns: its exchange, routing key
/// and body. A return carries no tag, and RabbitMQ's confirms may cover several
/// tags at once, so returns are matched by content to the oldest such publish
/// (two publishes alike in all three are routed alike).
pub(super) fn message_key(exchange: &str, routing_key: &str, body: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (exchange, routing_key, body).hash(&mut h);
    h.finish()
}

impl Shared {
    pub(super) fn new(blocked: Arc<AtomicBool>, frame_max: u32) -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(State {
                next_tag: 1,
                ..State::default()
            }),
            ready: Notify::new(),
            ended: Mutex::new(None),
            open: AtomicBool::new(true),
            blocked,
            last_read_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            // A frame's type, channel, size and end byte.
            body_max: frame_max as usize - 8,
        })
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(super) fn check_open(&self) -> Result<(), WireError> {
        if self.open.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(self.ended())
    }

    pub(super) fn ended(&self) -> WireError {
        self.ended
            .lock()
            .expect("wire lock")
            .clone()
            .unwrap_or_else(|| WireError::Closed("closed".into()))
    }

    /// Queues `frames` for the writer.
    pub(super) fn send(&self, frames: &[AMQPFrame]) -> Result<(), WireError> {
        self.queue(frames, |_| {})
    }

    /// Queues `frames` after the acks held so far, then `also` under the same
    /// lock, and wakes the writer.
    fn queue(&self, frames: &[AMQPFrame], also: impl FnOnce(&mut State)) -> Result<(), WireError> {
        self.check_open()?;
        let mut st = self.state.lock().expect("wire lock");
        st.drain_acks();
        encode(&mut st.out, frames);
        also(&mut st);
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// Acks a delivery at the next write, in a run with others when it can.
    pub(super) fn ack(&self, delivery_tag: u64) -> Result<(), WireError> {
        self.check_open()?;
        let mut st = self.state.lock().expect("wire lock");
        if !st.acks.ack(delivery_tag) {
            encode(&mut st.out, &[ack_frame(delivery_tag, false)]);
        }
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// Settles a delivery with a frame of its own (a nack, a reject).
    pub(super) fn settle_alone(
        &self,
        delivery_tag: u64,
        frame: AMQPFrame,
    ) -> Result<(), WireError> {
        self.queue(&[frame], |st| st.acks.forget(delivery_tag))
    }

    /// Ends the connection for every handle: pending confirms fail, the
    /// writer stops.
    pub(super) fn end(&self, why: WireError) {
        self.ended.lock().expect("wire lock").get_or_insert(why);
        self.open.store(false, Ordering::Release);
        self.state.lock().expect("wire lock").unconfirmed.clear();
        self.ready.notify_one();
    }
}

/// One connection's tasks; dropping it drops the connection.
pub(super) struct Link {
    pub(super) shared: Arc<Shared>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Link {
    pub(super) fn start(
        o: Opened,
        deliveries: Option<mpsc::UnboundedSender<WireDelivery>>,
        blocked: Arc<AtomicBool>,
    ) -> Self {
        let shared = Shared::new(blocked, o.frame_max);
        let heartbeat = Duration::from_secs(u64::from(o.heartbeat));
        let reader = tokio::spawn(read_loop(o.rd, o.inbuf, shared.clone(), deliveries));
        let writer = tokio::spawn(write_loop(o.wr, shared.clone(), heartbeat));
        Link {
            shared,
            reader,
            writer,
        }
    }

    /// `connection.close`, then the broker's `close-ok` (or up to a second).
    pub(super) async fn close(mut self, why: &str) {
        let close = connection::Close {
            reply_code: 200,
            reply_text: ShortString::from(why),
            class_id: 0,
            method_id: 0,
        };
        let frame = method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(close)),
        );
        if self.shared.send(&[frame]).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.reader).await;
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.end(WireError::Closed("closed by us".into()));
        self.reader.abort();
        self.writer.abort();
    }
}

pub(super) async fn open_channel(o: &mut Opened) -> Result<(), WireError> {
    o.call(
        &[method(
            CHANNEL,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )],
        "channel.open-ok",
        |c| matches!(c, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))).then_some(()),
    )
    .await
}
