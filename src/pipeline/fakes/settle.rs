//! How the fake store settles a call: as the real one reads it, from the
//! claims of its rings (`store::calls::SETTLED_BY_CLAIMS`).

use super::store::{FakeClaim, State};
use crate::event::Status;
use crate::pipeline::ids::call_state;
use crate::store::calls::CallState;

impl State {
    /// What the claims of a call's rings say of it: a delivery, or once every
    /// claim is published, the verdict of their results (the pipeline's rule,
    /// `ids::call_state`).
    pub(super) fn settled_by_claims(&self, call_id: &str) -> Option<CallState> {
        let rings: Vec<&FakeClaim> = (self.claims.values())
            .filter(|c| c.call_id == call_id && c.event_type == "call.incoming")
            .collect();
        let statuses: Vec<Status> = (rings.iter())
            .filter_map(|c| serde_json::from_value(c.result.as_ref()?.get("status")?.clone()).ok())
            .collect();
        let settled = !rings.is_empty() && rings.iter().all(|c| c.published);
        (settled || statuses.contains(&Status::Delivered)).then(|| call_state(&statuses))
    }
}
