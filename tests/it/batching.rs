//! The per-event statements that concurrent events share (store::batch), against
//! real Postgres: every event gets its own answer, duplicates in one batch are
//! fine, and one bad request fails alone.

use futures_util::future::join_all;
use serde_json::json;
use voip_push_worker::event::Environment;
use voip_push_worker::store::calls::CallState;
use voip_push_worker::store::claims::Claim;

use crate::common::{TestEnv, BUNDLE};

const USERS: usize = 24;

#[tokio::test]
async fn concurrent_events_each_get_their_own_call_devices_claims_and_settlement() {
    let env = TestEnv::without_worker(|_| {}).await;
    let store = &env.store;
    // Every third user has two devices; user 0 has none.
    let mut tokens: Vec<Vec<String>> = vec![Vec::new(); USERS];
    for (u, owned) in tokens.iter_mut().enumerate().skip(1) {
        for _ in 0..1 + usize::from(u % 3 == 0) {
            owned.push(
                env.device(
                    &format!("b{u}"),
                    Some(Environment::Production),
                    Environment::Production,
                )
                .await,
            );
        }
    }
    // A cancel that came before its initiate.
    store
        .cancel_call("bcall-5", BUNDLE, "b5", Some("hangup"), None)
        .await
        .unwrap();

    // Every call opened twice at once (a duplicate event), devices looked up at once.
    let opened = join_all((0..2 * USERS).map(|i| {
        let u = i % USERS;
        async move {
            let call = format!("bcall-{u}");
            let user = format!("b{u}");
            let (state, devices) = tokio::join!(
                store.open_call(&call, BUNDLE, &user, 4_000_000_000_000),
                store.live_devices(&user, BUNDLE)
            );
            (u, state.unwrap(), devices.unwrap())
        }
    }))
    .await;
    for (u, state, devices) in &opened {
        let want = if *u == 5 {
            CallState::Cancelled
        } else {
            CallState::Ringing
        };
        assert_eq!(*state, want, "call of user {u}");
        let mut got: Vec<&str> = devices.iter().map(|d| d.token.as_str()).collect();
        let mut owned: Vec<&str> = tokens[*u].iter().map(String::as_str).collect();
        got.sort_unstable();
        owned.sort_unstable();
        assert_eq!(got, owned, "devices of user {u}");
    }

    // Claim every device once, then record results and settle all events at once.
    let mut claimed = Vec::new();
    for (u, _, devices) in opened.iter().take(USERS) {
        for d in devices {
            let event = format!("bevent-{u}");
            let claim = store
                .claim(&event, d.id, "w/1", &format!("bcall-{u}"))
                .await
                .unwrap();
            assert_eq!(claim, Claim::Push);
            claimed.push((*u, event, d.id));
        }
    }
    join_all(claimed.iter().map(|(u, event, device)| async move {
        let result = json!({"status": "delivered", "user": u, "deviceId": device});
        store.complete_claim(event, *device, &result).await.unwrap();
    }))
    .await;
    join_all((1..USERS).map(|u| {
        let devices: Vec<i64> = claimed.iter().filter(|c| c.0 == u).map(|c| c.2).collect();
        async move {
            let call = format!("bcall-{u}");
            store
                .finish_event(
                    &format!("bevent-{u}"),
                    &devices,
                    Some((&call, CallState::Delivered)),
                )
                .await
                .unwrap();
        }
    }))
    .await;

    for (u, owned) in tokens.iter().enumerate().skip(1) {
        let trace = store
            .trace_call(&format!("bcall-{u}"))
            .await
            .unwrap()
            .unwrap();
        // The cancelled call keeps its state; every other one is settled.
        let want = if u == 5 {
            CallState::Cancelled
        } else {
            CallState::Delivered
        };
        assert_eq!(trace.state, want, "call of user {u}");
        assert_eq!(trace.deliveries.len(), owned.len(), "user {u}");
        assert!(trace.deliveries.iter().all(|d| d.status == "delivered"));
    }
    // Published: a later claimant is told the work is done.
    for (u, event, device) in &claimed {
        let again = store
            .claim(event, *device, "w/2", &format!("bcall-{u}"))
            .await
            .unwrap();
        assert_eq!(again, Claim::Done, "event {event} device {device}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_request_postgres_refuses_fails_alone_in_its_batch() {
    let env = TestEnv::without_worker(|_| {}).await;
    let store = &env.store;
    // Postgres text cannot hold a NUL byte: that one open fails, its batch mates
    // (sent at the same moment) do not.
    let calls = ["ok-1", "bad-\0-2", "ok-3", "ok-4"];
    let opened = join_all(calls.map(|c| store.open_call(c, BUNDLE, "u1", 4_000_000_000_000))).await;
    for (call, state) in calls.iter().zip(&opened) {
        if call.contains('\0') {
            let e = state.as_ref().expect_err("a NUL byte is refused");
            assert!(e.to_string().contains("postgres"), "{e}");
        } else {
            assert_eq!(state.as_ref().ok(), Some(&CallState::Ringing), "{call}");
        }
    }
    for call in ["ok-1", "ok-3", "ok-4"] {
        assert!(store.trace_call(call).await.unwrap().is_some(), "{call}");
    }
    env.cleanup().await;
}
