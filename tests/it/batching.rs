//! The per-event statements that concurrent events share (store::batch), against
//! real Postgres: every event gets its own answer, duplicates in one batch are
//! fine, and one bad request fails alone.

use futures_util::future::join_all;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use voip_push_worker::event::{now_ms, Environment};
use voip_push_worker::store::admit::Ring;
use voip_push_worker::store::calls::{AttemptRecord, CallState};
use voip_push_worker::store::claims::{Claim, Finished, Outcome};
use voip_push_worker::store::liveness::Liveness;

use crate::common::{TestEnv, BUNDLE};

const USERS: usize = 24;

pub fn ring(key: &str, call: &str, user: &str, owner: &str) -> Ring {
    Ring {
        key: key.to_string(),
        call_id: call.to_string(),
        bundle_id: BUNDLE.to_string(),
        user_id: user.to_string(),
        ring_deadline_ms: 4_000_000_000_000,
        owner: owner.to_string(),
        devices: None,
    }
}

/// A live worker's id: its claims are not taken over.
async fn live_worker(env: &TestEnv) -> String {
    Liveness::start(&env.cfg.postgres, CancellationToken::new())
        .await
        .unwrap()
        .worker_id
}

#[tokio::test]
async fn concurrent_events_each_get_their_own_call_devices_claims_and_settlement() {
    let env = TestEnv::without_worker(|_| {}).await;
    let store = &env.store;
    let worker = live_worker(&env).await;
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

    // Every ring admitted twice at once (a duplicate of the event, held by two
    // messages of one live worker): each device is claimed by exactly one copy.
    let admitted = join_all((0..2 * USERS).map(|i| {
        let u = i % USERS;
        let owner = format!("{worker}/{}", i / USERS);
        async move {
            let (call, user) = (format!("bcall-{u}"), format!("b{u}"));
            let found = store
                .admit_ring(ring(&format!("bevent-{u}"), &call, &user, &owner))
                .await
                .unwrap();
            (u, found)
        }
    }))
    .await;
    let mut claimed = Vec::new();
    for (u, owned_tokens) in tokens.iter().enumerate() {
        let copies: Vec<_> = admitted.iter().filter(|(v, _)| *v == u).collect();
        assert_eq!(copies.len(), 2);
        for (_, found) in &copies {
            let mut got: Vec<&str> = found
                .devices
                .iter()
                .map(|(d, _)| d.token.as_str())
                .collect();
            let mut owned: Vec<&str> = owned_tokens.iter().map(String::as_str).collect();
            got.sort_unstable();
            owned.sort_unstable();
            assert_eq!(got, owned, "devices of user {u}");
            if u == 5 {
                assert_eq!(found.state, Some(CallState::Cancelled));
            } else if u > 0 {
                assert_eq!(found.state, Some(CallState::Ringing), "call of user {u}");
            }
        }
        for token in owned_tokens {
            let claims: Vec<&Claim> = copies
                .iter()
                .flat_map(|(_, f)| f.devices.iter().filter(|(d, _)| &d.token == token))
                .map(|(_, c)| c)
                .collect();
            let pushes = claims.iter().filter(|c| ***c == Claim::Push).count();
            let busy = claims.iter().filter(|c| ***c == Claim::Busy).count();
            if u == 5 {
                let unclaimed = claims.iter().filter(|c| ***c == Claim::Unclaimed).count();
                assert_eq!(
                    (unclaimed, claims.len()),
                    (2, 2),
                    "a cancelled call claims nothing, and nobody holds its devices"
                );
                continue;
            }
            assert_eq!(
                (pushes, busy),
                (1, 1),
                "user {u}: one copy claims, one is told busy"
            );
            let id = copies[0]
                .1
                .devices
                .iter()
                .find(|(d, _)| &d.token == token)
                .unwrap()
                .0
                .id;
            claimed.push((u, format!("bevent-{u}"), id));
        }
    }

    // Record every outcome (with an attempt) and settle every event at once.
    join_all((1..USERS).map(|u| {
        let outcomes: Vec<Outcome> = claimed
            .iter()
            .filter(|c| c.0 == u)
            .map(|(u, _, device)| Outcome {
                device_id: *device,
                call_id: format!("bcall-{u}"),
                event_type: "call.incoming",
                result: json!({"status": "delivered", "user": u, "deviceId": device}).into(),
                attempts: vec![AttemptRecord {
                    environment: Environment::Production,
                    apns_status: Some(200),
                    reason: None,
                    apns_id: None,
                    latency_ms: 3,
                    at_ms: now_ms(),
                }],
                success: Some(Environment::Production),
            })
            .collect();
        async move {
            store
                .finish_event(Finished {
                    event_key: format!("bevent-{u}"),
                    outcomes,
                    published_only: Vec::new(),
                    settle: Some((format!("bcall-{u}"), CallState::Delivered)),
                })
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
        if u == 5 {
            assert_eq!(trace.state, CallState::Cancelled);
            assert!(trace.deliveries.is_empty());
            continue;
        }
        assert_eq!(trace.state, CallState::Delivered, "call of user {u}");
        assert_eq!(trace.deliveries.len(), owned.len(), "user {u}");
        assert!(trace.deliveries.iter().all(|d| d.status == "delivered"));
        assert!(trace.deliveries.iter().all(|d| d.attempts.len() == 1));
    }
    // Published: a later claimant (another worker) is told the work is done.
    for (u, event, device) in &claimed {
        let found = store
            .admit_ring(ring(event, &format!("bcall-{u}"), &format!("b{u}"), "w2/1"))
            .await
            .unwrap();
        let claim = &found
            .devices
            .iter()
            .find(|(d, _)| d.id == *device)
            .unwrap()
            .1;
        assert_eq!(*claim, Claim::Done, "event {event} device {device}");
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
    let opened = join_all(calls.map(|c| store.admit_ring(ring(c, c, "u1", "w/1")))).await;
    for (call, found) in calls.iter().zip(&opened) {
        if call.contains('\0') {
            let e = found.as_ref().expect_err("a NUL byte is refused");
            assert!(e.to_string().contains("postgres"), "{e}");
        } else {
            assert!(found.is_ok(), "{call}");
        }
    }
    for call in ["ok-1", "ok-3", "ok-4"] {
        assert!(store.trace_call(call).await.unwrap().is_some(), "{call}");
    }
    env.cleanup().await;
}

/// An admitting statement locks a call's row, then its claims; a finish that
/// held a claim while it waited for that call's row would deadlock with a
/// duplicate's admission. While a call's row is locked (as an admission in
/// progress holds it), a finish of that call waits for it without holding its
/// claims: another session can still lock them at once.
#[tokio::test]
async fn a_finish_waits_for_its_call_before_it_locks_any_claim() {
    let env = TestEnv::without_worker(|_| {}).await;
    let user = "lock-order-user";
    let device = env
        .device(user, Some(Environment::Production), Environment::Production)
        .await;
    let admitted = env
        .store
        .admit_ring(ring("lo-event", "lo-call", user, "w1/1"))
        .await
        .unwrap();
    let (device_id, claim) = admitted.devices.first().map(|(d, c)| (d.id, c)).unwrap();
    assert_eq!(*claim, Claim::Push, "token {device}");

    let connect = || async {
        let client = env.db.client().await;
        client
    };
    let (admission, prober) = (connect().await, connect().await);
    admission.batch_execute("BEGIN").await.unwrap();
    admission
        .execute(
            "SELECT 1 FROM calls WHERE call_id = 'lo-call' FOR UPDATE",
            &[],
        )
        .await
        .unwrap();

    {
        let finish = env.store.finish_event(Finished {
            event_key: "lo-event".into(),
            outcomes: vec![Outcome {
                device_id,
                call_id: "lo-call".into(),
                event_type: "call.incoming",
                result: json!({"status": "delivered"}).into(),
                attempts: Vec::new(),
                success: Some(Environment::Production),
            }],
            published_only: Vec::new(),
            settle: Some(("lo-call".into(), CallState::Delivered)),
        });
        tokio::pin!(finish);
        // The finish is under way once Postgres shows its session waiting for a lock.
        let waiting = async {
            crate::common::eventually("the finish waits for the call's row", LOCK_WAIT, || async {
                let n: i64 = prober
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND wait_event_type = 'Lock'
                           AND query LIKE '%UPDATE delivery_claims%'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (n > 0).then_some(())
            })
            .await
        };
        tokio::select! {
            r = &mut finish => panic!("the finish went past a locked call: {r:?}"),
            () = waiting => {}
        }
        // Its claim is not locked meanwhile.
        prober.batch_execute("BEGIN").await.unwrap();
        let free = prober
            .query(
                "SELECT 1 FROM delivery_claims WHERE event_key = 'lo-event' FOR UPDATE NOWAIT",
                &[],
            )
            .await;
        prober.batch_execute("ROLLBACK").await.unwrap();
        assert!(free.is_ok(), "the finish held the claim: {free:?}");

        admission.batch_execute("COMMIT").await.unwrap();
        finish.await.unwrap();
    }
    let trace = env.store.trace_call("lo-call").await.unwrap().unwrap();
    assert_eq!(trace.state, CallState::Delivered);
    assert_eq!(
        trace.deliveries.first().map(|d| d.status.as_str()),
        Some("delivered")
    );
    env.cleanup().await;
}

const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Batched statements are prepared once per connection and run on their one
/// generic plan: left to choose, Postgres planned the finishing statement afresh
/// for every batch (43% of its time).
#[tokio::test]
async fn batched_statements_are_never_planned_again_for_a_batch() {
    let env = TestEnv::without_worker(|_| {}).await;
    let store = &env.store;
    let worker = live_worker(&env).await;
    env.device("p1", Some(Environment::Production), Environment::Production)
        .await;
    // One at a time: each ring and each finish a batch of its own, more of
    // them than the executions Postgres plans afresh before it may settle on
    // a generic plan (five).
    for i in 0..8 {
        let (event, call) = (format!("pevent-{i}"), format!("pcall-{i}"));
        let found = store
            .admit_ring(ring(&event, &call, "p1", &format!("{worker}/{i}")))
            .await
            .unwrap();
        let (device, claim) = &found.devices[0];
        assert_eq!(*claim, Claim::Push);
        store
            .finish_event(Finished {
                event_key: event,
                outcomes: vec![Outcome {
                    device_id: device.id,
                    call_id: call.clone(),
                    event_type: "call.incoming",
                    result: json!({"status": "delivered"}).into(),
                    attempts: Vec::new(),
                    success: None,
                }],
                published_only: Vec::new(),
                settle: Some((call, CallState::Delivered)),
            })
            .await
            .unwrap();
    }
    let plans = store.batch_plans().await.unwrap();
    let generic: i64 = plans.iter().map(|p| p.1).sum();
    assert!(generic >= 16, "every admit and finish ran: {plans:?}");
    for (statement, _, custom) in &plans {
        assert_eq!(*custom, 0, "planned for its batch: {statement}");
    }
    env.cleanup().await;
}
