//! The misconfiguration guard (`apns::guard`) at the end of a delivery: a
//! token-level refusal is applied only once the app has proven its
//! configuration; a success applies the refusals held until then.

use tracing::{info, warn};

use super::Pipeline;
use crate::apns::guard::{Proof, Verdict};
use crate::apns::outcome::reason_label;
use crate::apns::{App, DeliveryOutcome};
use crate::event::{now_ms, token_suffix, Environment, Status};
use crate::store::{Device, StoreError};

/// The environments that refused a token: both after a fallback, else the one
/// that answered.
pub(super) fn refused_in(out: &DeliveryOutcome) -> &[Environment] {
    if out.fallback_used {
        &[Environment::Production, Environment::Sandbox]
    } else {
        std::slice::from_ref(&out.environment)
    }
}

impl Pipeline {
    /// APNs refused the token itself (both environments, or not for the topic).
    pub(super) async fn token_refused(
        &self,
        app: &App,
        device: &Device,
        out: &DeliveryOutcome,
        reason: &str,
    ) -> Result<Status, StoreError> {
        match app
            .guard
            .token_refused(device.id, refused_in(out), reason, now_ms())
        {
            Verdict::Apply => {
                self.store.invalidate(device.id, reason, None).await?;
                self.metrics.token_invalidated(reason);
                Ok(Status::TokenInvalidated)
            }
            Verdict::Hold { misconfigured } => {
                self.metrics
                    .apns_suspect_refusals
                    .with_label_values(&[&app.config.bundle_id, reason_label(Some(reason))])
                    .inc();
                let token = token_suffix(&device.token);
                if misconfigured {
                    warn!(device_id = device.id, %token, reason, bundle_id = %app.config.bundle_id,
                        "APNs refuses every device of this app and accepted none: its bundle id or \
                         key is wrong (voip-push-worker doctor); the token is kept");
                    Ok(Status::AppMisconfigured)
                } else {
                    info!(device_id = device.id, %token, reason,
                        "token refused before the app proved its configuration here; held as \
                         suspect, not invalidated");
                    Ok(Status::Failed)
                }
            }
        }
    }

    /// APNs refused the app's key or topic: no token is at fault.
    pub(super) fn app_refused(&self, app: &App, device: &Device) -> Status {
        if app.guard.app_refused(device.id) {
            Status::AppMisconfigured
        } else {
            Status::Failed
        }
    }

    /// APNs accepted `device` in `env`: the app is proven there. The refusals
    /// held until now are applied in the background (the ring's result does not
    /// wait for them); one that fails stays unapplied until its device's next
    /// refusal.
    pub(super) fn proven(&self, app: &App, device: &Device, env: Environment) {
        let Proof { apply, recovered } = app.guard.succeeded(device.id, env);
        if recovered {
            info!(bundle_id = %app.config.bundle_id, environment = env.as_str(),
                "APNs accepted a push again: the app is no longer held as misconfigured");
        }
        if apply.is_empty() {
            return;
        }
        info!(bundle_id = %app.config.bundle_id, held = apply.len(),
            "the app proved its configuration: applying the token refusals held as suspect");
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            for held in apply {
                match store
                    .invalidate(held.device_id, &held.reason, Some(held.at_ms))
                    .await
                {
                    Ok(true) => metrics.token_invalidated(&held.reason),
                    // Registered again since it was refused: a new token.
                    Ok(false) => {}
                    Err(e) => {
                        warn!(device_id = held.device_id, error = %e,
                            "could not apply a held token refusal; it is applied at its next refusal")
                    }
                }
            }
        });
    }
}
