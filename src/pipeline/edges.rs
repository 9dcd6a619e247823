//! The pipeline's edge to Postgres: every read and write of devices, calls and
//! claims it makes, as one trait. [`Store`] is the real one (each method hands
//! over to its statement in `store/`); the unit tests use an in-memory store
//! with the same semantics (`fakes`). The other two edges are
//! [`ResultPublisher`](super::ResultPublisher) and `apns::ApnsSender`.

use futures_util::future::BoxFuture;

use crate::store::admit::{Admitted, Ring};
use crate::store::calls::{Cancelled, RungDevice};
use crate::store::claims::{Claim, Finished};
use crate::store::{Store, StoreError};

pub(super) type Answer<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// What the pipeline keeps in the store (see each method's counterpart on
/// [`Store`] for its exact semantics).
pub trait DeliveryStore: Send + Sync {
    /// Opens the ring's call, resolves the callee's live devices and claims
    /// each one (`Store::admit_ring`).
    fn admit_ring(&self, ring: Ring) -> Answer<'_, Admitted>;
    /// Records the outcomes of published results, marks their claims
    /// published and settles the call (`Store::finish_event`).
    fn finish_event(&self, finished: Finished) -> Answer<'_, ()>;
    /// Whether the call was cancelled, before a further ring attempt.
    fn is_cancelled<'a>(&'a self, call_id: &'a str) -> Answer<'a, bool>;
    /// Marks a token invalid, unless it was registered after
    /// `unless_registered_after_ms`; whether it was.
    fn invalidate<'a>(
        &'a self,
        device_id: i64,
        reason: &'a str,
        unless_registered_after_ms: Option<i64>,
    ) -> Answer<'a, bool>;
    /// Forgets a refused alert token (the VoIP token stays).
    fn clear_alert_token<'a>(&'a self, device_id: i64, alert_token: &'a str) -> Answer<'a, ()>;
    /// Records a cancel and waits for the call's rings in flight
    /// (`Store::cancel_call`).
    fn cancel_call<'a>(
        &'a self,
        call_id: &'a str,
        bundle_id: &'a str,
        to_user_id: &'a str,
        reason: Option<&'a str>,
        answered_device_id: Option<&'a str>,
    ) -> Answer<'a, Cancelled>;
    /// The devices that accepted a ring of the call.
    fn rung_devices<'a>(&'a self, call_id: &'a str) -> Answer<'a, Vec<RungDevice>>;
    /// Claims (event, device) for `owner`, for a cancel push (`Store::claim`).
    fn claim<'a>(
        &'a self,
        event_key: &'a str,
        device_id: i64,
        owner: &'a str,
        call_id: &'a str,
        event_type: &'a str,
    ) -> Answer<'a, Claim>;
}

impl DeliveryStore for Store {
    fn admit_ring(&self, ring: Ring) -> Answer<'_, Admitted> {
        Box::pin(Store::admit_ring(self, ring))
    }

    fn finish_event(&self, finished: Finished) -> Answer<'_, ()> {
        Box::pin(Store::finish_event(self, finished))
    }

    fn is_cancelled<'a>(&'a self, call_id: &'a str) -> Answer<'a, bool> {
        Box::pin(Store::is_cancelled(self, call_id))
    }

    fn invalidate<'a>(
        &'a self,
        device_id: i64,
        reason: &'a str,
        unless_registered_after_ms: Option<i64>,
    ) -> Answer<'a, bool> {
        Box::pin(Store::invalidate(
            self,
            device_id,
            reason,
            unless_registered_after_ms,
        ))
    }

    fn clear_alert_token<'a>(&'a self, device_id: i64, alert_token: &'a str) -> Answer<'a, ()> {
        Box::pin(Store::clear_alert_token(self, device_id, alert_token))
    }

    fn cancel_call<'a>(
        &'a self,
        call_id: &'a str,
        bundle_id: &'a str,
        to_user_id: &'a str,
        reason: Option<&'a str>,
        answered_device_id: Option<&'a str>,
    ) -> Answer<'a, Cancelled> {
        Box::pin(Store::cancel_call(
            self,
            call_id,
            bundle_id,
            to_user_id,
            reason,
            answered_device_id,
        ))
    }

    fn rung_devices<'a>(&'a self, call_id: &'a str) -> Answer<'a, Vec<RungDevice>> {
        Box::pin(Store::rung_devices(self, call_id))
    }

    fn claim<'a>(
        &'a self,
        event_key: &'a str,
        device_id: i64,
        owner: &'a str,
        call_id: &'a str,
        event_type: &'a str,
    ) -> Answer<'a, Claim> {
        Box::pin(Store::claim(
            self, event_key, device_id, owner, call_id, event_type,
        ))
    }
}
