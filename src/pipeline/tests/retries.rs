//! Retries within the ring: what is tried again, what is not, and what stops
//! them (the ring deadline, a cancel).

use std::time::{Duration, Instant};

use super::{ring_ending_in, Rig};
use crate::event::Status;
use crate::pipeline::fakes::Answer;
use crate::store::calls::CallState;

const UNAVAILABLE: Answer = Answer::Http(503, Some("ServiceUnavailable"), None);

#[tokio::test]
async fn throttling_and_outages_are_retried_until_apns_accepts() {
    let throttled = Answer::refused(429, "TooManyRequests");
    let (rig, d) = Rig::answering(&[throttled, UNAVAILABLE, Answer::Silence, Answer::OK]);

    rig.ring("c1").await;

    let r = rig.result_for(d);
    assert_eq!((r.status, r.attempts), (Status::Delivered, 4));
    let sent = rig.apns.sent();
    let one_id = sent.iter().all(|s| s.apns_id == sent[0].apns_id);
    assert!(one_id, "every attempt carries the same apns-id");
    let state = rig.store.state();
    let attempts = &state.finished[0].outcomes[0].attempts;
    let reasons: Vec<_> = attempts.iter().map(|a| a.reason.as_deref()).collect();
    let expected = ["TooManyRequests", "ServiceUnavailable", "unanswered"];
    assert_eq!(reasons[..3], expected.map(Some));
    assert_eq!(reasons[3], None);
}

#[tokio::test]
async fn retries_stop_at_the_ring_deadline_with_expired() {
    let (rig, d) = Rig::answering(&[UNAVAILABLE]);
    let started = Instant::now();

    rig.acked(ring_ending_in("c1", 300)).await;

    assert!(
        started.elapsed() < Duration::from_secs(1),
        "ends at the deadline"
    );
    let r = rig.result_for(d);
    assert_eq!(r.status, Status::Expired);
    assert!(r.attempts > 1, "retried meanwhile: {}", r.attempts);
    assert_eq!(rig.apns.sent().len(), r.attempts as usize);
    assert_eq!(rig.store.state().calls["c1"].state, CallState::Expired);
}

#[tokio::test]
async fn a_cancel_recorded_between_attempts_stops_the_ring() {
    let (rig, d) = Rig::answering(&[UNAVAILABLE]);
    let store = rig.store.clone();
    rig.apns.on_send(move |_| store.cancel("c1"));

    rig.ring("c1").await;

    assert_eq!(rig.apns.sent().len(), 1, "no attempt after the cancel");
    let r = rig.result_for(d);
    assert_eq!(r.status, Status::Cancelled);
    assert_eq!(r.reason.as_deref(), Some("call cancelled"));
}

#[tokio::test]
async fn a_ring_looks_at_its_call_before_every_attempt_but_the_first() {
    let (rig, _) = Rig::answering(&[UNAVAILABLE, UNAVAILABLE, Answer::OK]);

    rig.ring("c1").await;

    assert_eq!(rig.store.called("is_cancelled"), 2);
}

#[tokio::test]
async fn an_expired_provider_token_is_replaced_on_a_new_connection_once() {
    let (rig, d) = Rig::answering(&[Answer::refused(403, "ExpiredProviderToken")]);

    rig.ring("c1").await;

    assert_eq!(rig.apns.resets(), 1);
    let r = rig.result_for(d);
    assert_eq!(
        (r.status, r.attempts),
        (Status::Failed, 2),
        "not refreshed twice"
    );
}

#[tokio::test]
async fn our_own_mistakes_fail_at_once() {
    let (rig, d) = Rig::answering(&[Answer::refused(400, "BadCollapseId")]);

    rig.ring("c1").await;

    let r = rig.result_for(d);
    assert_eq!((r.status, r.attempts), (Status::Failed, 1));
    assert_eq!(r.reason.as_deref(), Some("BadCollapseId"));
    assert!(rig.store.device(d).invalidated.is_none());
}
