//! What identifies an event and its results: the event id (from the producer's
//! `message_id`, or derived), the result every device's starts from, and the
//! call's state from its results.

use super::{Incoming, APNS_ID_NAMESPACE};
use crate::apns::App;
use crate::event::{check_text, CallEvent, PushResult, Status};
use crate::store::calls::CallState;

/// A call's state from its deliveries' statuses.
pub(super) fn call_state(statuses: &[Status]) -> CallState {
    let all = |s: Status| !statuses.is_empty() && statuses.iter().all(|r| *r == s);
    if statuses.contains(&Status::Delivered) {
        CallState::Delivered
    } else if all(Status::Cancelled) {
        CallState::Cancelled
    } else if all(Status::Expired) {
        CallState::Expired
    } else {
        CallState::Failed
    }
}

pub(super) fn base_result(event_id: &str, event: &CallEvent, app: &App) -> PushResult {
    PushResult {
        event_id: event_id.to_string(),
        event_type: event.event_type.as_str().into(),
        call_id: Some(event.call_id.clone()),
        to_user_id: Some(event.to_user_id.clone()),
        device_id: None,
        token_suffix: None,
        bundle_id: Some(app.config.bundle_id.clone()),
        status: Status::NoDevice,
        environment: None,
        fallback_used: false,
        apns_id: None,
        apns_status: None,
        reason: None,
        attempts: 0,
        latency_ms: None,
        completed_at: String::new(),
    }
}

/// The event's id: the producer's `message_id`, or one derived from the call id
/// and type so a redelivery gets the same id.
pub(super) fn event_id(msg: &Incoming, event: &CallEvent) -> String {
    msg.event_id_or(&event.call_id, event.event_type.as_str())
}

/// The key of an event's delivery claims: its id with its call and type, so a
/// producer that reuses message ids across calls never finds another call's
/// claims (and silences its ring).
pub(super) fn claim_key(event_id: &str, event: &CallEvent) -> String {
    format!("{event_id}/{}/{}", event.event_type.as_str(), event.call_id)
}

/// The longest `message_id` taken as an event id (AMQP allows 255 bytes).
const MAX_MESSAGE_ID_BYTES: usize = 128;

impl Incoming {
    /// The producer's `message_id` when it can serve as an id everywhere (a
    /// Postgres `text`, a log field); else an id derived from the call id, the
    /// type and whatever `message_id` said, the same on every redelivery.
    pub(crate) fn event_id_or(&self, call_id: &str, kind: &str) -> String {
        match self.message_id.as_deref() {
            None | Some("") => stable_event_id(call_id, kind),
            Some(id) if check_text("message_id", id, MAX_MESSAGE_ID_BYTES).is_ok() => {
                id.to_string()
            }
            Some(unusable) => stable_event_id(call_id, &format!("{kind}/{unusable:?}")),
        }
    }
}

fn stable_event_id(call_id: &str, kind: &str) -> String {
    uuid::Uuid::new_v5(&APNS_ID_NAMESPACE, format!("{call_id}/{kind}").as_bytes()).to_string()
}
