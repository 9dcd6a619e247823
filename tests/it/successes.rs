//! A device's last success, as rings record it: rewritten when it says
//! something new (the first, another environment, an hour old), not for every
//! push — the worker does not even send a success its admission found recent.

use serde_json::json;
use voip_push_worker::event::{Environment, Status};

use crate::common::TestEnv;

#[tokio::test]
async fn a_ring_rewrites_a_devices_success_only_when_it_says_something_new() {
    let mut env = TestEnv::new().await;
    let production = Some(Environment::Production);
    // 90: succeeded ten minutes ago; 91: two hours ago; 92: ten minutes ago,
    // but its environment is unknown again (registered anew).
    env.device("90", production, Environment::Production).await;
    env.device("91", production, Environment::Production).await;
    env.device("92", None, Environment::Production).await;
    let client = env.db.client().await;
    client
        .batch_execute(
            "UPDATE devices SET last_success_at = now() - interval '10 minutes'
               WHERE user_id IN ('90', '92');
             UPDATE devices SET last_success_at = now() - interval '2 hours'
               WHERE user_id = '91';",
        )
        .await
        .unwrap();
    let before = last_successes(&client).await;

    for user in ["90", "91", "92"] {
        env.publish(json!({"callId": format!("success-{user}"), "toUserId": user}))
            .await;
    }
    for user in ["90", "91", "92"] {
        let r = &env.results_for(&format!("success-{user}"), 1).await[0];
        assert_eq!(r.status, Status::Delivered, "{user}");
    }

    // Successes are written with the outcomes, after the results.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let settled: i64 = client
            .query_one(
                "SELECT count(*) FROM delivery_claims
                 WHERE call_id LIKE 'success-%' AND published_at IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if settled == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{settled} of 3 outcomes recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let after = last_successes(&client).await;
    let row = |rows: &[Success], user: &str| rows.iter().find(|r| r.0 == user).cloned().unwrap();
    let (_, was, _, _) = row(&before, "90");
    let (_, is, _, env_90) = row(&after, "90");
    assert_eq!(
        (is, env_90.as_str()),
        (was, "production"),
        "recent and the same: left alone"
    );
    let (_, _, age_91, env_91) = row(&after, "91");
    assert!(
        age_91 < 60.0,
        "an aged success is rewritten: {age_91} s old"
    );
    assert_eq!(env_91, "production");
    let (_, _, age_92, env_92) = row(&after, "92");
    assert!(
        age_92 < 60.0,
        "a success in a new environment is written: {age_92} s old"
    );
    assert_eq!(env_92, "production", "and the environment learned");
    drop(client);
    env.cleanup().await;
}

/// A device's user, last success (µs since epoch), its age in seconds and the
/// device's environment.
type Success = (String, i64, f64, String);

async fn last_successes(client: &tokio_postgres::Client) -> Vec<Success> {
    client
        .query(
            "SELECT user_id, (extract(epoch FROM last_success_at) * 1000000)::bigint,
                    extract(epoch FROM now() - last_success_at)::float8, environment
             FROM devices ORDER BY user_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}
