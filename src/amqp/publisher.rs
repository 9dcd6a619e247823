//! Publishing with publisher confirms, on a connection of its own so that a busy
//! consumer connection (or broker flow control on it) never holds results back.
//! A lost connection is reopened on the next publish.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio::sync::Mutex;
use tracing::info;

use super::wire::{Confirm, WirePublisher};
use super::AmqpError;
use crate::config::AmqpConfig;

/// Publishes on a connection of our own (`super::wire`), in confirm mode.
pub struct Publisher {
    cfg: AmqpConfig,
    role: &'static str,
    link: Mutex<Option<Arc<WirePublisher>>>,
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

    /// A connected confirm-mode publisher, reconnecting if the last one was lost.
    async fn link(&self) -> Result<Arc<WirePublisher>, AmqpError> {
        let mut link = self.link.lock().await;
        if let Some(p) = link.as_ref() {
            if p.is_open() {
                return Ok(p.clone());
            }
            info!(role = self.role, "publisher connection lost; reconnecting");
        }
        let name = super::connection_name(self.role);
        let p = WirePublisher::open(&self.cfg, &name, self.blocked.clone())
            .await
            .map(Arc::new)
            .map_err(|e| AmqpError::wire(&self.cfg, e))?;
        *link = Some(p.clone());
        Ok(p)
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
        let link = self.link().await?;
        let properties = properties.with_delivery_mode(2);
        match link
            .publish(exchange, routing_key, mandatory, properties, body)
            .await?
        {
            Confirm::Ack { returned } => Ok(!returned),
            Confirm::Nack => Err(AmqpError::Nacked),
        }
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
        if let Some(p) = self.link.lock().await.take() {
            if let Ok(p) = Arc::try_unwrap(p) {
                p.close("shutdown").await;
            }
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
