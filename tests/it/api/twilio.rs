//! The Twilio group: VoIP token registration per identity, and access tokens.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use voip_push_worker::api::jwt::Verifier;

use super::{
    all_groups, assert_error, bearer, now, req, tokens_of, user_jwt, SERVICE_TOKEN, TWILIO_SECRET,
    USER_JWT_SECRET,
};
use crate::common::{random_token, TestEnv, BUNDLE};

#[tokio::test]
async fn twilio_backend_registers_voip_tokens_per_identity() {
    let env = TestEnv::with(all_groups).await;
    let token = random_token();
    let jwt = bearer(&user_jwt("alice", 600, USER_JWT_SECRET));
    let alice = Some(("Authorization", jwt.as_str()));
    let path = "/users/alice/voip-token";
    let invalid = json!({"error": "Invalid platform or missing token"});

    for body in [
        format!(r#"{{"deviceToken":"{token}","platform":"android"}}"#),
        r#"{"platform":"ios"}"#.to_string(),
        format!(r#"{{"deviceToken":"{token}"}}"#),
    ] {
        assert_eq!(
            req(&env, "POST", path, alice, &body).await,
            (400, invalid.clone()),
            "{body}"
        );
    }
    let body = format!(r#"{{"deviceToken":"{token}","platform":"ios"}}"#);
    let bob = bearer(&user_jwt("bob", 600, USER_JWT_SECRET));
    assert_error(
        &req(&env, "POST", path, Some(("Authorization", &bob)), &body).await,
        403,
        "forbidden",
    );
    assert_error(
        &req(&env, "POST", path, None, &body).await,
        401,
        "unauthorized",
    );
    assert!(tokens_of(&env, "alice", BUNDLE).await.is_empty());

    assert_eq!(
        req(&env, "POST", path, alice, &body).await,
        (200, json!({"success": true}))
    );
    assert_eq!(tokens_of(&env, "alice", BUNDLE).await, vec![token]);

    // A backend may register for anyone with the service token.
    let service = bearer(SERVICE_TOKEN);
    let other = random_token();
    let body = format!(r#"{{"deviceToken":"{other}","platform":"ios"}}"#);
    let got = req(
        &env,
        "POST",
        "/users/carol/voip-token",
        Some(("Authorization", &service)),
        &body,
    )
    .await;
    assert_eq!(got.0, 200, "{got:?}");
    assert_eq!(tokens_of(&env, "carol", BUNDLE).await, vec![other]);
    env.cleanup().await;
}

#[tokio::test]
async fn twilio_token_verifies_and_carries_the_voice_grant() {
    let env = TestEnv::with(all_groups).await;
    let token = random_token();
    let jwt = bearer(&user_jwt("alice", 600, USER_JWT_SECRET));
    let alice = Some(("Authorization", jwt.as_str()));
    let body = format!(r#"{{"identity":"alice","platform":"ios","deviceToken":"{token}"}}"#);

    let bob = bearer(&user_jwt("bob", 600, USER_JWT_SECRET));
    assert_error(
        &req(
            &env,
            "POST",
            "/twilio/token",
            Some(("Authorization", &bob)),
            &body,
        )
        .await,
        403,
        "forbidden",
    );
    assert!(tokens_of(&env, "alice", BUNDLE).await.is_empty());

    let (status, answer) = req(&env, "POST", "/twilio/token", alice, &body).await;
    assert_eq!(status, 200, "{answer}");
    let access = answer["token"].as_str().unwrap();
    let claims = Verifier::hs256(TWILIO_SECRET.as_bytes())
        .verify(access, now())
        .expect("signed with the API key secret");
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(access.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        header,
        json!({"typ":"JWT","alg":"HS256","cty":"twilio-fpa;v=1"})
    );
    let sk = "SK0123456789abcdef0123456789abcdef";
    assert_eq!(claims["iss"], sk);
    assert_eq!(claims["sub"], "AC0123456789abcdef0123456789abcdef");
    assert!(claims["jti"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{sk}-")));
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(claims["exp"].as_i64().unwrap() - iat, 3600);
    let grants = &claims["grants"];
    assert_eq!(grants["identity"], "alice");
    assert_eq!(
        grants["voice"]["push_credential_sid"],
        "CR0123456789abcdef0123456789abcdef"
    );
    assert_eq!(
        grants["voice"]["outgoing"]["application_sid"],
        "AP0123456789abcdef0123456789abcdef"
    );
    assert_eq!(grants["voice"]["incoming"]["allow"], true);
    assert_eq!(tokens_of(&env, "alice", BUNDLE).await, vec![token]);
    assert!(Verifier::hs256(b"other").verify(access, now()).is_err());
    env.cleanup().await;
}
