//! A call settled by its rings' claims (`store::calls::SETTLED_BY_CLAIMS`):
//! a ring's outcome is written to its claims only, and `trace` and the call
//! status API read the call's state from them, against real Postgres.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use voip_push_worker::config::PostgresConfig;
use voip_push_worker::event::{Environment, Status};
use voip_push_worker::store::calls::CallState;
use voip_push_worker::store::Store;

use crate::common::{eventually, TestDb, TestEnv};

/// A ring through the real worker: the result is delivered, the call reads as
/// delivered and settled, and its row was not written after the admission.
#[tokio::test]
async fn a_rings_outcome_settles_its_call_without_writing_the_calls_row() {
    let mut env = TestEnv::new().await;
    env.device("s1", Some(Environment::Production), Environment::Production)
        .await;
    env.publish(json!({"callId": "st-1", "toUserId": "s1"}))
        .await;
    assert_eq!(
        env.results_for("st-1", 1).await[0].status,
        Status::Delivered
    );
    // The outcome is recorded after the broker's confirm, so a little after
    // the result arrives.
    let store = &env.store;
    eventually("the call settled", Duration::from_secs(10), || async {
        let state = store.call_state("st-1").await.unwrap();
        (state == Some(CallState::Delivered)).then_some(())
    })
    .await;
    let trace = env.recorded_trace("st-1").await;
    assert_eq!(trace.state, CallState::Delivered);
    assert!(trace.settled_at.is_some(), "{trace:?}");
    let client = env.db.client().await;
    let row = client
        .query_one(
            "SELECT state, settled_at IS NULL FROM calls WHERE call_id = 'st-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, bool>(1)),
        ("ringing".to_string(), true),
        "the ring wrote the call's row"
    );
    env.cleanup().await;
}

const STATUSES: [&str; 6] = [
    "delivered",
    "failed",
    "expired",
    "cancelled",
    "token_invalidated",
    "app_misconfigured",
];
const STORED: [&str; 5] = ["ringing", "delivered", "failed", "expired", "cancelled"];

/// The verdict as rings wrote it before (each copy's results, a delivery
/// winning over another copy's failure): a delivery; once every claim has its
/// outcome, all cancelled, all expired, or else failed; the row's own state
/// first unless it is ringing, or a failure a delivery overrides.
fn expected(stored: &str, claims: &[(usize, bool)]) -> &'static str {
    let published: Vec<&str> = (claims.iter())
        .filter(|c| c.1)
        .map(|c| STATUSES[c.0])
        .collect();
    let all = |s: &str| published.iter().all(|p| *p == s);
    let verdict = if published.contains(&"delivered") {
        Some("delivered")
    } else if claims.is_empty() || published.len() < claims.len() {
        None
    } else if all("cancelled") {
        Some("cancelled")
    } else if all("expired") {
        Some("expired")
    } else {
        Some("failed")
    };
    match (stored, verdict) {
        ("ringing", v) => v.unwrap_or("ringing"),
        ("failed" | "expired", Some("delivered")) => "delivered",
        (s, _) => STORED.iter().find(|x| **x == s).copied().unwrap(),
    }
}

/// Any call row and any claims of its rings (and of its cancel pushes, which
/// never settle it): the call's state as read is the verdict above, and it
/// has a settling time exactly when it is settled.
#[test]
fn a_call_reads_as_its_claims_settle_it() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (db, store) = rt.block_on(async {
        let db = TestDb::create().await;
        let cfg = PostgresConfig {
            url: db.url.clone(),
            ..PostgresConfig::default()
        };
        let store = Store::connect(&cfg).unwrap();
        store.migrate().await.unwrap();
        (db, store)
    });
    let client = rt.block_on(db.client());
    let cases = (
        0..STORED.len(),
        prop::collection::vec((0..STATUSES.len(), any::<bool>()), 0..5),
        prop::collection::vec(0..STATUSES.len(), 0..2),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    });
    let outcome = runner.run(&cases, |(stored, claims, cancel_pushes)| {
        rt.block_on(async {
            let call = crate::common::unique("prop-call-");
            client
                .execute(
                    "INSERT INTO calls (call_id, bundle_id, to_user_id, state, settled_at)
                     VALUES ($1, 'b', 'u', $2, CASE WHEN $2 <> 'ringing' THEN now() END)",
                    &[&call, &STORED[stored]],
                )
                .await
                .unwrap();
            let rows = (claims.iter().map(|c| (c.0, c.1, "call.incoming")))
                .chain(cancel_pushes.iter().map(|s| (*s, true, "call.cancel")));
            for (device, (status, published, kind)) in rows.enumerate() {
                let result = published.then(|| json!({"status": STATUSES[status]}).to_string());
                client
                    .execute(
                        "INSERT INTO delivery_claims (event_key, device_id, owner, lease_until,
                                                      call_id, event_type, result_json, published_at)
                         VALUES ($1, $2, 'w/1', now(), $1, $3, $4::text::json,
                                 CASE WHEN $5 THEN now() END)",
                        &[&call, &(device as i64), &kind, &result, &published],
                    )
                    .await
                    .unwrap();
            }
            let want = CallState::parse(expected(STORED[stored], &claims));
            let state = store.call_state(&call).await.unwrap();
            prop_assert_eq!(state, Some(want));
            let trace = store.trace_call(&call).await.unwrap().unwrap();
            prop_assert_eq!(trace.state, want);
            prop_assert_eq!(trace.settled_at.is_some(), want != CallState::Ringing);
            Ok(())
        })
    });
    drop((client, store));
    rt.block_on(db.drop_db());
    outcome.unwrap();
}
