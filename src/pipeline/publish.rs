//! Results out: publishing with confirms, marking claims published, and refusing
//! malformed events.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tracing::warn;

use super::{Disposition, Incoming, Pipeline};
use crate::event::{now_rfc3339, EventType, InvalidEvent, PushResult, Status};
use crate::retry_policy::RetryPolicy;
use crate::store::calls::CallState;

/// Publishing results is retried this long (the publisher reconnects in between)
/// before the event is tried again from the start.
const RESULT_PUBLISH_PATIENCE: Duration = Duration::from_secs(30);
/// Pauses between tries of the results not yet confirmed.
const RESULT_PUBLISH_RETRY: RetryPolicy =
    RetryPolicy::doubling(Duration::from_millis(100), Duration::from_secs(5));

/// A result and its JSON, serialised once: the same bytes go to the broker and
/// into the claim.
pub(super) struct Outgoing {
    pub result: PushResult,
    pub body: bytes::Bytes,
}

impl Outgoing {
    pub fn new(result: PushResult) -> Self {
        let body = serde_json::to_vec(&result)
            .expect("results serialise")
            .into();
        Outgoing { result, body }
    }
}

impl Pipeline {
    /// Counts and publishes the results of one event, then marks them published
    /// (and settles the call, for a ring).
    pub(super) async fn publish_and_mark(
        &self,
        event_id: &str,
        results: &[Outgoing],
        settle: Option<(&str, CallState)>,
    ) -> Result<(), String> {
        for Outgoing { result: r, .. } in results {
            let env = r.environment.map(|e| e.as_str()).unwrap_or("none");
            self.metrics
                .deliveries
                .with_label_values(&[r.status.as_str(), env])
                .inc();
        }
        let timer = self.metrics.stage("publish");
        self.publish_results(results)
            .await
            .map_err(|e| format!("publish results: {e}"))?;
        drop(timer);
        let published: Vec<i64> = results.iter().filter_map(|r| r.result.device_id).collect();
        let timer = self.metrics.stage("settle");
        self.finish(event_id, &published, settle).await;
        drop(timer);
        Ok(())
    }

    /// Settles a ring's call from the results this copy of the event published.
    pub(super) async fn settle_call(&self, event_id: &str, call_id: &str, state: CallState) {
        let _timer = self.metrics.stage("settle");
        self.finish(event_id, &[], Some((call_id, state))).await;
    }

    /// Marks the claims published, retried through a short database outage: the
    /// claims stay this live worker's meanwhile, so a duplicate of the event
    /// waiting on them cannot take them over and publish the results again.
    async fn finish(&self, event_id: &str, published: &[i64], settle: Option<(&str, CallState)>) {
        let finished = super::retry::patiently("mark results as published", || {
            self.store.finish_event(event_id, published, settle)
        })
        .await;
        if let Err(e) = finished {
            // A duplicate of the event may now re-publish the stored results (never
            // push again); the call's state stays `ringing` in the trace.
            warn!(error = %e, "could not mark results as published");
        }
    }

    /// A malformed event: an `invalid_event` result when a call id was readable,
    /// then the dead-letter queue.
    pub(super) async fn refuse(&self, msg: &Incoming, invalid: InvalidEvent) -> Disposition {
        warn!(kind = invalid.kind.label(), call_id = invalid.call_id.as_deref().unwrap_or(""),
            error = %invalid.message, "refusing malformed call event");
        if let Some(call_id) = &invalid.call_id {
            let result = PushResult {
                event_id: msg.event_id_or(call_id, "invalid"),
                event_type: EventType::Incoming.as_str().into(),
                call_id: Some(call_id.clone()),
                to_user_id: None,
                device_id: None,
                token_suffix: None,
                bundle_id: None,
                status: Status::InvalidEvent,
                environment: None,
                fallback_used: false,
                apns_id: None,
                apns_status: None,
                reason: Some(invalid.to_string()),
                attempts: 0,
                latency_ms: None,
                completed_at: now_rfc3339(),
            };
            self.metrics
                .deliveries
                .with_label_values(&["invalid_event", "none"])
                .inc();
            if let Err(e) = self.publish_results(&[Outgoing::new(result)]).await {
                return Disposition::Retry(format!("publish invalid_event result: {e}"));
            }
        }
        self.metrics.events.with_label_values(&["invalid"]).inc();
        Disposition::DeadLetter {
            kind: invalid.kind.label(),
            message: invalid.message,
        }
    }

    /// Publishes every result and waits for the broker's confirms, retrying (with
    /// reconnects) for a while before giving up.
    async fn publish_results(&self, results: &[Outgoing]) -> Result<(), String> {
        let exchange = &self.cfg.amqp.results_exchange;
        let started = Instant::now();
        let mut delays = RESULT_PUBLISH_RETRY.delays();
        let mut delay = delays.next_delay();
        let mut pending: Vec<&Outgoing> = results.iter().collect();
        while !pending.is_empty() {
            let outcomes = join_all(pending.iter().map(|o| async move {
                let key = format!("push.{}", o.result.status.as_str());
                self.publisher
                    .publish_json(exchange, &key, &o.body, None)
                    .await
            }))
            .await;
            let mut failed = Vec::new();
            let mut last_error = String::new();
            for (o, outcome) in pending.iter().zip(outcomes) {
                match outcome {
                    Ok(routed) => {
                        self.metrics
                            .results_published
                            .with_label_values(&[o.result.status.as_str()])
                            .inc();
                        if !routed {
                            self.metrics.results_unrouted.inc();
                        }
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        failed.push(*o);
                    }
                }
            }
            if !failed.is_empty() {
                if started.elapsed() > RESULT_PUBLISH_PATIENCE {
                    return Err(last_error);
                }
                warn!(failed = failed.len(), error = %last_error, "result publish failed; retrying");
                tokio::time::sleep(delay).await;
                delay = delays.next_delay();
            }
            pending = failed;
        }
        Ok(())
    }
}
