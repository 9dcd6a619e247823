//! What APNs' answers teach about a token: the environment it belongs to, that
//! it is dead (through the misconfiguration guard), or that it was refused
//! before a newer registration.

use std::time::Duration;

use super::{ring, token, Rig, BUNDLE};
use crate::apns::Lane;
use crate::event::Environment::{Production, Sandbox};
use crate::event::Status;
use crate::pipeline::fakes::Answer;

const BAD_TOKEN: Answer = Answer::Http(400, Some("BadDeviceToken"), None);

/// A rig whose one device APNs refuses with `BadDeviceToken` in both
/// environments.
fn refused_in_both() -> (Rig, i64) {
    let (rig, d) = Rig::answering(&[BAD_TOKEN]);
    rig.apns.answer(&token(1), Sandbox, &[BAD_TOKEN]);
    (rig, d)
}

#[tokio::test]
async fn a_token_refused_in_production_is_tried_in_sandbox_and_its_environment_learned() {
    let (rig, d) = Rig::answering(&[BAD_TOKEN]);

    rig.ring("c1").await;

    let sent = rig.apns.sent();
    let envs: Vec<_> = sent.iter().map(|s| s.environment).collect();
    assert_eq!(envs, [Production, Sandbox]);
    assert_eq!(sent[1].lane, Lane::Probation, "a fallback rides probation");
    let r = rig.result_for(d);
    assert_eq!(r.status, Status::Delivered);
    assert!(r.fallback_used);
    assert_eq!(r.environment, Some(Sandbox));
    assert_eq!(r.attempts, 2);
    let device = rig.store.device(d);
    assert_eq!(device.environment, Some(Sandbox), "learned");
    assert!(device.proven);
    assert!(device.invalidated.is_none());
}

/// A success is sent to be recorded only when it says something new: the
/// first, one after the row's has aged, one in an environment the row does not
/// hold. Most pushes go to devices rung within the hour, and recording each
/// was an index probe, and a statement's part, per push.
#[tokio::test]
async fn a_success_is_recorded_only_when_it_says_something_new() {
    let (rig, d) = Rig::answering(&[]);
    let successes = || rig.store.device(d).successes;

    rig.ring("c1").await;
    assert_eq!(successes(), 1, "the first success");
    rig.ring("c2").await;
    assert_eq!(successes(), 1, "the same success again, within the hour");

    rig.store.edit_device(d, |d| d.success_is_recent = false);
    rig.ring("c3").await;
    assert_eq!(successes(), 2, "the row's success had aged");

    // Re-registered: the environment is unknown again, the success recent.
    rig.store.edit_device(d, |d| d.environment = None);
    rig.ring("c4").await;
    assert_eq!(successes(), 3, "the environment is news");
    assert_eq!(rig.store.device(d).environment, Some(Production));
    assert_eq!(rig.results_for(d).len(), 4);
}

#[tokio::test]
async fn a_learned_environment_is_tried_first_on_a_trusted_connection() {
    let (rig, d) = Rig::answering(&[BAD_TOKEN]);
    rig.ring("c1").await;

    rig.ring("c2").await;

    let second = rig.apns.sent()[2].clone();
    assert_eq!((second.environment, second.lane), (Sandbox, Lane::Trusted));
    assert_eq!(rig.results_for(d)[1].status, Status::Delivered);
    assert!(!rig.results_for(d)[1].fallback_used);
}

#[tokio::test]
async fn refused_in_both_before_the_app_is_proven_the_token_is_held_not_invalidated() {
    let (rig, d) = refused_in_both();

    rig.ring("c1").await;

    let r = rig.result_for(d);
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.reason.as_deref(), Some("BadDeviceToken"));
    assert!(rig.store.device(d).invalidated.is_none());
    assert_eq!(rig.app().guard.suspects(), 1);
    assert_eq!(rig.store.called("invalidate"), 0);
}

#[tokio::test]
async fn refused_in_both_once_the_app_is_proven_in_both_the_token_is_invalidated() {
    let (rig, d) = refused_in_both();
    rig.app().guard.succeeded(99, Production);
    rig.app().guard.succeeded(99, Sandbox);

    rig.ring("c1").await;

    assert_eq!(rig.result_for(d).status, Status::TokenInvalidated);
    let reason = rig.store.device(d).invalidated;
    assert_eq!(reason.as_deref(), Some("BadDeviceToken"));
}

#[tokio::test]
async fn proof_in_one_environment_does_not_apply_a_refusal_in_both() {
    let (rig, d) = refused_in_both();
    rig.app().guard.succeeded(99, Production);

    rig.ring("c1").await;

    assert_eq!(rig.result_for(d).status, Status::Failed);
    assert!(rig.store.device(d).invalidated.is_none());
}

#[tokio::test]
async fn a_held_refusal_is_applied_when_the_app_proves_itself() {
    let (rig, dead) = refused_in_both();
    rig.ring("c1").await;
    assert!(rig.store.device(dead).invalidated.is_none());

    // Two good devices of another callee prove production, and sandbox
    // through a fallback.
    rig.store.add_device("11", BUNDLE, &token(2));
    let sb = rig.store.add_device("11", BUNDLE, &token(3));
    rig.apns.answer(&token(3), Production, &[BAD_TOKEN]);
    let mut other = ring("c2");
    other["toUserId"] = "11".into();
    rig.acked(other).await;
    assert_eq!(rig.result_for(sb).environment, Some(Sandbox));

    // Applied in the background: wait for it.
    let started = std::time::Instant::now();
    while rig.store.device(dead).invalidated.is_none() {
        assert!(started.elapsed() < Duration::from_secs(5), "never applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(rig.app().guard.suspects(), 0);
}

#[tokio::test]
async fn many_devices_refused_and_none_accepted_mark_the_app_misconfigured() {
    let rig = Rig::with(|cfg| cfg.apns.misconfigured_after_devices = 3);
    let devices: Vec<i64> = (1..=3).map(|n| rig.device(&token(n))).collect();
    for n in 1..=3 {
        let refused = Answer::refused(400, "DeviceTokenNotForTopic");
        rig.apns.answer(&token(n), Production, &[refused]);
    }

    rig.ring("c1").await;

    let statuses: Vec<Status> = devices.iter().map(|d| rig.result_for(*d).status).collect();
    let count = |s: Status| statuses.iter().filter(|x| **x == s).count();
    assert_eq!(
        (count(Status::Failed), count(Status::AppMisconfigured)),
        (2, 1)
    );
    assert!(rig.app().guard.is_misconfigured());
    assert_eq!(rig.store.called("invalidate"), 0, "no token invalidated");
}

/// A rig whose one device APNs answers 410 `ms` after its registration.
fn unregistered_after(ms: i64) -> (Rig, i64) {
    let (rig, d) = Rig::answering(&[Answer::OK]);
    let registered = rig.store.device(d).updated_at_ms;
    let gone = Answer::unregistered(registered + ms);
    rig.apns.answer(&token(1), Production, &[gone]);
    (rig, d)
}

#[tokio::test]
async fn a_410_after_the_registration_invalidates_the_token() {
    let (rig, d) = unregistered_after(1000);

    rig.ring("c1").await;

    assert_eq!(rig.result_for(d).status, Status::TokenInvalidated);
    let reason = rig.store.device(d).invalidated;
    assert_eq!(reason.as_deref(), Some("Unregistered"));
}

#[tokio::test]
async fn a_410_from_before_a_re_registration_keeps_the_token() {
    let (rig, d) = unregistered_after(-1000);

    rig.ring("c1").await;

    let r = rig.result_for(d);
    assert_eq!((r.status, r.apns_status), (Status::Failed, Some(410)));
    assert!(
        rig.store.device(d).invalidated.is_none(),
        "the newer token is live"
    );
}
