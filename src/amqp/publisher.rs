//! Publishing with publisher confirms, on a connection of its own so that a busy
//! consumer connection (or broker flow control on it) never holds results back.
//! A lost connection is reopened on the next publish.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Event};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{connect, AmqpError};
use crate::config::AmqpConfig;

pub struct Publisher {
    cfg: AmqpConfig,
    role: &'static str,
    link: Mutex<Option<(Connection, Channel)>>,
    /// Set while the broker blocks this connection's publishes (a memory or disk
    /// alarm): confirms wait until it lifts.
    blocked: Arc<AtomicBool>,
}

impl Publisher {
    pub fn new(cfg: AmqpConfig, role: &'static str) -> Self {
        Self {
            cfg,
            role,
            link: Mutex::new(None),
            blocked: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether the broker is blocking publishes on this connection now.
    pub fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    /// A connected confirm-mode channel, reconnecting if the last one was lost.
    async fn channel(&self) -> Result<Channel, AmqpError> {
        let mut link = self.link.lock().await;
        if let Some((conn, ch)) = link.as_ref() {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
            info!(role = self.role, "publisher connection lost; reconnecting");
        }
        let conn = connect(&self.cfg, self.role).await?;
        self.watch_blocking(&conn);
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *link = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Follows `connection.blocked` / `connection.unblocked` for as long as the
    /// connection lives.
    fn watch_blocking(&self, conn: &Connection) {
        let mut events = conn.events_listener();
        let blocked = self.blocked.clone();
        let role = self.role;
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Event::ConnectionBlocked(reason) => {
                        warn!(role, %reason, "RabbitMQ blocks publishing (resource alarm); results wait until it lifts");
                        blocked.store(true, Ordering::Relaxed);
                    }
                    Event::ConnectionUnblocked => {
                        info!(role, "RabbitMQ accepts publishing again");
                        blocked.store(false, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            blocked.store(false, Ordering::Relaxed);
        });
    }

    /// Publishes one persistent message and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        self.send(exchange, routing_key, body, properties, false)
            .await
            .map(|_| ())
    }

    /// Publishes with `mandatory` and waits for the confirm: a message no queue
    /// took (the broker returned it) is an error, not a silent drop.
    pub async fn publish_mandatory(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        if self
            .send(exchange, routing_key, body, properties, true)
            .await?
        {
            Ok(())
        } else {
            Err(AmqpError::Unroutable {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            })
        }
    }

    /// `Ok(false)`: a mandatory message the broker returned, unrouted.
    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<bool, AmqpError> {
        let ch = self.channel().await?;
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                body,
                properties.with_delivery_mode(2),
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(AmqpError::Nacked);
        }
        Ok(confirm.take_message().is_none())
    }

    /// Publishes JSON with the usual properties, as `mandatory`: `Ok(false)` when
    /// no queue took it (results may go unbound; the caller counts them).
    pub async fn publish_json(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: Option<FieldTable>,
    ) -> Result<bool, AmqpError> {
        let mut props = BasicProperties::default().with_content_type("application/json".into());
        if let Some(h) = headers {
            props = props.with_headers(h);
        }
        self.send(exchange, routing_key, body, props, true).await
    }

    pub async fn close(&self) {
        if let Some((conn, _)) = self.link.lock().await.take() {
            let _ = conn.close(200, "shutdown".into()).await;
        }
    }
}

/// The results exchange: where the pipeline's results go, with the broker's
/// confirms; routing key `push.<status>`.
pub struct ResultsExchange {
    pub publisher: Arc<Publisher>,
    pub exchange: String,
}

impl crate::pipeline::ResultPublisher for ResultsExchange {
    fn publish_result<'a>(
        &'a self,
        status: &'static str,
        body: &'a [u8],
    ) -> futures_util::future::BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let key = format!("push.{status}");
            self.publisher
                .publish_json(&self.exchange, &key, body, None)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
