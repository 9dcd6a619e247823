//! Dead letters with their reason: the message as received, its headers plus
//! `x-vpw-reason` (a closed set, CONTRACT §13) and `x-vpw-error` (the detail),
//! published `mandatory` so a dead-letter exchange with no queue bound is an
//! error, retried for a while, never a silent drop.

use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, LongString};
use lapin::BasicProperties;
use tracing::warn;

use super::{AmqpError, Publisher};
use crate::retry_policy::RetryPolicy;

/// How long a dead letter's publish is retried (the publisher reconnects in
/// between) before the message is left to the broker's own dead-lettering.
const DEAD_LETTER_PATIENCE: Duration = Duration::from_secs(30);
/// Pauses between tries of a dead letter's publish.
const DEAD_LETTER_RETRY: RetryPolicy =
    RetryPolicy::doubling(Duration::from_millis(100), Duration::from_secs(5));

/// Publishes a message (its routing key, properties and body, as received) to
/// `exchange` with its reason; `Ok` once a queue holds it.
pub async fn publish(
    publisher: &Publisher,
    exchange: &str,
    (routing_key, properties, body): (&str, &BasicProperties, &[u8]),
    reason: &'static str,
    detail: &str,
) -> Result<(), AmqpError> {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        "x-vpw-reason".into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    headers.insert(
        "x-vpw-error".into(),
        AMQPValue::LongString(LongString::from(detail)),
    );
    let props = BasicProperties::default()
        .with_headers(headers)
        .with_content_type(
            properties
                .content_type()
                .clone()
                .unwrap_or_else(|| "application/octet-stream".into()),
        );
    let started = Instant::now();
    let mut delays = DEAD_LETTER_RETRY.delays();
    let mut delay = delays.next_delay();
    loop {
        match publisher
            .publish_mandatory(exchange, routing_key, body, props.clone())
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() + delay < DEAD_LETTER_PATIENCE => {
                warn!(error = %e, reason, retry_in_ms = delay.as_millis() as u64,
                    "could not publish a dead letter; retrying");
                tokio::time::sleep(delay).await;
                delay = delays.next_delay();
            }
            Err(e) => return Err(e),
        }
    }
}
