//! How the fake store settles a call: as the real one reads it, from the
//! claims of its rings (`store::calls::SETTLED_BY_CLAIMS`).

use super::store::{FakeClaim, State};
use crate::store::calls::CallState;

impl State {
    /// What the claims of a call's rings say of it: a delivery, or once every
    /// claim is published, the verdict of their results.
    pub(super) fn settled_by_claims(&self, call_id: &str) -> Option<CallState> {
        let rings: Vec<&FakeClaim> = (self.claims.values())
            .filter(|c| c.call_id == call_id && c.event_type == "call.incoming")
            .collect();
        let status = |c: &FakeClaim| {
            let r = c.result.as_ref()?;
            r.get("status")?.as_str().map(str::to_string)
        };
        let all = |st: &str| rings.iter().all(|c| status(c).as_deref() == Some(st));
        if rings
            .iter()
            .any(|c| status(c).as_deref() == Some("delivered"))
        {
            Some(CallState::Delivered)
        } else if rings.is_empty() || rings.iter().any(|c| !c.published) {
            None
        } else if all("cancelled") {
            Some(CallState::Cancelled)
        } else if all("expired") {
            Some(CallState::Expired)
        } else {
            Some(CallState::Failed)
        }
    }
}
