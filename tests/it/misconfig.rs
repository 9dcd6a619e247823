//! The misconfiguration guard end to end, against the simulator over TLS +
//! HTTP/2: a wrong bundle id or key makes APNs refuse every token, and not one
//! may be invalidated for it; refusals are applied only once the app has
//! proven its configuration with a success for another device.

use std::time::Duration;

use serde_json::json;
use voip_push_worker::doctor;
use voip_push_worker::event::{Environment, PushResult, Status};

use crate::common::{eventually, metric, random_token, TestEnv, BUNDLE};

/// The app the tokens really belong to at APNs: another app of the same team,
/// so APNs knows the worker's topic but not for these tokens.
const THEIR_BUNDLE: &str = "com.example.chat.enterprise";

/// Devices whose `invalidated_at` is set, with their reason.
async fn invalidated(env: &TestEnv) -> Vec<(String, String)> {
    let client = env.db.client().await;
    client
        .query(
            "SELECT voip_token, invalid_reason FROM devices WHERE invalidated_at IS NOT NULL",
            &[],
        )
        .await
        .expect("query")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Registers `token` with us for `user` in production, and at APNs for `bundle`.
async fn register(env: &TestEnv, user: &str, token: &str, bundle: &str) {
    env.sim
        .register_token(Environment::Production, token, bundle);
    env.store
        .register_device(user, BUNDLE, token, Some(Environment::Production))
        .await
        .expect("register device");
}

/// One call to each user; their single results.
async fn ring(env: &mut TestEnv, prefix: &str, users: &[String]) -> Vec<PushResult> {
    for u in users {
        env.publish(json!({"callId": format!("{prefix}-{u}"), "toUserId": u}))
            .await;
    }
    let mut out = Vec::new();
    for u in users {
        out.extend(env.results_for(&format!("{prefix}-{u}"), 1).await);
    }
    out
}

/// The doctor's `worker.apps` check against the running worker.
async fn worker_apps_check(env: &TestEnv) -> doctor::Check {
    let opts = doctor::Options {
        worker_url: Some(format!("http://{}", env.worker().http_addr)),
        ..Default::default()
    };
    let report = doctor::run(&env.cfg, &opts).await;
    report.find("worker.apps")[0].clone()
}

fn count(results: &[PushResult], status: Status) -> usize {
    results.iter().filter(|r| r.status == status).count()
}

#[tokio::test]
async fn a_wrong_bundle_id_invalidates_no_token_and_recovers_after_a_success() {
    let mut env = TestEnv::new().await;
    let users: Vec<String> = (0..40).map(|i| format!("wb{i}")).collect();
    let mut tokens = Vec::new();
    for u in &users {
        let t = random_token();
        register(&env, u, &t, THEIR_BUNDLE).await;
        tokens.push(t);
    }
    let results = ring(&mut env, "wb", &users).await;
    assert!(
        results
            .iter()
            .all(|r| r.reason.as_deref() == Some("DeviceTokenNotForTopic")),
        "{results:#?}"
    );
    assert_eq!(count(&results, Status::TokenInvalidated), 0);
    // The first 9 distinct devices are held as suspect; from the 10th on
    // (apns.misconfigured_after_devices) the app is held as misconfigured.
    assert_eq!(count(&results, Status::Failed), 9, "{results:#?}");
    assert_eq!(count(&results, Status::AppMisconfigured), 31);
    assert_eq!(invalidated(&env).await, []);
    env.wait_metric(
        &format!("voip_push_apns_app_misconfigured{{app=\"{BUNDLE}\"}}"),
        1.0,
    )
    .await;
    let text = env
        .wait_metric(
            &format!(
                "voip_push_apns_suspect_refusals_total{{app=\"{BUNDLE}\",reason=\"DeviceTokenNotForTopic\"}}"
            ),
            40.0,
        )
        .await;
    assert_eq!(
        metric(
            &text,
            "voip_push_deliveries_total{environment=\"production\",status=\"app_misconfigured\"}"
        ),
        31.0
    );

    // The doctor names the fix from the worker's state.
    let apps = worker_apps_check(&env).await;
    assert_eq!(apps.status, doctor::Status::Fail, "{apps:#?}");
    let fix = apps.fix.clone().unwrap_or_default();
    assert!(
        fix.contains(BUNDLE) && fix.contains("bundle_id of [[apns.apps]] #1"),
        "{fix}"
    );

    // Still misconfigured: the next rings fail the same way, and still no
    // token is touched.
    let again = ring(&mut env, "wb2", &users[..3]).await;
    assert_eq!(count(&again, Status::AppMisconfigured), 3, "{again:#?}");

    // APNs accepts a push for another device: the app recovers by itself.
    env.prove_app(&[Environment::Production]).await;
    env.wait_metric(
        &format!("voip_push_apns_app_misconfigured{{app=\"{BUNDLE}\"}}"),
        0.0,
    )
    .await;
    assert_eq!(worker_apps_check(&env).await.status, doctor::Status::Pass);
    // What was refused through the misconfiguration is not applied afterwards.
    assert_eq!(invalidated(&env).await, []);
    // Deliveries proceed: the tokens APNs takes now ring (as once the app's
    // configuration and its tokens agree).
    for t in &tokens[..3] {
        env.sim.register_token(Environment::Production, t, BUNDLE);
    }
    let after = ring(&mut env, "wb4", &users[..3]).await;
    assert_eq!(count(&after, Status::Delivered), 3, "{after:#?}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_topic_apns_does_not_know_fails_as_app_misconfigured_past_the_threshold() {
    let mut env = TestEnv::with(|cfg| {
        // A typo: no app of the team has this bundle id (TopicDisallowed).
        cfg.apns.apps[0].bundle_id = format!("{BUNDLE}.typo");
        cfg.apns.misconfigured_after_devices = 5;
    })
    .await;
    let bundle = env.cfg.apns.apps[0].bundle_id.clone();
    let users: Vec<String> = (0..12).map(|i| format!("td{i}")).collect();
    for u in &users {
        let t = random_token();
        env.sim.register_token(Environment::Production, &t, BUNDLE);
        env.store
            .register_device(u, &bundle, &t, Some(Environment::Production))
            .await
            .unwrap();
    }
    let results = ring(&mut env, "td", &users).await;
    assert!(results
        .iter()
        .all(|r| r.reason.as_deref() == Some("TopicDisallowed")));
    assert_eq!(count(&results, Status::Failed), 4, "{results:#?}");
    assert_eq!(count(&results, Status::AppMisconfigured), 8);
    assert_eq!(invalidated(&env).await, []);
    env.wait_metric(
        &format!("voip_push_apns_app_misconfigured{{app=\"{bundle}\"}}"),
        1.0,
    )
    .await;
    env.cleanup().await;
}

#[tokio::test]
async fn suspect_refusals_are_applied_once_the_app_has_proven_itself() {
    let mut env = TestEnv::new().await;
    // Not a token of this app at APNs (refused in production only) …
    let not_ours = random_token();
    register(&env, "sp1", &not_ours, THEIR_BUNDLE).await;
    // … and a token APNs knows in neither environment (refused in both).
    let unknown = random_token();
    env.store
        .register_device("sp2", BUNDLE, &unknown, None)
        .await
        .unwrap();
    let held = ring(&mut env, "sp", &["sp1".into(), "sp2".into()]).await;
    assert_eq!(
        count(&held, Status::Failed),
        2,
        "held as suspect: {held:#?}"
    );
    assert_eq!(invalidated(&env).await, []);

    // A success in production proves that environment: the production-only
    // refusal is applied; the one refused in both waits for the sandbox.
    env.prove_app(&[Environment::Production]).await;
    let wait = Duration::from_secs(10);
    eventually("the held refusal to be applied", wait, || async {
        let inv = invalidated(&env).await;
        (inv == [(not_ours.clone(), "DeviceTokenNotForTopic".to_string())]).then_some(())
    })
    .await;
    env.prove_app(&[Environment::Sandbox]).await;
    eventually("the refusal in both to be applied", wait, || async {
        let inv = invalidated(&env).await;
        (inv.len() == 2 && inv.contains(&(unknown.clone(), "BadDeviceToken".to_string())))
            .then_some(())
    })
    .await;
    env.wait_metric(
        "voip_push_tokens_invalidated_total{reason=\"BadDeviceToken\"}",
        1.0,
    )
    .await;
    // Proven: a refusal now is the token's own, applied at once.
    let dead = random_token();
    register(&env, "sp3", &dead, THEIR_BUNDLE).await;
    let r = &ring(&mut env, "sp-b", &["sp3".into()]).await[0];
    assert_eq!(r.status, Status::TokenInvalidated, "{r:?}");

    // The proof is this process's: a restarted worker (perhaps with another
    // configuration) holds a refusal again until its own first success,
    // whatever successes the table remembers.
    env.worker.take().expect("worker").stop().await;
    env.start_worker().await;
    let later = random_token();
    register(&env, "sp4", &later, THEIR_BUNDLE).await;
    let r = &ring(&mut env, "sp-c", &["sp4".into()]).await[0];
    assert_eq!(r.status, Status::Failed, "{r:?}");
    assert!(!invalidated(&env).await.iter().any(|(t, _)| *t == later));
    env.cleanup().await;
}
