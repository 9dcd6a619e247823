//! Our own AMQP connections (`amqp::wire`) against the real RabbitMQ: each
//! confirm and each return reaches its own publish, however they interleave,
//! and deliveries come out whole (empty bodies, bodies over a frame).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::ExchangeKind;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use voip_push_worker::amqp::wire::{BasicProperties, Confirm, WireConsumer, WirePublisher};
use voip_push_worker::amqp::{connect, delete_objects};
use voip_push_worker::config::AmqpConfig;

use crate::common::relay::Relay;
use crate::common::unique;

/// An exchange of the test's own with a queue bound to `bound.*` only.
async fn exchange_and_queue(cfg: &AmqpConfig) -> (String, String) {
    let (exchange, queue) = (unique("wire-x"), unique("wire-q"));
    let conn = connect(cfg, "wire test setup").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "bound.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "set up".into()).await;
    (exchange, queue)
}

async fn cleanup(cfg: &AmqpConfig, queue: &str, exchange: &str) {
    delete_objects(cfg, "wire test cleanup", [queue], [exchange]).await;
}

/// The publishes of one case: (routed to the queue?, body size).
fn publishes() -> impl Strategy<Value = Vec<(bool, usize)>> {
    prop::collection::vec(
        (
            any::<bool>(),
            prop_oneof![Just(0usize), 1..64usize, Just(300_000usize)],
        ),
        1..120,
    )
}

/// Publish `i`'s body: empty, or its number padded to `size`.
fn body(i: usize, size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    let mut b = format!("{i}:").into_bytes();
    b.resize(b.len().max(size), b'x');
    b
}

#[tokio::test]
async fn each_confirm_and_return_reaches_its_own_publish_and_deliveries_come_whole() {
    let cfg = AmqpConfig::default();
    let mut runner = proptest::test_runner::TestRunner::default();
    let cases: Vec<Vec<(bool, usize)>> = (0..6)
        .map(|_| publishes().new_tree(&mut runner).unwrap().current())
        .collect();
    for case in cases {
        let (exchange, queue) = exchange_and_queue(&cfg).await;
        let publisher = Arc::new(
            WirePublisher::open(&cfg, "wire test publisher", Arc::default())
                .await
                .unwrap(),
        );
        // All at once: confirms (some `multiple`) and returns interleave.
        let answers = join_all(case.iter().enumerate().map(|(i, (routed, size))| {
            let publisher = publisher.clone();
            let exchange = exchange.clone();
            async move {
                let key = if *routed { "bound.k" } else { "nowhere.k" };
                publisher
                    .publish(
                        &exchange,
                        key,
                        true,
                        BasicProperties::default(),
                        &body(i, *size),
                    )
                    .await
                    .unwrap()
            }
        }))
        .await;
        for ((routed, _), answer) in case.iter().zip(&answers) {
            assert_eq!(*answer, Confirm::Ack { returned: !routed }, "case {case:?}");
        }

        let mut want: Vec<Vec<u8>> = (case.iter().enumerate())
            .filter(|(_, (routed, _))| *routed)
            .map(|(i, (_, size))| body(i, *size))
            .collect();
        let mut consumer = WireConsumer::open(&cfg, "wire test consumer", &queue, 16)
            .await
            .unwrap();
        let settler = consumer.settler();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("every routed message delivered")
                .unwrap();
            settler.ack(d.delivery_tag).unwrap();
            got.push(d.body);
        }
        got.sort_unstable();
        want.sort_unstable();
        assert!(got == want, "bodies differ for case {case:?}");
        consumer.close("done").await;
        cleanup(&cfg, &queue, &exchange).await;
    }
}

/// A path to the broker that dies silently (nothing closed, nothing arrives):
/// the connection ends within two heartbeat intervals, the consumer says so
/// and a publish waiting for its confirm fails, so the driver reconnects
/// instead of waiting on a dead socket for ever.
#[tokio::test]
async fn a_silent_broker_ends_the_connection_within_two_heartbeats() {
    let direct = AmqpConfig::default();
    let (exchange, queue) = exchange_and_queue(&direct).await;
    let relay = Relay::start("127.0.0.1:5672".parse().unwrap()).await;
    let cfg = AmqpConfig {
        url: format!("amqp://guest:guest@{}/%2f?heartbeat=1", relay.addr),
        ..AmqpConfig::default()
    };
    let mut consumer = WireConsumer::open(&cfg, "wire silent consumer", &queue, 4)
        .await
        .unwrap();
    let publisher = WirePublisher::open(&cfg, "wire silent publisher", Arc::default())
        .await
        .unwrap();
    relay.blackhole_existing();
    let started = Instant::now();
    let publish = publisher.publish(&exchange, "bound.k", true, BasicProperties::default(), b"x");
    let (next, published) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), consumer.next()),
        tokio::time::timeout(Duration::from_secs(10), publish),
    );
    let err = next.expect("the consumer learns in time").unwrap_err();
    assert!(err.to_string().contains("heartbeat"), "{err}");
    assert!(published.expect("the publish ends in time").is_err());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    relay.stop.cancel();
    cleanup(&direct, &queue, &exchange).await;
}

/// How a delivery is settled in [`acks_in_runs_settle_each_delivery_as_asked`].
#[derive(Clone, Copy, Debug)]
enum Settle {
    Ack,
    Requeue,
    Reject,
}

/// Acks go out in runs (`multiple`) beside nacks and rejects, in whatever
/// order a consumer settles its deliveries: the broker accepts every frame (a
/// wrong `multiple` would close the channel: "unknown delivery tag"), each
/// message ends as its settle asked (a requeued one comes again, an acked or
/// rejected one never), and none is left unacked once all are settled.
#[tokio::test]
async fn acks_in_runs_settle_each_delivery_as_asked() {
    let cfg = AmqpConfig::default();
    let settle = prop_oneof![
        8 => Just(Settle::Ack),
        1 => Just(Settle::Requeue),
        1 => Just(Settle::Reject),
    ];
    // A message's settles (all but the last are requeues), then the order
    // the deliveries in hand are settled in.
    let case = (
        prop::collection::vec(settle, 150..250),
        prop::collection::vec(any::<prop::sample::Index>(), 400),
        1..40usize,
    );
    let mut runner = proptest::test_runner::TestRunner::default();
    for _ in 0..3 {
        let (first, picks, batch) = case.new_tree(&mut runner).unwrap().current();
        let (exchange, queue) = exchange_and_queue(&cfg).await;
        let publisher = WirePublisher::open(&cfg, "wire acks publisher", Arc::default())
            .await
            .unwrap();
        for i in 0..first.len() {
            let answer = publisher
                .publish(
                    &exchange,
                    "bound.k",
                    true,
                    BasicProperties::default(),
                    &body(i, 8),
                )
                .await
                .unwrap();
            assert_eq!(answer, Confirm::Ack { returned: false });
        }
        let mut consumer = WireConsumer::open(&cfg, "wire acks consumer", &queue, 64)
            .await
            .unwrap();
        let settler = consumer.settler();
        // Per message: how often it came, and how it ended.
        let mut came = vec![0usize; first.len()];
        let mut ended: Vec<Option<Settle>> = vec![None; first.len()];
        let mut hand = Vec::new();
        let mut picks = picks.iter().cycle();
        while ended.iter().any(Option::is_none) {
            while hand.len() < batch {
                let next = tokio::time::timeout(Duration::from_millis(200), consumer.next());
                let Ok(d) = next.await else { break };
                let d = d.expect("the connection stays open: every frame was accepted");
                let text = String::from_utf8(d.body).unwrap();
                let i: usize = text.split(':').next().unwrap().parse().unwrap();
                came[i] += 1;
                hand.push((d.delivery_tag, i));
            }
            assert!(
                !hand.is_empty(),
                "messages unsettled but none delivered: {ended:?}"
            );
            // Settle some of the hand, in the order the case picks.
            for _ in 0..hand.len().div_ceil(2) {
                let (tag, i) = hand.remove(picks.next().unwrap().index(hand.len()));
                // A message is requeued once at most: its second coming is acked.
                let how = match (first[i], came[i]) {
                    (Settle::Requeue, 2..) => Settle::Ack,
                    (how, _) => how,
                };
                match how {
                    Settle::Ack => settler.ack(tag).unwrap(),
                    Settle::Requeue => settler.nack(tag, true).unwrap(),
                    Settle::Reject => settler.reject(tag, false).unwrap(),
                }
                if !matches!(how, Settle::Requeue) {
                    assert!(ended[i].is_none(), "message {i} came after it was settled");
                    ended[i] = Some(how);
                }
            }
        }
        for (i, (first, came)) in first.iter().zip(&came).enumerate() {
            let want = if matches!(first, Settle::Requeue) {
                2
            } else {
                1
            };
            assert_eq!(*came, want, "message {i} ({first:?})");
        }
        // Nothing left unacked: closing would hand it back to the queue.
        consumer.close("done").await;
        let conn = connect(&cfg, "wire acks check").await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let q = ch
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .unwrap();
        assert_eq!(
            q.message_count(),
            0,
            "messages back in the queue after close"
        );
        let _ = conn.close(200, "checked".into()).await;
        cleanup(&cfg, &queue, &exchange).await;
    }
}
