//! The misconfiguration guard: a wrong bundle id or a key of another team makes
//! APNs refuse *every* token (`DeviceTokenNotForTopic`, `BadDeviceToken` in both
//! environments, …), so a token-level refusal proves nothing about the token
//! until the app's configuration has been proven by a success for another device
//! in the same environment, in this process (README, "The misconfiguration
//! guard"). Until then the refusal is held as *suspect*: nothing is written, and
//! it is applied (the token invalidated) once every environment that refused it
//! is proven. Many distinct devices refused with no success in between hold the
//! app as misconfigured until its next success; what was held until then is
//! forgotten, never applied.
//!
//! A pure state machine, one per configured app; the pipeline applies what it
//! returns and exports its state as metrics.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use prometheus::IntGauge;

use crate::event::Environment;

/// A process remembers at most this many held refusals per app (about 100 bytes
/// each: ~1 MB). One more is still held — nothing written — but only applied at
/// its device's next refusal after the app is proven.
pub const MAX_SUSPECTS: usize = 10_000;

fn index(env: Environment) -> usize {
    match env {
        Environment::Production => 0,
        Environment::Sandbox => 1,
    }
}

/// A token-level refusal held until the app has proven its configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suspect {
    pub device_id: i64,
    /// Apple's reason for the last refusal.
    pub reason: String,
    /// When it was refused (UNIX ms): a token registered again since is kept.
    pub at_ms: i64,
    /// The environments that refused it (both after a fallback), by [`index`].
    refused_in: [bool; 2],
}

/// What to do with a token-level refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every environment that refused the token has proven the configuration:
    /// the refusal is about the token; apply it.
    Apply,
    /// Held as suspect; nothing is written. `misconfigured`: the app is over the
    /// threshold of distinct devices refused with no success.
    Hold { misconfigured: bool },
}

/// What a success changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Proof {
    /// Held refusals whose environments are all proven now: apply them.
    pub apply: Vec<Suspect>,
    /// The app was held as misconfigured until this success.
    pub recovered: bool,
}

#[derive(Default)]
struct State {
    /// A success in this environment, by this process, and since then fewer
    /// than the threshold of refusals applied in a row.
    proven: [bool; 2],
    /// Refusals applied in each environment since its last success: a burst of
    /// them with no success between (APNs answering every token wrongly) takes
    /// the proof back, so at most `threshold - 1` can be applied that way.
    applied_in_a_row: [usize; 2],
    suspects: HashMap<i64, Suspect>,
    /// Distinct devices refused (held, or their app's key or topic refused)
    /// since the app's last success, up to the threshold.
    refused_since_success: HashSet<i64>,
}

/// One app's guard.
pub struct AppGuard {
    /// Distinct devices refused with no success that mark the app misconfigured.
    threshold: usize,
    state: Mutex<State>,
    /// `voip_push_apns_app_misconfigured{app}`, set under the state's lock so
    /// concurrent pushes cannot leave it stale.
    gauge: Option<IntGauge>,
}

impl AppGuard {
    pub fn new(misconfigured_after_devices: usize) -> Self {
        Self {
            threshold: misconfigured_after_devices.max(1),
            state: Mutex::new(State::default()),
            gauge: None,
        }
    }

    /// Exports whether the app is held as misconfigured in `gauge`.
    pub fn exported_in(mut self, gauge: IntGauge) -> Self {
        gauge.set(0);
        self.gauge = Some(gauge);
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent at every statement; a panic elsewhere
        // while it was held does not make it wrong.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// APNs refused `device_id`'s token in `refused_in` (both environments after
    /// a fallback) with `reason`.
    pub fn token_refused(
        &self,
        device_id: i64,
        refused_in: &[Environment],
        reason: &str,
        at_ms: i64,
    ) -> Verdict {
        let mut s = self.state();
        let mut envs = [false; 2];
        for e in refused_in {
            envs[index(*e)] = true;
        }
        let proven = (0..2).all(|i| !envs[i] || s.proven[i]);
        let burst = (0..2).any(|i| envs[i] && s.applied_in_a_row[i] + 1 >= self.threshold);
        if proven && !burst {
            for i in (0..2).filter(|i| envs[*i]) {
                s.applied_in_a_row[i] += 1;
            }
            s.suspects.remove(&device_id);
            return Verdict::Apply;
        }
        if proven {
            // As many refusals in a row as mark an unproven app misconfigured:
            // whatever proved the environment no longer holds.
            for i in (0..2).filter(|i| envs[*i]) {
                s.proven[i] = false;
                s.applied_in_a_row[i] = 0;
            }
        }
        let misconfigured = self.count_refused(&mut s, device_id);
        if misconfigured {
            return Verdict::Hold { misconfigured };
        }
        if s.suspects.len() < MAX_SUSPECTS || s.suspects.contains_key(&device_id) {
            let held = s.suspects.entry(device_id).or_insert_with(|| Suspect {
                device_id,
                reason: String::new(),
                at_ms,
                refused_in: [false; 2],
            });
            held.reason = reason.to_string();
            held.at_ms = at_ms;
            for (held_in, refused_here) in held.refused_in.iter_mut().zip(envs) {
                *held_in |= refused_here;
            }
        }
        Verdict::Hold {
            misconfigured: false,
        }
    }

    /// APNs refused the app's key or topic (`TopicDisallowed`, …) for a push to
    /// `device_id`: no token is at fault, but the device counts towards the app
    /// being misconfigured. Returns whether it is.
    pub fn app_refused(&self, device_id: i64) -> bool {
        let mut s = self.state();
        self.count_refused(&mut s, device_id)
    }

    fn count_refused(&self, s: &mut State, device_id: i64) -> bool {
        if s.refused_since_success.len() < self.threshold {
            s.refused_since_success.insert(device_id);
        }
        let misconfigured = s.refused_since_success.len() >= self.threshold;
        if misconfigured {
            // The refusals held so far are the misconfiguration's, not their
            // tokens': forget them. Applying them at the success that ends it
            // (say, the app's push capability turned on at Apple) would wipe
            // the tokens after all; a dead one is refused again, under proof.
            s.suspects.clear();
        }
        if let Some(g) = &self.gauge {
            g.set(i64::from(misconfigured));
        }
        misconfigured
    }

    /// APNs accepted a push to `device_id` in `env`: the configuration is proven
    /// there. Returns the held refusals that may be applied now.
    pub fn succeeded(&self, device_id: i64, env: Environment) -> Proof {
        let mut s = self.state();
        let recovered = s.refused_since_success.len() >= self.threshold;
        s.refused_since_success.clear();
        if let Some(g) = &self.gauge {
            g.set(0);
        }
        s.proven[index(env)] = true;
        s.applied_in_a_row[index(env)] = 0;
        // The token works: whatever was held against it was wrong.
        s.suspects.remove(&device_id);
        let proven = s.proven;
        let ready: Vec<i64> = s
            .suspects
            .values()
            .filter(|h| (0..2).all(|i| !h.refused_in[i] || proven[i]))
            .map(|h| h.device_id)
            .collect();
        let apply = ready
            .into_iter()
            .filter_map(|id| s.suspects.remove(&id))
            .collect();
        Proof { apply, recovered }
    }

    /// A push of this process's was accepted in `env` (and no burst of refusals
    /// has taken that back).
    pub fn is_proven(&self, env: Environment) -> bool {
        self.state().proven[index(env)]
    }

    /// Over the threshold of distinct devices refused since the last success.
    pub fn is_misconfigured(&self) -> bool {
        self.state().refused_since_success.len() >= self.threshold
    }

    /// Refusals held now.
    pub fn suspects(&self) -> usize {
        self.state().suspects.len()
    }
}

#[cfg(test)]
#[path = "guard/tests.rs"]
mod tests;
