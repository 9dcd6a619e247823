//! A connection's two tasks: the reader (deliveries assembled, confirms and
//! returns matched to their publishes, the broker's close and alarms) and the
//! writer (whatever is queued, in one write; heartbeats; a silent broker).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, channel, connection, AMQPClass};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::frames::{encode, method, read_frame};
use super::handshake::{Reader, Writer};
use super::{message_key, BasicProperties, Confirm, Shared, Unconfirmed, WireDelivery, WireError};

/// Content being assembled from its method, header and body frames: a
/// delivery, or a message the broker returns.
struct Partial {
    method: Content,
    properties: BasicProperties,
    /// The body's size, once the header has come.
    size: Option<u64>,
    body: Vec<u8>,
}

enum Content {
    Deliver(basic::Deliver),
    Return {
        exchange: String,
        routing_key: String,
    },
}

impl Partial {
    fn new(method: Content) -> Option<Self> {
        Some(Partial {
            method,
            properties: BasicProperties::default(),
            size: None,
            body: Vec::new(),
        })
    }
}

pub(super) async fn read_loop(
    mut rd: Reader,
    mut inbuf: bytes::BytesMut,
    shared: Arc<Shared>,
    deliveries: Option<mpsc::UnboundedSender<WireDelivery>>,
) {
    let mut partial: Option<Partial> = None;
    let why = loop {
        let frame = match read_frame(&mut rd, &mut inbuf).await {
            Ok(f) => f,
            Err(e) => break e,
        };
        shared
            .last_read_ms
            .store(shared.now_ms(), Ordering::Relaxed);
        let class = match frame {
            AMQPFrame::Method(_, class) => class,
            AMQPFrame::Header(_, h) => {
                if let Some(p) = partial.as_mut() {
                    p.properties = h.properties;
                    p.size = Some(h.body_size);
                }
                whole(&mut partial, &shared, deliveries.as_ref());
                continue;
            }
            AMQPFrame::Body(_, b) => {
                if let Some(p) = partial.as_mut() {
                    // Most bodies come in one frame: taken as they are.
                    if p.body.is_empty() {
                        p.body = b;
                    } else {
                        p.body.extend_from_slice(&b);
                    }
                }
                whole(&mut partial, &shared, deliveries.as_ref());
                continue;
            }
            _ => continue,
        };
        match class {
            AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) => {
                partial = Partial::new(Content::Deliver(d));
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                confirmed(&shared, a.delivery_tag, a.multiple, true)
            }
            AMQPClass::Basic(basic::AMQPMethod::Nack(n)) => {
                confirmed(&shared, n.delivery_tag, n.multiple, false)
            }
            AMQPClass::Basic(basic::AMQPMethod::Return(r)) => {
                partial = Partial::new(Content::Return {
                    exchange: r.exchange.to_string(),
                    routing_key: r.routing_key.to_string(),
                });
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(_)) => {
                break WireError::Closed(
                    "the broker cancelled the consumer (queue deleted?)".into(),
                )
            }
            AMQPClass::Connection(connection::AMQPMethod::Blocked(b)) => {
                tracing::warn!(reason = %b.reason, "RabbitMQ blocks publishing (resource alarm); results wait until it lifts");
                shared.blocked.store(true, Ordering::Relaxed)
            }
            AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => {
                tracing::info!("RabbitMQ accepts publishing again");
                shared.blocked.store(false, Ordering::Relaxed)
            }
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                let ok = connection::CloseOk {};
                let _ = shared.send(&[method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(ok)),
                )]);
                break WireError::Closed(format!(
                    "by the broker: {} {}",
                    c.reply_code, c.reply_text
                ));
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                break WireError::Closed("closed".into())
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                break WireError::Closed(format!(
                    "channel closed by the broker: {} {}",
                    c.reply_code, c.reply_text
                ))
            }
            _ => {}
        }
    };
    shared.blocked.store(false, Ordering::Relaxed);
    shared.end(why);
}

/// Hands on the content in `partial` once all its body is there.
fn whole(
    partial: &mut Option<Partial>,
    shared: &Shared,
    deliveries: Option<&mpsc::UnboundedSender<WireDelivery>>,
) {
    let whole = partial
        .as_ref()
        .is_some_and(|p| p.size.is_some_and(|s| p.body.len() as u64 >= s));
    if !whole {
        return;
    }
    let p = partial.take().expect("checked");
    match p.method {
        Content::Deliver(d) => {
            if let Some(tx) = deliveries {
                let delivery_tag = d.delivery_tag;
                shared
                    .state
                    .lock()
                    .expect("wire lock")
                    .acks
                    .delivered(delivery_tag);
                let _ = tx.send(WireDelivery {
                    delivery_tag,
                    routing_key: d.routing_key.to_string(),
                    properties: p.properties,
                    body: p.body,
                });
            }
        }
        Content::Return {
            exchange,
            routing_key,
        } => returned(shared, message_key(&exchange, &routing_key, &p.body)),
    }
}

/// Marks the oldest unconfirmed mandatory publish of this content returned
/// (the broker sends a return before the confirm of its message).
pub(super) fn returned(shared: &Shared, key: u64) {
    let mut st = shared.state.lock().expect("wire lock");
    if let Some(u) = st
        .unconfirmed
        .iter_mut()
        .find(|u| !u.returned && u.returnable == Some(key))
    {
        u.returned = true;
    }
}

/// Resolves the publishes a broker's `ack`/`nack` covers (up to `tag`, or
/// `tag` alone).
pub(super) fn confirmed(shared: &Shared, tag: u64, multiple: bool, ack: bool) {
    let mut st = shared.state.lock().expect("wire lock");
    let answer = |u: Unconfirmed| {
        let _ = u.answer.send(match ack {
            true => Confirm::Ack {
                returned: u.returned,
            },
            false => Confirm::Nack,
        });
    };
    if multiple {
        while st.unconfirmed.front().is_some_and(|u| u.tag <= tag) {
            answer(st.unconfirmed.pop_front().expect("checked"));
        }
    } else if let Some(i) = st.unconfirmed.iter().position(|u| u.tag == tag) {
        answer(st.unconfirmed.remove(i).expect("in range"));
    }
}

pub(super) async fn write_loop(mut wr: Writer, shared: Arc<Shared>, heartbeat: Duration) {
    let mut beat = Vec::new();
    encode(&mut beat, &[AMQPFrame::Heartbeat]);
    // Heartbeats at half the agreed interval; silence for two intervals ends it.
    let period = if heartbeat.is_zero() {
        Duration::from_secs(3600)
    } else {
        heartbeat / 2
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            _ = shared.ready.notified() => {
                // Let the tasks already woken (the results and acks of one
                // batch) queue their frames too: one send for all of them, not
                // one each. No timer: an idle connection writes at once.
                tokio::task::yield_now().await;
            }
            _ = tick.tick() => {
                let silent_ms = shared.now_ms().saturating_sub(shared.last_read_ms.load(Ordering::Relaxed));
                if !heartbeat.is_zero() && silent_ms > 2 * heartbeat.as_millis() as u64 {
                    shared.end(WireError::Closed(format!("no heartbeat from the broker for {silent_ms} ms")));
                    return;
                }
                shared.state.lock().expect("wire lock").out.extend_from_slice(&beat);
            }
        }
        {
            let mut st = shared.state.lock().expect("wire lock");
            st.drain_acks();
            std::mem::swap(&mut out, &mut st.out);
        }
        if !out.is_empty() {
            if let Err(e) = wr.write_all(&out).await {
                shared.end(e.into());
                return;
            }
            out.clear();
        }
        if !shared.open.load(Ordering::Acquire) {
            let _ = wr.flush().await;
            let _ = wr.shutdown().await;
            return;
        }
    }
}
