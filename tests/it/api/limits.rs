//! Request limits: body size, and the registration rate limit per client
//! address (the socket peer, or `X-Forwarded-For` through trusted proxies only).

use voip_push_worker::config::Config;

use super::{all_groups, assert_error, bearer, req, tokens_of, SERVICE_TOKEN};
use crate::common::{http_request_with_headers, random_token, TestEnv, BUNDLE};

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

/// Registrations with `X-Forwarded-For: xff` each: the status codes.
async fn register_from(env: &TestEnv, forwarded_for: &[&str]) -> Vec<u16> {
    let service = bearer(SERVICE_TOKEN);
    let mut codes = Vec::new();
    for xff in forwarded_for {
        let body = format!(r#"{{"userId":"xff","token":"{}"}}"#, random_token());
        let headers = [
            ("Authorization", service.as_str()),
            ("X-Forwarded-For", xff),
        ];
        let (status, _) = http_request_with_headers(
            env.worker().http_addr,
            "PUT",
            "/v1/devices",
            &headers,
            &body,
        )
        .await;
        codes.push(status);
    }
    codes
}

fn one_per_client(cfg: &mut Config) {
    all_groups(cfg);
    cfg.http.rate_limit_burst = 1;
    cfg.http.rate_limit_per_minute = 1;
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let env = TestEnv::with(one_per_client).await;
    // The test's socket (127.0.0.1) is the client, whatever the header says.
    let codes = register_from(&env, &["198.51.100.1", "198.51.100.2", "198.51.100.3"]).await;
    assert_eq!(codes, [200, 429, 429]);
    env.cleanup().await;
}

#[tokio::test]
async fn forwarded_for_through_a_trusted_proxy_names_the_client() {
    let env = TestEnv::with(|cfg| {
        one_per_client(cfg);
        cfg.http.trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    let codes = register_from(
        &env,
        &[
            "198.51.100.1",
            "198.51.100.2",
            "198.51.100.1",
            // A client's own entry on the left does not buy it a new bucket.
            "203.0.113.50, 198.51.100.2",
        ],
    )
    .await;
    assert_eq!(codes, [200, 200, 429, 429]);
    env.cleanup().await;
}
