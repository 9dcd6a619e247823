//! Every error ends somewhere, fast: a failure no retry can fix is dead-lettered
//! at once (`non_retryable`), and faults are retried only within a bound (a ring's
//! deadline, else `worker.retry_cap_secs`), then dead-lettered (`retry_exhausted`).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::TestEnv;

/// Takes dead letters until `n` have arrived or `within` passes: (call id, reason).
async fn dead_letters(env: &TestEnv, n: usize, within: Duration) -> Vec<(String, String)> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only these dead letters: {got:?}"
        );
        for (body, reason) in env.dead_letters().await {
            let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON dead letter");
            got.push((
                v["callId"].as_str().unwrap_or_default().to_string(),
                reason.unwrap_or_default(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got
}

/// A token query that names a table which does not exist fails the same way every
/// time (SQLSTATE 42P01): the event is dead-lettered at once, not retried for ever.
#[tokio::test]
async fn a_statement_postgres_refuses_dead_letters_the_event_at_once() {
    let env = TestEnv::with(|cfg| {
        cfg.store.token_query = Some("SELECT token FROM no_such_tokens WHERE user_id = $1".into());
    })
    .await;
    let started = Instant::now();
    env.publish(json!({"callId": "nr-1", "toUserId": "u1"}))
        .await;
    let dead = dead_letters(&env, 1, Duration::from_secs(20)).await;
    assert_eq!(dead, [("nr-1".to_string(), "non_retryable".to_string())]);
    // The first retry would have come after worker.retry_delay_ms at the least.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    env.wait_metric(
        "voip_push_dead_letters_total{lane=\"calls\",reason=\"non_retryable\"}",
        1.0,
    )
    .await;
    assert_eq!(env.http_get("/readyz").await.0, 200);
    env.cleanup().await;
}

/// With the database gone, a ring is retried until its ring deadline and a cancel
/// for `worker.retry_cap_secs`; then both are dead-lettered, and nothing stays
/// held.
#[tokio::test]
async fn faults_are_retried_within_a_bound_then_dead_lettered() {
    let env = TestEnv::with(|cfg| cfg.worker.retry_cap_secs = 2).await;
    env.db.drop_db().await;
    env.publish(json!({"callId": "rx-ring", "toUserId": "u1", "ringTimeoutSecs": 6}))
        .await;
    env.publish_cancel(json!({"type": "call.cancel", "callId": "rx-cancel", "toUserId": "u1"}))
        .await;
    // The cancel sits on the work queue and on the cancel lane: two copies.
    let mut dead = dead_letters(&env, 3, Duration::from_secs(40)).await;
    dead.sort();
    assert_eq!(
        dead,
        [
            ("rx-cancel".to_string(), "retry_exhausted".to_string()),
            ("rx-cancel".to_string(), "retry_exhausted".to_string()),
            ("rx-ring".to_string(), "retry_exhausted".to_string()),
        ]
    );
    let text = env
        .wait_metric(
            "voip_push_dead_letters_total{lane=\"cancels\",reason=\"retry_exhausted\"}",
            1.0,
        )
        .await;
    assert_eq!(
        crate::common::metric(
            &text,
            "voip_push_dead_letters_total{lane=\"calls\",reason=\"retry_exhausted\"}"
        ),
        2.0
    );
    env.cleanup().await;
}
