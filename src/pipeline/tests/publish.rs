//! Results out: one per device with what happened to it, confirmed before the
//! outcome is recorded and the message acknowledged.

use super::{ring, token, Rig, BUNDLE, USER};
use crate::event::Environment::{Production, Sandbox};
use crate::event::Status;
use crate::pipeline::fakes::Answer;
use crate::pipeline::Disposition;
use crate::store::calls::CallState;

#[tokio::test]
async fn each_device_gets_one_result_saying_what_happened_to_it() {
    let rig = Rig::new();
    let (plain, moved) = (rig.device(&token(0xa1)), rig.device(&token(0xb2)));
    let bad = Answer::refused(400, "BadDeviceToken");
    rig.apns.answer(&token(0xb2), Production, &[bad]);

    rig.ring("c1").await;

    assert_eq!(rig.results.published().len(), 2);
    for (device, env, fallback, attempts) in
        [(plain, Production, false, 1), (moved, Sandbox, true, 2)]
    {
        let r = rig.result_for(device);
        assert_eq!(r.status, Status::Delivered);
        assert_eq!(r.environment, Some(env));
        assert_eq!(r.fallback_used, fallback);
        assert_eq!(r.attempts, attempts);
        assert_eq!(r.apns_status, Some(200));
        assert_eq!(r.event_type, "call.incoming");
        assert_eq!(r.call_id.as_deref(), Some("c1"));
        assert_eq!(r.to_user_id.as_deref(), Some(USER));
        assert_eq!(r.bundle_id.as_deref(), Some(BUNDLE));
        let suffix = rig.store.device(device).token[56..].to_string();
        assert_eq!(r.token_suffix, Some(suffix));
        assert!(!r.completed_at.is_empty());
    }
    // The claims keep what was published, byte for byte.
    let state = rig.store.state();
    for c in state.claims.values() {
        assert!(c.published);
        let published = rig.results.published().into_iter();
        let stored: crate::event::PushResult =
            serde_json::from_value(c.result.clone().expect("a result")).unwrap();
        assert!(published.into_iter().any(|p| p == stored));
    }
    assert_eq!(state.calls["c1"].state, CallState::Delivered);
}

#[tokio::test]
async fn a_result_the_broker_never_confirms_has_the_event_retried_and_nothing_recorded() {
    let rig = Rig::new();
    let d = rig.device(&token(1));
    rig.results.fail_next(usize::MAX);

    let disposition = rig.handle(ring("c1")).await;

    assert!(
        matches!(disposition, Disposition::Retry(_)),
        "{disposition:?}"
    );
    let state = rig.store.state();
    assert!(state.finished.is_empty(), "no outcome recorded");
    let claim = state.claims.values().next().expect("the claim");
    assert!(claim.result.is_none() && !claim.published);
    assert_eq!(state.calls["c1"].state, CallState::Ringing);
    assert!(rig.results_for(d).is_empty());
}

#[tokio::test]
async fn a_broker_that_confirms_after_a_few_tries_gets_each_result_once() {
    let rig = Rig::new();
    let d = rig.device(&token(1));
    rig.results.fail_next(2);

    rig.ring("c1").await;

    assert_eq!(rig.result_for(d).status, Status::Delivered);
    assert_eq!(rig.apns.sent().len(), 1, "pushed once");
    assert_eq!(rig.store.state().finished.len(), 1);
}

#[tokio::test]
async fn a_no_device_result_the_broker_refuses_has_the_event_retried() {
    let rig = Rig::new();
    rig.results.fail_next(usize::MAX);

    let disposition = rig.handle(ring("c1")).await;

    assert!(
        matches!(disposition, Disposition::Retry(_)),
        "{disposition:?}"
    );
    assert!(rig.store.state().finished.is_empty());
}

#[tokio::test]
async fn a_malformed_event_is_dead_lettered_with_an_invalid_event_result() {
    let rig = Rig::new();

    let disposition = rig
        .handle(serde_json::json!({"callId": "c1", "toUserId": USER, "type": "call.later"}))
        .await;

    assert!(
        matches!(disposition, Disposition::DeadLetter { .. }),
        "{disposition:?}"
    );
    let published = rig.results.published();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].status, Status::InvalidEvent);
    assert!(rig.apns.sent().is_empty());
}
