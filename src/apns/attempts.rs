//! The attempt loop for one device: environment fallback, retries within the
//! ring, and the hooks a call's cancellation and records plug into.

use std::time::Instant;

use tracing::{info, warn};

use super::{
    classify, outcome, Action, Apns, ApnsResponse, App, AttemptRecord, Lane, PushRequest, PushType,
};
use crate::event::Environment;
use crate::metrics::Metrics;

/// The final word on one (event, device) after every attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryOutcome {
    pub action: FinalAction,
    /// The environment that answered last (the one that accepted, on success).
    pub environment: Environment,
    pub fallback_used: bool,
    pub attempts: u32,
    pub last: Option<ApnsResponse>,
    /// Why the last attempt got no answer, when it got none.
    pub last_error: Option<String>,
    pub apns_id: uuid::Uuid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalAction {
    Delivered,
    /// Both environments said `BadDeviceToken`, or `DeviceTokenNotForTopic`:
    /// invalidate, if the guard (`guard`) finds the app proven.
    Invalidate,
    /// 410 — the caller compares Apple's timestamp with the registration.
    Unregistered,
    /// Rejected for a reason retrying cannot fix.
    Failed,
    /// The ring deadline came before a success.
    Expired,
    /// The call was cancelled before an attempt.
    Cancelled,
}

impl Apns {
    /// Pushes to one device until APNs accepts, refuses for good, the deadline
    /// passes, or `hooks` stops it (the call was cancelled). Falls back to the other
    /// environment once on `BadDeviceToken`. `hooks` is asked before and told after
    /// every attempt.
    pub async fn deliver<H: AttemptHooks>(
        &self,
        app: &App,
        push: &DevicePush<'_>,
        hooks: &H,
        metrics: &Metrics,
    ) -> DeliveryOutcome {
        let token = push.token;
        let mut env = push.environment.unwrap_or(self.default_environment);
        let mut out = DeliveryOutcome {
            action: FinalAction::Expired,
            environment: env,
            fallback_used: false,
            attempts: 0,
            last: None,
            last_error: None,
            apns_id: push.apns_id,
        };
        let mut delays = self.retry.delays();
        let mut refreshed_provider_token = false;
        // The attempt that went to the other environment, to count its result once.
        let mut fallback_attempt: Option<u32> = None;
        let suffix = crate::event::token_suffix(token);
        loop {
            let now = Instant::now();
            if now >= push.deadline {
                out.action = FinalAction::Expired;
                return out;
            }
            let permit = match hooks.before().await {
                Ok(Some(p)) => Some(p),
                Ok(None) => {
                    info!(token = %suffix, "call cancelled; no further attempt");
                    out.action = FinalAction::Cancelled;
                    return out;
                }
                Err(e) => {
                    // Cannot tell whether the call is still live: wait and look again.
                    out.last_error = Some(e);
                    None
                }
            };
            let retry_reason: &'static str = match permit {
                None => "store",
                Some(permit) => {
                    let provider_token = app.tokens.current();
                    let request = PushRequest {
                        push_type: push.push_type,
                        token: token.to_string(),
                        // An alert goes to the app itself, a VoIP push to `.voip`.
                        topic: match push.push_type {
                            PushType::Voip => app.topic.clone(),
                            PushType::Alert => app.config.bundle_id.clone(),
                        },
                        provider_token: provider_token.clone(),
                        apns_id: push.apns_id,
                        expiration: push.expiration_unix,
                        priority: 10,
                        collapse_id: push.collapse_id.to_string(),
                        payload: push.payload.clone(),
                    };
                    out.attempts += 1;
                    out.environment = env;
                    let started = Instant::now();
                    let at_ms = crate::event::now_ms();
                    // A proven token rides the trusted connections; unproven tokens and
                    // fallbacks cannot stall it there.
                    let lane = if push.proven && !out.fallback_used {
                        Lane::Trusted
                    } else {
                        Lane::Probation
                    };
                    let sent = app
                        .client
                        .send_on(env, lane, &request, push.deadline - now)
                        .await;
                    let record = AttemptRecord {
                        environment: env,
                        apns_status: sent.as_ref().ok().map(|r| r.status),
                        reason: match &sent {
                            Ok(r) => r.reason.clone(),
                            Err(e) => Some(e.attempt_reason().to_string()),
                        },
                        apns_id: Some(push.apns_id.to_string()),
                        latency_ms: started.elapsed().as_millis() as u64,
                        at_ms,
                    };
                    hooks.after(permit, record).await;
                    match sent {
                        Ok(resp) => {
                            let action = classify(resp.status, resp.reason.as_deref());
                            let reason_label = outcome::reason_label(resp.reason.as_deref());
                            out.last = Some(resp);
                            out.last_error = None;
                            if fallback_attempt == Some(out.attempts) {
                                let result = match action {
                                    Action::Delivered => "delivered",
                                    Action::TryOtherEnvironment => "rejected",
                                    _ => "other",
                                };
                                metrics
                                    .environment_fallbacks
                                    .with_label_values(&[
                                        env.other().as_str(),
                                        env.as_str(),
                                        result,
                                    ])
                                    .inc();
                            }
                            match action {
                                Action::Delivered => {
                                    out.action = FinalAction::Delivered;
                                    return out;
                                }
                                Action::TryOtherEnvironment if !out.fallback_used => {
                                    info!(token = %suffix, from = env.as_str(), to = env.other().as_str(),
                                        "BadDeviceToken: trying the other APNs environment");
                                    out.fallback_used = true;
                                    fallback_attempt = Some(out.attempts + 1);
                                    env = env.other();
                                    continue;
                                }
                                Action::TryOtherEnvironment | Action::InvalidateToken => {
                                    out.action = FinalAction::Invalidate;
                                    return out;
                                }
                                Action::Unregistered => {
                                    out.action = FinalAction::Unregistered;
                                    return out;
                                }
                                Action::RefreshProviderToken if !refreshed_provider_token => {
                                    refreshed_provider_token = true;
                                    app.tokens.refresh_if_current(&provider_token);
                                    // The new token goes out on a fresh connection: APNs
                                    // limits how often a connection's token may change.
                                    app.client.reset(env).await;
                                    metrics
                                        .retries
                                        .with_label_values(&["ExpiredProviderToken"])
                                        .inc();
                                    continue;
                                }
                                Action::Reconnect => {
                                    app.client.reset(env).await;
                                    reason_label
                                }
                                Action::Retry => reason_label,
                                Action::RefreshProviderToken
                                | Action::Fatal
                                | Action::Misconfigured => {
                                    warn!(token = %suffix, environment = env.as_str(),
                                        status = out.last.as_ref().map(|r| r.status), reason = reason_label,
                                        "APNs refused the push for a reason retrying cannot fix; check the configuration");
                                    out.action = FinalAction::Failed;
                                    return out;
                                }
                            }
                        }
                        Err(e) if !e.is_retryable() => {
                            warn!(token = %suffix, error = %e, "push cannot be sent; not retried");
                            out.last_error = Some(e.to_string());
                            out.action = FinalAction::Failed;
                            return out;
                        }
                        Err(e) => {
                            out.last_error = Some(e.to_string());
                            e.label()
                        }
                    }
                }
            };
            let delay = delays.next_delay();
            if Instant::now() + delay >= push.deadline {
                out.action = FinalAction::Expired;
                return out;
            }
            metrics.retries.with_label_values(&[retry_reason]).inc();
            tokio::time::sleep(delay).await;
        }
    }
}

/// One device's push: what every attempt sends.
pub struct DevicePush<'a> {
    pub push_type: PushType,
    pub token: &'a str,
    /// Where to try first; `None` = the configured default.
    pub environment: Option<Environment>,
    pub apns_id: uuid::Uuid,
    pub collapse_id: &'a str,
    pub payload: bytes::Bytes,
    /// No attempt starts after this.
    pub deadline: Instant,
    /// `apns-expiration`: UNIX seconds.
    pub expiration_unix: u64,
    /// APNs accepted this token before (see [`Lane`]).
    pub proven: bool,
}

/// Called around every attempt of one delivery: the place where a cancelled call
/// stops its retries, and where attempts are recorded.
pub trait AttemptHooks: Sync {
    /// Held from the check to the record of one attempt.
    type Permit: Send;
    /// `Ok(None)`: stop, the call was cancelled. `Err`: could not tell; the
    /// attempt waits and asks again.
    fn before(
        &self,
    ) -> impl std::future::Future<Output = Result<Option<Self::Permit>, String>> + Send;
    fn after(
        &self,
        permit: Self::Permit,
        attempt: AttemptRecord,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// Hooks that allow every attempt and record nothing.
pub struct NoHooks;

impl AttemptHooks for NoHooks {
    type Permit = ();
    async fn before(&self) -> Result<Option<()>, String> {
        Ok(Some(()))
    }
    async fn after(&self, _: (), _: AttemptRecord) {}
}
