//! Request limits: body size, and the registration rate limit per client address.

use super::{all_groups, assert_error, bearer, req, tokens_of, SERVICE_TOKEN};
use crate::common::{random_token, TestEnv, BUNDLE};

#[tokio::test]
async fn oversized_bodies_are_413_and_registration_is_rate_limited() {
    let env = TestEnv::with(|cfg| {
        all_groups(cfg);
        cfg.http.max_body_bytes = 1024;
        cfg.http.rate_limit_burst = 3;
        cfg.http.rate_limit_per_minute = 1;
    })
    .await;
    let service = bearer(SERVICE_TOKEN);
    let auth = Some(("Authorization", service.as_str()));
    let big = format!(
        r#"{{"toUserId":10,"callId":"big","fromDisplayName":"{}"}}"#,
        "x".repeat(2000)
    );
    assert_error(
        &req(&env, "POST", "/v1/calls", auth, &big).await,
        413,
        "too_large",
    );

    // Three registrations fill the bucket; the fourth is refused and not stored.
    let tokens: Vec<String> = (0..4).map(|_| random_token()).collect();
    for (i, t) in tokens.iter().enumerate() {
        let body = format!(r#"{{"userId":"rl","token":"{t}"}}"#);
        let got = req(&env, "PUT", "/v1/devices", auth, &body).await;
        if i < 3 {
            assert_eq!(got.0, 200, "{got:?}");
        } else {
            assert_error(&got, 429, "rate_limited");
        }
    }
    let mut stored = tokens_of(&env, "rl", BUNDLE).await;
    let mut want = tokens[..3].to_vec();
    stored.sort();
    want.sort();
    assert_eq!(stored, want);
    // Ingestion is not rate limited.
    let (status, _) = req(
        &env,
        "POST",
        "/v1/calls",
        auth,
        r#"{"toUserId":"rl","callId":"after-limit"}"#,
    )
    .await;
    assert_eq!(status, 202);
    env.cleanup().await;
}
