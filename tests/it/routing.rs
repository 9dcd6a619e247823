//! Publishes that reach no queue: `mandatory` makes the broker say so, and the
//! publisher turns it into an error (dead letters, `POST /v1/calls`) or a count
//! (results), never a silent drop.

use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use voip_push_worker::amqp::{connect, declare_exchange, AmqpError, Publisher};
use voip_push_worker::config::AmqpConfig;

use crate::common::unique;

#[tokio::test]
async fn a_mandatory_publish_to_an_unbound_exchange_is_an_error() {
    let cfg = AmqpConfig::default();
    let conn = connect(&cfg, "test routing").await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let exchange = unique("it.routing.");
    declare_exchange(&ch, &exchange, ExchangeKind::Topic)
        .await
        .expect("declare");
    let publisher = Publisher::new(cfg.clone(), "test routing");
    let props = || BasicProperties::default().with_content_type("application/json".into());

    let unbound = publisher
        .publish_mandatory(&exchange, "call.initiate", b"{}", props())
        .await;
    assert!(
        matches!(&unbound, Err(AmqpError::Unroutable { exchange: x, routing_key: k })
            if *x == exchange && k == "call.initiate"),
        "{unbound:?}"
    );
    assert!(
        !publisher
            .publish_json(&exchange, "push.delivered", b"{}", None)
            .await
            .expect("a result publish is confirmed"),
        "a result that reached no queue is reported as unrouted"
    );

    let queue = unique("it.routing.q.");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue");
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    publisher
        .publish_mandatory(&exchange, "call.initiate", b"{}", props())
        .await
        .expect("a bound exchange routes the message");
    assert!(publisher
        .publish_json(&exchange, "push.delivered", b"{}", None)
        .await
        .expect("confirmed"));

    publisher.close().await;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
}
