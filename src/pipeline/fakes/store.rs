//! An in-memory [`DeliveryStore`] with the semantics of the SQL in `store/`:
//! a ring opens its call, finds the callee's live devices and claims each once
//! per (event key, device); a claim not published is taken again only by its
//! own owner or over a dead worker (else `Busy`); one with a result and no
//! `published_at` is re-published, a published one is `Done`; a cancelled call
//! claims nothing. What it does not model: a cancel's wait for the rings in
//! flight (a test that wants a cancel mid-ring records it between attempts,
//! see [`FakeStore::cancel`]) and the batching.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;

use crate::event::Environment;
use crate::pipeline::edges::{Answer, DeliveryStore};
use crate::store::admit::{Admitted, Ring};
use crate::store::calls::{AttemptRecord, CallState, Cancelled, RungDevice};
use crate::store::claims::{Claim, Finished};
use crate::store::{Device, StoreError};

/// A row of `devices`.
#[derive(Clone, Debug, Default)]
pub struct FakeDevice {
    pub user_id: String,
    pub bundle_id: String,
    pub token: String,
    pub alert_token: Option<String>,
    pub environment: Option<Environment>,
    /// Last registration, ms since epoch.
    pub updated_at_ms: i64,
    /// `last_success_at IS NOT NULL`.
    pub proven: bool,
    /// As the store reports it (`Device::success_is_recent`).
    pub success_is_recent: bool,
    /// Successes recorded (`last_success_at` written).
    pub successes: u32,
    /// `invalid_reason` once invalidated.
    pub invalidated: Option<String>,
}

/// A row of `calls`.
#[derive(Clone, Debug)]
pub struct FakeCall {
    pub to_user_id: String,
    pub state: CallState,
    pub ring_deadline_ms: Option<i64>,
    pub cancel_reason: Option<String>,
}

/// A row of `delivery_claims`.
#[derive(Clone, Debug, Default)]
pub struct FakeClaim {
    pub owner: String,
    pub call_id: String,
    pub event_type: String,
    pub result: Option<Value>,
    pub attempts: Vec<AttemptRecord>,
    pub published: bool,
}

#[derive(Default)]
pub struct State {
    pub devices: BTreeMap<i64, FakeDevice>,
    pub calls: HashMap<String, FakeCall>,
    /// By (event key, device id).
    pub claims: BTreeMap<(String, i64), FakeClaim>,
    /// Worker ids whose liveness lock is free: their process died.
    pub dead_workers: HashSet<String>,
    /// Methods that fail as if the database were down.
    pub failing: HashSet<&'static str>,
    /// Every `finish_event` that succeeded, in order.
    pub finished: Vec<Finished>,
    /// How often each method was called.
    pub called: HashMap<&'static str, usize>,
}

#[derive(Default)]
pub struct FakeStore {
    state: Mutex<State>,
}

/// The worker of a claim's owner (`worker/sequence`), as `split_part` reads it.
fn worker_of(owner: &str) -> &str {
    owner.split('/').next().unwrap_or_default()
}

/// The claim's owner is dead, as `claims::owner_gone!` asks Postgres.
fn owner_gone(dead_workers: &HashSet<String>, c: &FakeClaim) -> bool {
    dead_workers.contains(worker_of(&c.owner))
}

impl State {
    /// The claim statement: insert, or take over when the owner is this one
    /// or dead and the result is not published.
    fn take(&mut self, key: &str, device_id: i64, owner: &str, call_id: &str, kind: &str) -> Claim {
        let Some(c) = self.claims.get_mut(&(key.to_string(), device_id)) else {
            self.claims.insert(
                (key.to_string(), device_id),
                FakeClaim {
                    owner: owner.to_string(),
                    call_id: call_id.to_string(),
                    event_type: kind.to_string(),
                    ..FakeClaim::default()
                },
            );
            return Claim::Push;
        };
        let free = c.owner == owner || owner_gone(&self.dead_workers, c);
        if c.published || !free {
            return untaken(Some(c));
        }
        c.owner = owner.to_string();
        match &c.result {
            None => Claim::Push,
            Some(r) => Claim::Republish(r.clone()),
        }
    }

    /// What a cancelled call's ring, which claims nothing, finds.
    fn unclaimed(&self, key: &str, device_id: i64) -> Claim {
        match self.claims.get(&(key.to_string(), device_id)) {
            Some(c) if c.published => Claim::Done,
            Some(c) if !owner_gone(&self.dead_workers, c) => Claim::Busy,
            _ => Claim::Unclaimed,
        }
    }

    fn live_devices(&self, user_id: &str, bundle_id: &str) -> Vec<Device> {
        let live = |d: &&FakeDevice| {
            d.user_id == user_id && d.bundle_id == bundle_id && d.invalidated.is_none()
        };
        (self.devices.iter())
            .filter(|(_, d)| live(d))
            .map(|(id, d)| Device {
                id: *id,
                token: d.token.clone(),
                environment: d.environment,
                updated_at_ms: d.updated_at_ms,
                proven: d.proven,
                success_is_recent: d.success_is_recent,
            })
            .collect()
    }
}

/// What a claim not taken found.
fn untaken(c: Option<&FakeClaim>) -> Claim {
    match c {
        Some(c) if c.published => Claim::Done,
        _ => Claim::Busy,
    }
}

impl FakeStore {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a live device of `user_id` for `bundle_id`; returns its id.
    pub fn add_device(&self, user_id: &str, bundle_id: &str, token: &str) -> i64 {
        let mut s = self.state();
        let id = s.devices.keys().next_back().map_or(1, |last| last + 1);
        let device = FakeDevice {
            user_id: user_id.into(),
            bundle_id: bundle_id.into(),
            token: token.into(),
            updated_at_ms: crate::event::now_ms(),
            ..FakeDevice::default()
        };
        s.devices.insert(id, device);
        id
    }

    /// Changes device `id` as `change` says.
    pub fn edit_device(&self, id: i64, change: impl FnOnce(&mut FakeDevice)) {
        change(self.state().devices.get_mut(&id).expect("the device"));
    }

    pub fn device(&self, id: i64) -> FakeDevice {
        self.state().devices[&id].clone()
    }

    /// Marks the call cancelled, as a cancel's first statement does.
    pub fn cancel(&self, call_id: &str) {
        if let Some(c) = self.state().calls.get_mut(call_id) {
            c.state = CallState::Cancelled;
        }
    }

    /// How often `method` was called.
    pub fn called(&self, method: &str) -> usize {
        self.state().called.get(method).copied().unwrap_or(0)
    }

    /// The state, after counting the call to `method` and failing it when
    /// the test says the database is down for it.
    fn enter(&self, method: &'static str) -> Result<MutexGuard<'_, State>, StoreError> {
        let mut s = self.state();
        *s.called.entry(method).or_default() += 1;
        if s.failing.contains(method) {
            return Err(StoreError::Batch(format!("fake store: {method} is down")));
        }
        Ok(s)
    }
}

impl DeliveryStore for FakeStore {
    fn admit_ring(&self, ring: Ring) -> Answer<'_, Admitted> {
        let admitted = self.enter("admit_ring").map(|mut s| {
            let call = s.calls.entry(ring.call_id.clone()).or_insert(FakeCall {
                to_user_id: ring.user_id.clone(),
                state: CallState::Ringing,
                ring_deadline_ms: None,
                cancel_reason: None,
            });
            call.ring_deadline_ms.get_or_insert(ring.ring_deadline_ms);
            // A call id taken by another user's call does not cancel this one.
            let state = match call.to_user_id == ring.user_id {
                true => call.state,
                false => CallState::Ringing,
            };
            let devices = (ring.devices.clone())
                .unwrap_or_else(|| s.live_devices(&ring.user_id, &ring.bundle_id));
            if devices.is_empty() {
                return Admitted::default();
            }
            let claims = devices.into_iter().map(|d| {
                let claim = if state != CallState::Cancelled {
                    s.take(&ring.key, d.id, &ring.owner, &ring.call_id, "call.incoming")
                } else {
                    s.unclaimed(&ring.key, d.id)
                };
                (d, claim)
            });
            Admitted {
                state: Some(state),
                devices: claims.collect(),
            }
        });
        Box::pin(async move { admitted })
    }

    fn finish_event(&self, finished: Finished) -> Answer<'_, ()> {
        let done = self.enter("finish_event").map(|mut s| {
            let key = &finished.event_key;
            for o in &finished.outcomes {
                if let Some(c) = s.claims.get_mut(&(key.clone(), o.device_id)) {
                    if !c.published {
                        c.result = Some(serde_json::from_slice(&o.result.0).expect("JSON result"));
                        c.attempts = o.attempts.clone();
                        c.published = true;
                    }
                }
                if let (Some(env), Some(d)) = (o.success, s.devices.get_mut(&o.device_id)) {
                    d.environment = Some(env);
                    d.proven = true;
                    d.success_is_recent = true;
                    d.successes += 1;
                }
            }
            for id in &finished.published_only {
                if let Some(c) = s.claims.get_mut(&(key.clone(), *id)) {
                    c.published = true;
                }
            }
            // A call settled by a finish's claims (as the store reads it, see
            // `store::calls::SETTLED_BY_CLAIMS`), or named by the finish.
            let mut settle = finished.settle.clone();
            let call = (s.claims.iter()).find(|((k, _), _)| k == key);
            if let Some(call_id) = call.map(|(_, c)| c.call_id.clone()) {
                settle = settle.or(s.settled_by_claims(&call_id).map(|st| (call_id, st)));
            }
            if let Some((call_id, to)) = &settle {
                if let Some(call) = s.calls.get_mut(call_id) {
                    let ended_badly = matches!(call.state, CallState::Failed | CallState::Expired);
                    if call.state == CallState::Ringing
                        || (*to == CallState::Delivered && ended_badly)
                    {
                        call.state = *to;
                    }
                }
            }
            s.finished.push(finished);
        });
        Box::pin(async move { done })
    }

    fn is_cancelled<'a>(&'a self, call_id: &'a str) -> Answer<'a, bool> {
        let cancelled = self
            .enter("is_cancelled")
            .map(|s| (s.calls.get(call_id)).is_some_and(|c| c.state == CallState::Cancelled));
        Box::pin(async move { cancelled })
    }

    fn invalidate<'a>(
        &'a self,
        device_id: i64,
        reason: &'a str,
        unless_registered_after_ms: Option<i64>,
    ) -> Answer<'a, bool> {
        let done = self.enter("invalidate").map(|mut s| {
            let Some(d) = s.devices.get_mut(&device_id) else {
                return false;
            };
            let stale = unless_registered_after_ms.is_none_or(|at| d.updated_at_ms <= at);
            if d.invalidated.is_some() || !stale {
                return false;
            }
            d.invalidated = Some(reason.to_string());
            true
        });
        Box::pin(async move { done })
    }

    fn clear_alert_token<'a>(&'a self, device_id: i64, alert_token: &'a str) -> Answer<'a, ()> {
        let done = self.enter("clear_alert_token").map(|mut s| {
            if let Some(d) = s.devices.get_mut(&device_id) {
                if d.alert_token.as_deref() == Some(alert_token) {
                    d.alert_token = None;
                }
            }
        });
        Box::pin(async move { done })
    }

    fn cancel_call<'a>(
        &'a self,
        call_id: &'a str,
        _bundle_id: &'a str,
        to_user_id: &'a str,
        reason: Option<&'a str>,
        _answered_device_id: Option<&'a str>,
    ) -> Answer<'a, Cancelled> {
        let done = self.enter("cancel_call").map(|mut s| {
            let call = s.calls.entry(call_id.to_string()).or_insert(FakeCall {
                to_user_id: to_user_id.to_string(),
                state: CallState::Cancelled,
                ring_deadline_ms: None,
                cancel_reason: None,
            });
            if call.to_user_id != to_user_id {
                return Cancelled::OtherUser;
            }
            call.state = CallState::Cancelled;
            if call.cancel_reason.is_none() {
                call.cancel_reason = reason.map(str::to_string);
            }
            Cancelled::Recorded(call.ring_deadline_ms)
        });
        Box::pin(async move { done })
    }

    fn rung_devices<'a>(&'a self, call_id: &'a str) -> Answer<'a, Vec<RungDevice>> {
        let rung = self.enter("rung_devices").map(|s| {
            let mut rung = BTreeMap::new();
            for ((_, id), c) in &s.claims {
                let delivered = |r: &Value| r["status"] == "delivered";
                let Some(result) = c.result.as_ref().filter(|r| delivered(r)) else {
                    continue;
                };
                let (Some(d), true) = (s.devices.get(id), c.call_id == call_id) else {
                    continue;
                };
                if c.event_type == "call.incoming" {
                    let environment = result["environment"].as_str().and_then(Environment::parse);
                    let device = RungDevice {
                        device_id: *id,
                        token: d.token.clone(),
                        environment,
                        alert_token: d.alert_token.clone(),
                    };
                    rung.insert(*id, device);
                }
            }
            rung.into_values().collect()
        });
        Box::pin(async move { rung })
    }

    fn claim<'a>(
        &'a self,
        event_key: &'a str,
        device_id: i64,
        owner: &'a str,
        call_id: &'a str,
        event_type: &'a str,
    ) -> Answer<'a, Claim> {
        let claim = (self.enter("claim"))
            .map(|mut s| s.take(event_key, device_id, owner, call_id, event_type));
        Box::pin(async move { claim })
    }
}
