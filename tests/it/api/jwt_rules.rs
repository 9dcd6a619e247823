//! User JWTs under `http.user_jwt_issuer`, `user_jwt_audience` and
//! `user_jwt_max_lifetime_secs`: a token of another issuer or audience, or one
//! good for longer than allowed, registers nothing.

use serde_json::{json, Value};
use voip_push_worker::api::jwt::sign_hs256;

use super::{all_groups, assert_error, bearer, now, register_mine, tokens_of, USER_JWT_SECRET};
use crate::common::{random_token, TestEnv, BUNDLE};

const ISSUER: &str = "https://auth.example.com";
const AUDIENCE: &str = "voip-push";

fn jwt(claims: Value) -> String {
    bearer(&sign_hs256(
        &json!({"alg":"HS256","typ":"JWT"}),
        &claims,
        USER_JWT_SECRET.as_bytes(),
    ))
}

#[tokio::test]
async fn user_jwts_must_match_issuer_audience_and_lifetime() {
    let env = TestEnv::with(|cfg| {
        all_groups(cfg);
        cfg.http.user_jwt_issuer = Some(ISSUER.into());
        cfg.http.user_jwt_audience = Some(AUDIENCE.into());
        cfg.http.user_jwt_max_lifetime_secs = 86_400;
    })
    .await;
    let t = now();
    let good = json!({"sub":"j1","iss":ISSUER,"aud":AUDIENCE,"iat":t,"exp":t + 3600});
    let with = |field: &str, value: Value| {
        let mut c = good.clone();
        if value.is_null() {
            c.as_object_mut().unwrap().remove(field);
        } else {
            c[field] = value;
        }
        c
    };
    let refused = [
        (
            "another issuer",
            with("iss", json!("https://evil.example.com")),
        ),
        ("no issuer", with("iss", Value::Null)),
        ("another audience", with("aud", json!("billing"))),
        ("no audience", with("aud", Value::Null)),
        ("good for two days", with("exp", json!(t + 2 * 86_400))),
        (
            "two days from now, no iat",
            json!({"sub":"j1","iss":ISSUER,"aud":AUDIENCE,"exp":t + 2 * 86_400}),
        ),
    ];
    for (what, claims) in refused {
        let got = register_mine(&env, &jwt(claims), &random_token()).await;
        assert_error(&got, 401, "unauthorized");
        assert!(
            tokens_of(&env, "j1", BUNDLE).await.is_empty(),
            "{what} registered"
        );
    }

    // The right token, with the audience in a list, registers.
    let token = random_token();
    let auth = jwt(with("aud", json!(["other", AUDIENCE])));
    let got = register_mine(&env, &auth, &token).await;
    assert_eq!(got.0, 200, "{got:?}");
    assert_eq!(tokens_of(&env, "j1", BUNDLE).await, vec![token]);
    env.cleanup().await;
}
