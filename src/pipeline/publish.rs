//! Results out: publishing with confirms, then recording outcomes and marking
//! claims published; refusing malformed events.

use std::time::{Duration, Instant};

use futures_util::future::{join_all, BoxFuture};
use tracing::warn;

use super::{Disposition, Incoming, Pipeline};
use crate::event::{now_rfc3339, EventType, InvalidEvent, PushResult, Status};
use crate::retry_policy::RetryPolicy;
use crate::store::claims::Finished;

/// Publishing results is retried this long (the publisher reconnects in between)
/// before the event is tried again from the start. (The unit tests' broker that
/// never confirms is given up on sooner.)
const RESULT_PUBLISH_PATIENCE: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(30)
};
/// Pauses between tries of the results not yet confirmed.
const RESULT_PUBLISH_RETRY: RetryPolicy =
    RetryPolicy::doubling(Duration::from_millis(100), Duration::from_secs(5));

/// Where results go: the results exchange (`amqp::ResultsExchange`), or
/// anything else that confirms what it takes.
pub trait ResultPublisher: Send + Sync {
    /// Publishes one result (its status, its JSON) and waits until it is
    /// confirmed: `Ok(false)` when it was confirmed but no queue took it.
    fn publish_result<'a>(
        &'a self,
        status: &'static str,
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<bool, String>>;
}

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
    /// Publishes the results of one event, then finishes it (see `finish`).
    pub(super) async fn publish_and_finish(
        &self,
        results: &[Outgoing],
        finished: Finished,
    ) -> Result<(), String> {
        self.publish_counted(results).await?;
        self.finish(finished).await;
        Ok(())
    }

    /// Counts and publishes results, waiting for the broker's confirms.
    pub(super) async fn publish_counted(&self, results: &[Outgoing]) -> Result<(), String> {
        for Outgoing { result: r, .. } in results {
            let env = r.environment.map(|e| e.as_str()).unwrap_or("none");
            self.metrics
                .deliveries
                .with_label_values(&[r.status.as_str(), env])
                .inc();
        }
        let _timer = self.metrics.stage("publish");
        self.publish_results(results)
            .await
            .map_err(|e| format!("publish results: {e}"))
    }

    /// After the broker confirmed an event's results: records the outcomes of
    /// its pushes, marks the claims published and settles the call (see
    /// `Store::finish_event`). Recording after the confirm costs one update of
    /// each claim instead of two; a crash in between (milliseconds) is part of
    /// the crash window: the next copy of the event pushes again. Retried
    /// through a short database outage: the claims stay this live worker's
    /// meanwhile, so a duplicate of the event waiting on them cannot take them
    /// over.
    pub(super) async fn finish(&self, finished: Finished) {
        let _timer = self.metrics.stage("record");
        let done = super::retry::patiently("record the outcomes", || {
            self.store.finish_event(finished.clone())
        })
        .await;
        if let Err(e) = done {
            // A duplicate of the event may now push again; the call's state
            // stays `ringing` in the trace.
            warn!(error = %e, "could not record the outcomes of published results");
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
        let started = Instant::now();
        let mut delays = RESULT_PUBLISH_RETRY.delays();
        let mut delay = delays.next_delay();
        let mut pending: Vec<&Outgoing> = results.iter().collect();
        while !pending.is_empty() {
            let outcomes = join_all(pending.iter().map(|o| {
                self.results
                    .publish_result(o.result.status.as_str(), &o.body)
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
