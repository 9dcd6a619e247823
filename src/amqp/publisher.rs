//! Publishing with publisher confirms, on a connection of its own so that a busy
//! consumer connection (or broker flow control on it) never holds results back.
//! A lost connection is reopened on the next publish.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;
use tracing::info;

use super::{connect, AmqpError};
use crate::config::AmqpConfig;

pub struct Publisher {
    cfg: AmqpConfig,
    role: &'static str,
    link: Mutex<Option<(Connection, Channel)>>,
}

impl Publisher {
    pub fn new(cfg: AmqpConfig, role: &'static str) -> Self {
        Self {
            cfg,
            role,
            link: Mutex::new(None),
        }
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
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *link = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Publishes one persistent message and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        let ch = self.channel().await?;
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(AmqpError::Nacked);
        }
        Ok(())
    }

    /// Publishes JSON with the usual properties.
    pub async fn publish_json(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: Option<FieldTable>,
    ) -> Result<(), AmqpError> {
        let mut props = BasicProperties::default().with_content_type("application/json".into());
        if let Some(h) = headers {
            props = props.with_headers(h);
        }
        self.publish(exchange, routing_key, body, props).await
    }

    pub async fn close(&self) {
        if let Some((conn, _)) = self.link.lock().await.take() {
            let _ = conn.close(200, "shutdown".into()).await;
        }
    }
}
