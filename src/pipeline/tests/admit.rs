//! Before any push: who has devices, whether the call is still live, and what
//! the claims say.

use serde_json::{json, Value};

use super::{message, ring, token, Rig, BUNDLE, OWNER, USER};
use crate::event::{now_ms, CallEvent, Status};
use crate::pipeline::fakes::store::FakeClaim;
use crate::pipeline::ids::{claim_key, event_id};
use crate::pipeline::Disposition;
use crate::store::calls::CallState;

/// Puts a claim of call `c1`'s ring on device `d`, held by `owner` with what
/// it recorded; returns its event key.
fn hold(rig: &Rig, d: i64, owner: &str, result: Option<Value>) -> String {
    let msg = message(ring("c1"));
    let limits = rig.pipeline.cfg.worker.limits();
    let event = CallEvent::parse_with(&msg.body, &limits).expect("a ring");
    let key = claim_key(&event_id(&msg, &event), &event);
    let claim = FakeClaim {
        owner: owner.into(),
        call_id: "c1".into(),
        event_type: "call.incoming".into(),
        result,
        ..FakeClaim::default()
    };
    rig.store.state().claims.insert((key.clone(), d), claim);
    key
}

#[tokio::test]
async fn a_user_without_devices_gets_one_no_device_result_and_no_push() {
    let rig = Rig::new();
    rig.store.add_device("someone-else", BUNDLE, &token(1));
    rig.store.add_device(USER, "com.example.other", &token(2));

    rig.ring("c1").await;

    let published = rig.results.published();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].status, Status::NoDevice);
    assert_eq!(published[0].device_id, None);
    assert!(rig.apns.sent().is_empty());
    assert_eq!(rig.store.state().calls["c1"].state, CallState::Failed);
}

#[tokio::test]
async fn an_invalidated_device_is_not_rung() {
    let rig = Rig::new();
    let dead = rig.device(&token(1));
    rig.store
        .edit_device(dead, |d| d.invalidated = Some("Unregistered".into()));

    rig.ring("c1").await;

    assert_eq!(rig.results.published()[0].status, Status::NoDevice);
    assert!(rig.apns.sent().is_empty());
}

#[tokio::test]
async fn a_call_cancelled_before_its_ring_is_not_pushed() {
    let rig = Rig::new();
    let (a, b) = (rig.device(&token(1)), rig.device(&token(2)));
    rig.acked(super::cancel("c1", "caller_hangup")).await;

    rig.ring("c1").await;

    for d in [a, b] {
        let r = rig.result_for(d);
        assert_eq!(r.status, Status::Cancelled);
        assert_eq!(r.reason.as_deref(), Some("call cancelled"));
    }
    assert!(rig.apns.sent().is_empty());
    assert!(
        rig.store.state().claims.is_empty(),
        "a cancelled call claims nothing"
    );
}

#[tokio::test]
async fn an_event_past_its_ring_deadline_is_expired_unpushed() {
    let rig = Rig::new();
    let d = rig.device(&token(1));
    let mut late = ring("c1");
    late["sentAt"] = json!(now_ms() - 60_000);

    rig.acked(late).await;

    assert_eq!(rig.result_for(d).status, Status::Expired);
    assert!(rig.apns.sent().is_empty());
    // Its claim records the outcome, so `trace` tells why it never rang.
    let state = rig.store.state();
    let claims: Vec<&FakeClaim> = state.claims.values().collect();
    assert_eq!(claims.len(), 1);
    assert!(claims[0].published && claims[0].attempts.is_empty());
    assert_eq!(claims[0].result.as_ref().unwrap()["status"], "expired");
    assert_eq!(state.calls["c1"].state, CallState::Expired);
}

/// A late copy of an event that a live worker is still ringing (a duplicate
/// message, its retries outlasting the deadline) publishes nothing for the
/// device that worker holds: the owner publishes its one result, `delivered`
/// perhaps, and no `expired` contradicts it.
#[tokio::test]
async fn a_late_copy_leaves_a_live_owners_device_to_it() {
    let rig = Rig::new();
    let (held, free) = (rig.device(&token(1)), rig.device(&token(2)));
    let key = hold(&rig, held, "w2/7", None);

    rig.acked(late_ring()).await;

    let published = rig.results.published();
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(
        (published[0].device_id, published[0].status),
        (Some(free), Status::Expired)
    );
    assert!(rig.apns.sent().is_empty());
    let state = rig.store.state();
    let claim = &state.claims[&(key, held)];
    assert_eq!((claim.owner.as_str(), claim.published), ("w2/7", false));
}

#[tokio::test]
async fn a_claim_held_by_a_live_owner_makes_the_copy_wait() {
    let rig = Rig::new();
    let d = rig.device(&token(1));
    let key = hold(&rig, d, "w2/7", None);

    let disposition = rig.handle(ring("c1")).await;

    assert!(
        matches!(disposition, Disposition::Wait { .. }),
        "{disposition:?}"
    );
    assert!(rig.apns.sent().is_empty());
    assert!(rig.results.published().is_empty());
    assert_eq!(rig.store.state().claims[&(key, d)].owner, "w2/7");
}

#[tokio::test]
async fn a_dead_owners_claim_is_taken_over_and_pushed() {
    let rig = Rig::new();
    let d = rig.device(&token(1));
    let key = hold(&rig, d, "w2/7", None);
    rig.store.state().dead_workers.insert("w2".into());

    rig.ring("c1").await;

    assert_eq!(rig.apns.sent().len(), 1);
    assert_eq!(rig.result_for(d).status, Status::Delivered);
    let claim = rig.store.state().claims[&(key, d)].clone();
    assert_eq!(claim.owner, OWNER);
    assert!(claim.published);
}

#[tokio::test]
async fn a_claim_pushed_but_not_published_is_republished_without_a_push() {
    let rig = Rig::new();
    let d = rig.device(&token(1));
    // What an earlier owner, now dead, recorded before its publish.
    let stored = json!({"eventId": "e", "eventType": "call.incoming", "callId": "c1",
        "toUserId": USER, "deviceId": d, "tokenSuffix": "01010101", "bundleId": BUNDLE,
        "status": "delivered", "environment": "production", "fallbackUsed": false,
        "apnsId": "a", "apnsStatus": 200, "reason": null, "attempts": 1, "latencyMs": 3,
        "completedAt": "2025-01-01T00:00:00Z"});
    let key = hold(&rig, d, "w0/3", Some(stored.clone()));
    rig.store.state().dead_workers.insert("w0".into());

    rig.ring("c1").await;

    assert!(rig.apns.sent().is_empty());
    let again = serde_json::to_value(rig.result_for(d)).unwrap();
    assert_eq!(again, stored, "the stored result, as it was");
    let state = rig.store.state();
    assert!(state.claims[&(key, d)].published);
    assert_eq!(state.finished[0].published_only, vec![d]);
    assert!(state.finished[0].outcomes.is_empty(), "no new outcome");
    assert_eq!(state.calls["c1"].state, CallState::Delivered);
}

#[tokio::test]
async fn a_redelivered_event_pushes_and_publishes_nothing_again() {
    let rig = Rig::new();
    let (a, b) = (rig.device(&token(1)), rig.device(&token(2)));

    rig.ring("c1").await;
    rig.ring("c1").await;

    assert_eq!(rig.apns.sent().len(), 2, "one push per device");
    assert_eq!(rig.results_for(a).len(), 1);
    assert_eq!(rig.results_for(b).len(), 1);
    let events = |outcome: &str| {
        rig.pipeline
            .metrics
            .events
            .with_label_values(&[outcome])
            .get()
    };
    assert_eq!((events("delivered"), events("duplicate")), (1, 1));
    assert_eq!(events("no_device"), 0, "the copy found devices");
}

#[tokio::test]
async fn a_store_that_cannot_admit_the_ring_has_it_retried_unpushed() {
    let rig = Rig::new();
    rig.device(&token(1));
    rig.store.state().failing.insert("admit_ring");

    let disposition = rig.handle(ring("c1")).await;

    assert!(
        matches!(disposition, Disposition::Retry(_)),
        "{disposition:?}"
    );
    assert!(rig.apns.sent().is_empty());
    assert!(rig.results.published().is_empty());
}

/// Device `d`'s result of call `c1`'s ring, published by another copy.
fn published_by_another_copy(rig: &Rig, d: i64) {
    let key = hold(rig, d, "w2/7", Some(json!({"status": "delivered"})));
    let mut state = rig.store.state();
    state.claims.get_mut(&(key, d)).expect("held").published = true;
}

/// Call `c1`'s ring, a minute after its start.
fn late_ring() -> Value {
    let mut late = ring("c1");
    late["sentAt"] = json!(now_ms() - 60_000);
    late
}

#[tokio::test]
async fn a_late_copy_publishes_no_second_result_for_a_published_device() {
    let rig = Rig::new();
    let (done, open) = (rig.device(&token(1)), rig.device(&token(2)));
    published_by_another_copy(&rig, done);

    rig.acked(late_ring()).await;

    let published = rig.results.published();
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(published[0].device_id, Some(open));
    assert_eq!(published[0].status, Status::Expired);
    assert!(rig.apns.sent().is_empty());
}

#[tokio::test]
async fn a_late_copy_of_a_published_event_publishes_nothing() {
    let rig = Rig::new();
    let d = rig.device(&token(1));
    published_by_another_copy(&rig, d);

    rig.acked(late_ring()).await;

    assert!(rig.results.published().is_empty());
    assert!(rig.apns.sent().is_empty());
}
