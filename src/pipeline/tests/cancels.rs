//! A cancel: what the devices a call rang are sent, by `worker.cancel_push`.

use serde_json::json;

use super::{cancel, ring, token, Rig};
use crate::apns::PushType;
use crate::config::CancelPush;
use crate::event::Environment::Production;
use crate::event::Status;
use crate::pipeline::fakes::store::FakeClaim;
use crate::pipeline::fakes::Answer;
use crate::pipeline::Disposition;
use crate::store::calls::CallState;

/// A rig whose callee has two devices, both rung by call `c1`; the first has
/// an alert token.
async fn rung(mode: CancelPush) -> (Rig, i64, i64) {
    let rig = Rig::with(|cfg| cfg.worker.cancel_push = mode);
    let (a, b) = (rig.device(&token(1)), rig.device(&token(2)));
    rig.store
        .edit_device(a, |d| d.alert_token = Some(token(0xa1)));
    rig.ring("c1").await;
    assert_eq!(rig.apns.sent().len(), 2);
    (rig, a, b)
}

#[tokio::test]
async fn a_missed_call_is_an_alert_to_each_rung_device_with_an_alert_token() {
    let (rig, a, b) = rung(CancelPush::Alert).await;

    rig.acked(cancel("c1", "caller_hangup")).await;

    let sent = rig.apns.sent();
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[2].token, token(0xa1));
    assert_eq!(sent[2].push_type, PushType::Alert);
    assert_eq!(
        sent[2].topic,
        super::BUNDLE,
        "an alert goes to the app's topic"
    );
    let notice = rig.results_for(a).pop().unwrap();
    assert_eq!(
        (notice.event_type.as_str(), notice.status),
        ("call.cancel", Status::Delivered)
    );
    assert_eq!(rig.results_for(b).len(), 1, "only its ring's result");
    assert_eq!(rig.store.state().calls["c1"].state, CallState::Cancelled);
}

#[tokio::test]
async fn an_answered_call_is_no_missed_call() {
    let (rig, _, _) = rung(CancelPush::Alert).await;

    rig.acked(cancel("c1", "answered_elsewhere")).await;

    assert_eq!(rig.apns.sent().len(), 2, "nothing after the rings");
}

#[tokio::test]
async fn a_voip_cancel_goes_to_every_rung_device_but_the_one_that_answered() {
    let (rig, a, b) = rung(CancelPush::Voip).await;
    let mut answered = cancel("c1", "answered_elsewhere");
    answered["answeredDeviceId"] = json!(a.to_string());

    rig.acked(answered).await;

    let sent = rig.apns.sent();
    assert_eq!(sent.len(), 3);
    assert_eq!(
        (sent[2].token.as_str(), sent[2].push_type),
        (token(2).as_str(), PushType::Voip)
    );
    assert_eq!(rig.results_for(b).len(), 2);
}

#[tokio::test]
async fn with_cancel_pushes_off_nothing_is_sent() {
    let (rig, _, _) = rung(CancelPush::Off).await;

    rig.acked(cancel("c1", "caller_hangup")).await;

    assert_eq!(rig.apns.sent().len(), 2);
    assert_eq!(rig.store.state().calls["c1"].state, CallState::Cancelled);
    let skipped = &rig.pipeline.metrics.cancel_pushes_skipped;
    assert_eq!(skipped.with_label_values(&["off"]).get(), 1);
}

#[tokio::test]
async fn a_cancel_naming_another_callee_cancels_nothing() {
    let (rig, _, _) = rung(CancelPush::Alert).await;
    let mut wrong = cancel("c1", "caller_hangup");
    wrong["toUserId"] = json!("someone-else");

    let disposition = rig.handle(wrong).await;

    assert!(
        matches!(disposition, Disposition::DeadLetter { .. }),
        "{disposition:?}"
    );
    assert_eq!(rig.store.state().calls["c1"].state, CallState::Delivered);
    assert_eq!(rig.apns.sent().len(), 2);
}

#[tokio::test]
async fn a_refused_alert_token_is_forgotten_once_proven_and_the_voip_token_kept() {
    let (rig, a, _) = rung(CancelPush::Alert).await;
    let refused = Answer::refused(400, "DeviceTokenNotForTopic");
    rig.apns.answer(&token(0xa1), Production, &[refused]);

    rig.acked(cancel("c1", "caller_hangup")).await;

    let device = rig.store.device(a);
    assert_eq!(device.alert_token, None);
    assert!(
        device.invalidated.is_none(),
        "the VoIP token is another token"
    );
    assert_eq!(rig.results_for(a).pop().unwrap().status, Status::Failed);
}

#[tokio::test]
async fn a_refused_alert_token_is_kept_before_the_app_is_proven() {
    let rig = Rig::new();
    let a = rig.device(&token(1));
    rig.store
        .edit_device(a, |d| d.alert_token = Some(token(0xa1)));
    // Rung by an earlier process: this one has proven nothing yet.
    let rung = FakeClaim {
        owner: "w0/1".into(),
        call_id: "c1".into(),
        event_type: "call.incoming".into(),
        result: Some(json!({"status": "delivered", "environment": "production"})),
        published: true,
        ..FakeClaim::default()
    };
    rig.store.state().claims.insert(("ring".into(), a), rung);
    let refused = Answer::refused(400, "DeviceTokenNotForTopic");
    rig.apns.answer(&token(0xa1), Production, &[refused]);

    rig.acked(cancel("c1", "caller_hangup")).await;

    assert_eq!(rig.apns.sent().len(), 1);
    assert_eq!(rig.store.device(a).alert_token, Some(token(0xa1)));
    assert_eq!(rig.store.called("clear_alert_token"), 0);
    assert_eq!(rig.result_for(a).status, Status::Failed);
}

/// A cancel that has to run again (the database failed it after the skip was
/// seen) counts each device it skips once, not once a try.
#[tokio::test]
async fn a_retried_cancel_counts_its_skipped_devices_once() {
    let (rig, _, _) = rung(CancelPush::Alert).await;
    rig.store.state().failing.insert("claim");

    let first = rig.handle(cancel("c1", "caller_hangup")).await;
    assert!(matches!(first, Disposition::Retry(_)), "{first:?}");
    rig.store.state().failing.clear();
    rig.acked(cancel("c1", "caller_hangup")).await;

    assert_eq!(rig.apns.sent().len(), 3, "the alert went once");
    let skipped = &rig.pipeline.metrics.cancel_pushes_skipped;
    assert_eq!(skipped.with_label_values(&["no_alert_token"]).get(), 1);
}

/// A copy of a ring that comes after its call was cancelled publishes
/// `cancelled` only for the devices nobody is pushing: one whose claim a live
/// worker holds gets that worker's result, not a second, contradicting one,
/// until the worker is dead.
#[tokio::test]
async fn a_late_copy_of_a_cancelled_ring_leaves_a_live_owners_device_to_it() {
    let (rig, a, b) = rung(CancelPush::Off).await;
    let later = rig.device(&token(3));
    {
        // `a`'s push is still under way on another, live worker; `b`'s is done.
        let mut s = rig.store.state();
        let claim = (s.claims.iter_mut())
            .find(|((_, device), _)| *device == a)
            .map(|(_, c)| c)
            .expect("a's claim");
        claim.owner = "w-live/7".into();
        claim.published = false;
        s.calls.get_mut("c1").unwrap().state = CallState::Cancelled;
    }
    let before = rig.results.published().len();

    let copy = rig.handle(ring("c1")).await;

    assert_eq!(copy, Disposition::Ack, "the live owner publishes its own");
    let new: Vec<_> = rig.results.published().split_off(before);
    let devices: Vec<_> = new.iter().map(|r| (r.device_id, r.status)).collect();
    assert_eq!(
        devices,
        vec![(Some(later), Status::Cancelled)],
        "b's was published"
    );

    // Once that worker is dead, nobody will publish `a`'s: the next copy does.
    rig.store.state().dead_workers.insert("w-live".into());
    rig.acked(ring("c1")).await;
    let last = rig.results_for(a).pop().unwrap();
    assert_eq!(last.status, Status::Cancelled);
    assert_eq!(rig.results_for(b).len(), 1, "b's ring result only");
}
