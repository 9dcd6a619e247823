//! In-memory stand-ins for the pipeline's three edges, for its unit tests: a
//! store ([`FakeStore`]), an APNs that answers as scripted ([`FakeApns`]) and a
//! results publisher that records what it confirms ([`FakePublisher`]). The
//! real edges are tested against the real services in `tests/it/`.

mod settle;
pub mod store;

pub use store::FakeStore;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::ResultPublisher;
use crate::apns::{ApnsResponse, ApnsSender, Lane, PushRequest, PushType, SendError};
use crate::event::{Environment, PushResult};

/// One scripted APNs answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP answer: status, reason, and (on 410) Apple's timestamp.
    Http(u16, Option<&'static str>, Option<i64>),
    /// No answer within the timeout.
    Silence,
}

impl Answer {
    pub const OK: Answer = Answer::Http(200, None, None);

    pub fn refused(status: u16, reason: &'static str) -> Self {
        Answer::Http(status, Some(reason), None)
    }

    /// 410 `Unregistered` with Apple's timestamp.
    pub fn unregistered(at_ms: i64) -> Self {
        Answer::Http(410, Some("Unregistered"), Some(at_ms))
    }
}

/// One request APNs received.
#[derive(Clone, Debug)]
pub struct Sent {
    pub environment: Environment,
    pub lane: Lane,
    pub token: String,
    pub push_type: PushType,
    pub topic: String,
    pub apns_id: uuid::Uuid,
}

type OnSend = Arc<dyn Fn(&Sent) + Send + Sync>;

/// APNs answering each (token, environment) from a script: the answers in
/// order, the last one for ever after; 200 where nothing is scripted.
#[derive(Default)]
pub struct FakeApns {
    script: Mutex<HashMap<(String, Environment), VecDeque<Answer>>>,
    sent: Mutex<Vec<Sent>>,
    resets: AtomicUsize,
    on_send: Mutex<Option<OnSend>>,
}

impl FakeApns {
    /// What `token` is answered in `env`, in order.
    pub fn answer(&self, token: &str, env: Environment, answers: &[Answer]) {
        let mut script = self.script.lock().expect("script lock");
        script.insert((token.to_string(), env), answers.iter().copied().collect());
    }

    /// Runs `f` after each request is taken (before it is answered).
    pub fn on_send(&self, f: impl Fn(&Sent) + Send + Sync + 'static) {
        *self.on_send.lock().expect("on_send lock") = Some(Arc::new(f));
    }

    pub fn sent(&self) -> Vec<Sent> {
        self.sent.lock().expect("sent lock").clone()
    }

    /// How many times the connections of an environment were dropped.
    pub fn resets(&self) -> usize {
        self.resets.load(Ordering::SeqCst)
    }

    fn next_answer(&self, token: &str, env: Environment) -> Answer {
        let mut script = self.script.lock().expect("script lock");
        match script.get_mut(&(token.to_string(), env)) {
            Some(q) if q.len() > 1 => q.pop_front().expect("an answer"),
            Some(q) => q.front().copied().unwrap_or(Answer::OK),
            None => Answer::OK,
        }
    }
}

impl ApnsSender for FakeApns {
    fn send_on<'a>(
        &'a self,
        env: Environment,
        lane: Lane,
        req: &'a PushRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ApnsResponse, SendError>> {
        let sent = Sent {
            environment: env,
            lane,
            token: req.token.clone(),
            push_type: req.push_type,
            topic: req.topic.clone(),
            apns_id: req.apns_id,
        };
        self.sent.lock().expect("sent lock").push(sent.clone());
        let hook = self.on_send.lock().expect("on_send lock").clone();
        if let Some(f) = hook {
            f(&sent);
        }
        let answer = match self.next_answer(&req.token, env) {
            Answer::Http(status, reason, timestamp_ms) => Ok(ApnsResponse {
                status,
                reason: reason.map(str::to_string),
                apns_id: Some(req.apns_id.to_string()),
                timestamp_ms,
                latency: Duration::from_millis(1),
                date: None,
            }),
            Answer::Silence => Err(SendError::Timeout {
                environment: env.as_str(),
                timeout_ms: timeout.as_millis(),
            }),
        };
        Box::pin(async move { answer })
    }

    fn reset(&self, _env: Environment) -> BoxFuture<'_, ()> {
        self.resets.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {})
    }
}

/// A broker that confirms every result (recording it), except the next
/// `failures` publishes.
#[derive(Default)]
pub struct FakePublisher {
    published: Mutex<Vec<PushResult>>,
    failures: AtomicUsize,
}

impl FakePublisher {
    /// The next `n` publishes are not confirmed (`usize::MAX`: none is).
    pub fn fail_next(&self, n: usize) {
        self.failures.store(n, Ordering::SeqCst);
    }

    pub fn published(&self) -> Vec<PushResult> {
        self.published.lock().expect("published lock").clone()
    }
}

impl ResultPublisher for FakePublisher {
    fn publish_result<'a>(
        &'a self,
        status: &'static str,
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<bool, String>> {
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                usize::MAX => Some(usize::MAX),
                n => Some(n - 1),
            });
        let outcome = if failing.is_ok() {
            Err("fake broker: not confirmed".to_string())
        } else {
            let result: PushResult = serde_json::from_slice(body).expect("a result");
            assert_eq!(result.status.as_str(), status, "routed by its status");
            self.published.lock().expect("published lock").push(result);
            Ok(true)
        };
        Box::pin(async move { outcome })
    }
}
