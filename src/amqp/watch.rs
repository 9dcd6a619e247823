//! Reading results back: a private, auto-deleted queue bound to the results
//! exchange. Used by `demo`, by operators debugging a deployment, and by tests.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};

use super::{connect, AmqpError};
use crate::config::AmqpConfig;
use crate::event::PushResult;

pub struct ResultWatch {
    conn: Connection,
    consumer: lapin::Consumer,
}

impl ResultWatch {
    /// Starts watching every result published from now on.
    pub async fn open(cfg: &AmqpConfig) -> Result<Self, AmqpError> {
        let conn = connect(cfg, "result watch").await?;
        let ch = conn.create_channel().await?;
        super::declare_exchange(&ch, &cfg.results_exchange, ExchangeKind::Topic).await?;
        let queue = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        ch.queue_bind(
            queue.name().clone(),
            cfg.results_exchange.as_str().into(),
            "push.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let consumer = ch
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self { conn, consumer })
    }

    /// The next result, or `None` when none arrives within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<PushResult> {
        let delivery = tokio::time::timeout(timeout, self.consumer.next())
            .await
            .ok()??
            .ok()?;
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        serde_json::from_slice(&delivery.data).ok()
    }

    /// Results until one matching `pred` arrives (returned with those before it),
    /// or the deadline passes.
    pub async fn until(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&PushResult) -> bool,
    ) -> (Vec<PushResult>, bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(r) => {
                    let done = pred(&r);
                    seen.push(r);
                    if done {
                        return (seen, true);
                    }
                }
                None => return (seen, false),
            }
        }
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}
