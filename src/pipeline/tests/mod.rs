//! Unit tests of the pipeline's decisions, on in-memory edges (`super::fakes`):
//! what is pushed, published and recorded for each thing a store, APNs or the
//! broker can answer. The edges themselves are tested against Postgres,
//! RabbitMQ and the APNs simulator in `tests/it/`.

mod admit;
mod answers;
mod cancels;
mod properties;
mod publish;
mod retries;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::fakes::{Answer, FakeApns, FakePublisher, FakeStore};
use super::{Disposition, Incoming, Pipeline};
use crate::apns::guard::AppGuard;
use crate::apns::{Apns, App, ProviderToken, RetryPolicy};
use crate::config::{AppConfig, Config};
use crate::event::{now_ms, Environment, PushResult};
use crate::metrics::Metrics;

pub(super) const BUNDLE: &str = "com.example.app";
/// The callee.
pub(super) const USER: &str = "10";
/// The claims' owner: this worker, this message.
pub(super) const OWNER: &str = "w1/1";

/// A pipeline on fakes, and the fakes to script and inspect.
pub(super) struct Rig {
    pub pipeline: Pipeline,
    pub store: Arc<FakeStore>,
    pub apns: Arc<FakeApns>,
    pub results: Arc<FakePublisher>,
}

impl Rig {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    /// A rig whose configuration `tune` adjusts; APNs retries are 1–4 ms apart.
    pub fn with(tune: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = Config::default();
        cfg.apns.bundle_id = BUNDLE.into();
        cfg.worker.retry_min_delay_ms = 1;
        cfg.worker.retry_max_delay_ms = 4;
        tune(&mut cfg);
        let metrics = Metrics::new();
        let (store, apns, results) = Default::default();
        let app = App {
            config: AppConfig {
                bundle_id: BUNDLE.into(),
                ..AppConfig::default()
            },
            topic: format!("{BUNDLE}.voip"),
            tokens: Arc::new(ProviderToken::none(metrics.clone())),
            client: Arc::clone(&apns) as _,
            guard: AppGuard::new(cfg.apns.misconfigured_after_devices),
        };
        let retry = RetryPolicy::doubling(
            Duration::from_millis(cfg.worker.retry_min_delay_ms),
            Duration::from_millis(cfg.worker.retry_max_delay_ms),
        );
        let pushes = Apns::with_apps(vec![app], cfg.apns.default_environment, retry);
        let pipeline = Pipeline {
            cfg: Arc::new(cfg),
            store: Arc::clone(&store) as _,
            apns: Arc::new(pushes),
            results: Arc::clone(&results) as _,
            metrics,
        };
        Rig {
            pipeline,
            store,
            apns,
            results,
        }
    }

    /// A rig whose callee has one device, `token(1)`, which APNs answers in
    /// production with `answers` (the last one for ever after).
    pub fn answering(answers: &[Answer]) -> (Self, i64) {
        let rig = Self::new();
        let d = rig.device(&token(1));
        rig.apns.answer(&token(1), Environment::Production, answers);
        (rig, d)
    }

    /// Handles `event`, which must be acknowledged.
    pub async fn acked(&self, event: Value) {
        assert_eq!(self.handle(event).await, Disposition::Ack);
    }

    /// Handles a ring of `call_id`, which must be acknowledged.
    pub async fn ring(&self, call_id: &str) {
        self.acked(ring(call_id)).await;
    }

    pub fn app(&self) -> &App {
        self.pipeline.apns.app(None).expect("the app")
    }

    /// A live device of the callee with `token`.
    pub fn device(&self, token: &str) -> i64 {
        self.store.add_device(USER, BUNDLE, token)
    }

    pub async fn handle(&self, event: Value) -> Disposition {
        self.pipeline.handle(&message(event)).await
    }

    /// The results published for `device_id`.
    pub fn results_for(&self, device_id: i64) -> Vec<PushResult> {
        let all = self.results.published().into_iter();
        all.filter(|r| r.device_id == Some(device_id)).collect()
    }

    /// The only result published for `device_id`.
    pub fn result_for(&self, device_id: i64) -> PushResult {
        let mut results = self.results_for(device_id);
        assert_eq!(results.len(), 1, "one result for device {device_id}");
        results.remove(0)
    }
}

/// A message as the broker hands it over (no `message_id`: the event id is
/// derived from the call, the same on every redelivery).
pub(super) fn message(event: Value) -> Incoming {
    Incoming {
        body: event.to_string().into_bytes(),
        message_id: None,
        timestamp: None,
        routing_key: "call.incoming".into(),
        claim_owner: OWNER.into(),
    }
}

/// A ring of the callee, started now.
pub(super) fn ring(call_id: &str) -> Value {
    json!({"type": "call.incoming", "callId": call_id, "toUserId": USER, "fromUserId": 11})
}

/// A ring whose deadline is `left_ms` away (its one-second ring started
/// earlier), for tests that run into it.
pub(super) fn ring_ending_in(call_id: &str, left_ms: i64) -> Value {
    let mut event = ring(call_id);
    event["ringTimeoutSecs"] = json!(1);
    event["sentAt"] = json!(now_ms() - 1000 + left_ms);
    event
}

pub(super) fn cancel(call_id: &str, reason: &str) -> Value {
    json!({"type": "call.cancel", "callId": call_id, "toUserId": USER, "reason": reason})
}

/// A device token: 32 bytes of `n`.
pub(super) fn token(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}
