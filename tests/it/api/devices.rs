//! Device registration: the app with its user's JWT, backends with the service
//! token, and registration events on RabbitMQ.

use std::time::Duration;

use serde_json::{json, Value};
use voip_push_worker::api::jwt::sign_hs256;
use voip_push_worker::event::Environment;

use super::{
    all_groups, assert_error, bearer, now, req, tokens_of, user_jwt, CHUTALK, SERVICE_TOKEN,
    USER_JWT_SECRET,
};
use crate::common::{eventually, random_token, TestEnv, BUNDLE};

#[tokio::test]
async fn app_registers_its_own_token_with_a_user_jwt() {
    let env = TestEnv::with(all_groups).await;
    let token = random_token().to_ascii_uppercase();
    let body = format!(
        r#"{{"platform":"ios","bundleId":"rcc.takaokanet.com.ChuTalk","voipDeviceToken":"{token}"}}"#
    );
    let jwt10 = bearer(&user_jwt("10", 600, USER_JWT_SECRET));
    let as10 = Some(("Authorization", jwt10.as_str()));

    // Bad credentials and bad tokens change nothing.
    let refused = [
        (None, 401),
        (Some(bearer(&user_jwt("10", 600, "not-the-secret"))), 401),
        (Some(bearer(&user_jwt("10", -3600, USER_JWT_SECRET))), 401),
        (Some("Bearer not.a.jwt".to_string()), 401),
        (Some(bearer(SERVICE_TOKEN)), 403),
        // Without `exp` a leaked token would be good for ever.
        (
            Some(bearer(&sign_hs256(
                &json!({"alg":"HS256","typ":"JWT"}),
                &json!({"sub": "10", "iat": now()}),
                USER_JWT_SECRET.as_bytes(),
            ))),
            401,
        ),
        // A subject with a control character is no user id.
        (
            Some(bearer(&user_jwt("1\u{0}0", 600, USER_JWT_SECRET))),
            401,
        ),
    ];
    for (auth, want) in &refused {
        let auth = auth.as_deref().map(|a| ("Authorization", a));
        let got = req(&env, "PUT", "/api/v1/me/devices", auth, &body).await;
        assert_eq!(got.0, *want, "{auth:?}: {got:?}");
    }
    for bad in ["abc", "zz00", &"ab".repeat(101)] {
        let b = format!(r#"{{"platform":"ios","bundleId":"{CHUTALK}","voipDeviceToken":"{bad}"}}"#);
        assert_error(
            &req(&env, "PUT", "/api/v1/me/devices", as10, &b).await,
            400,
            "bad_token",
        );
    }
    let android =
        format!(r#"{{"platform":"android","bundleId":"{CHUTALK}","voipDeviceToken":"{token}"}}"#);
    assert_error(
        &req(&env, "PUT", "/api/v1/me/devices", as10, &android).await,
        400,
        "bad_platform",
    );
    assert!(tokens_of(&env, "10", CHUTALK).await.is_empty());

    // The app's request, verbatim: stored lower-cased for the JWT's subject.
    let (status, answer) = req(&env, "PUT", "/api/v1/me/devices", as10, &body).await;
    assert_eq!(status, 200, "{answer}");
    let lower = token.to_ascii_lowercase();
    assert_eq!(tokens_of(&env, "10", CHUTALK).await, vec![lower.clone()]);

    // An invalidated token comes back to life on re-registration, with a fresh
    // registration time.
    let before = env.store.live_devices("10", CHUTALK).await.unwrap()[0].clone();
    assert!(env
        .store
        .invalidate(before.id, "Unregistered", None)
        .await
        .unwrap());
    assert!(tokens_of(&env, "10", CHUTALK).await.is_empty());
    assert_eq!(
        req(&env, "PUT", "/api/v1/me/devices", as10, &body).await.0,
        200
    );
    let after = env.store.live_devices("10", CHUTALK).await.unwrap()[0].clone();
    assert_eq!(after.id, before.id);
    assert!(after.updated_at_ms >= before.updated_at_ms);

    // The same phone signed in as another user: the token moves.
    let jwt11 = bearer(&user_jwt("11", 600, USER_JWT_SECRET));
    let as11 = Some(("Authorization", jwt11.as_str()));
    assert_eq!(
        req(&env, "PUT", "/api/v1/me/devices", as11, &body).await.0,
        200
    );
    assert!(tokens_of(&env, "10", CHUTALK).await.is_empty());
    assert_eq!(tokens_of(&env, "11", CHUTALK).await, vec![lower]);
    env.cleanup().await;
}

#[tokio::test]
async fn backends_register_and_unregister_with_the_service_token() {
    let env = TestEnv::with(all_groups).await;
    let service = bearer(SERVICE_TOKEN);
    let auth = Some(("Authorization", service.as_str()));
    let token = random_token();
    let body = format!(r#"{{"userId":42,"token":"{token}","environment":"sandbox"}}"#);
    let (status, answer) = req(&env, "PUT", "/v1/devices", auth, &body).await;
    assert_eq!(status, 200, "{answer}");
    let devices = env.store.live_devices("42", BUNDLE).await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].environment, Some(Environment::Sandbox));
    assert_eq!(answer["deviceId"], devices[0].id);

    let jwt = bearer(&user_jwt("42", 600, USER_JWT_SECRET));
    let as_user = Some(("Authorization", jwt.as_str()));
    let path = format!("/v1/devices/{token}");
    assert_eq!(req(&env, "DELETE", &path, as_user, "").await.0, 403);
    assert_eq!(req(&env, "DELETE", &path, None, "").await.0, 401);
    assert_error(
        &req(&env, "DELETE", "/v1/devices/xyz", auth, "").await,
        400,
        "bad_token",
    );
    assert_eq!(tokens_of(&env, "42", BUNDLE).await, vec![token.clone()]);
    let upper = format!("/v1/devices/{}", token.to_ascii_uppercase());
    assert_eq!(req(&env, "DELETE", &upper, auth, "").await.0, 204);
    assert!(tokens_of(&env, "42", BUNDLE).await.is_empty());

    // Every request above is counted by its route's template and status code;
    // no token ever becomes a label.
    let (_, text) = env.http_get("/metrics").await;
    let count = |labels: &str| {
        crate::common::metric(&text, &format!("voip_push_api_requests_total{{{labels}}}"))
    };
    assert_eq!(count(r#"code="200",route="/v1/devices""#), 1.0);
    assert_eq!(count(r#"code="401",route="/v1/devices/{token}""#), 1.0);
    assert_eq!(count(r#"code="403",route="/v1/devices/{token}""#), 1.0);
    assert_eq!(count(r#"code="400",route="/v1/devices/{token}""#), 1.0);
    assert_eq!(count(r#"code="204",route="/v1/devices/{token}""#), 1.0);
    assert_eq!(
        crate::common::metric(
            &text,
            r#"voip_push_api_request_duration_seconds_count{route="/v1/devices/{token}"}"#
        ),
        4.0
    );
    assert!(
        !text.to_ascii_lowercase().contains(&token[..16]),
        "a token leaked into /metrics"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn registration_events_on_the_devices_exchange() {
    let exchange = crate::common::unique("it.devices.");
    let queue = crate::common::unique("it.devices.q.");
    let (x, q) = (exchange.clone(), queue.clone());
    let env = TestEnv::with(move |cfg| {
        cfg.devices.exchange = x;
        cfg.devices.queue = q;
    })
    .await;
    let publish = |key: &'static str, body: Value| {
        let env = &env;
        let exchange = exchange.clone();
        async move {
            let props =
                lapin::BasicProperties::default().with_content_type("application/json".into());
            // The worker declares the exchange once it consumes: retry until then.
            eventually("the devices exchange", Duration::from_secs(20), || {
                let (props, body, exchange) = (props.clone(), body.to_string(), exchange.clone());
                async move {
                    env.publisher
                        .publish(&exchange, key, body.as_bytes(), props)
                        .await
                        .ok()
                }
            })
            .await;
        }
    };
    // The exchange exists a moment before the worker's queue is bound to it: wait
    // for the worker to consume, or the first registrations would go nowhere.
    eventually("the devices consumer", Duration::from_secs(20), || {
        let (cfg, queue) = (env.cfg.amqp.clone(), queue.clone());
        async move {
            let conn = voip_push_worker::amqp::connect(&cfg, "test probe")
                .await
                .ok()?;
            let ch = conn.create_channel().await.ok()?;
            let q = ch
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .ok();
            let _ = conn.close(200, "done".into()).await;
            q.filter(|q| q.consumer_count() > 0).map(|_| ())
        }
    })
    .await;
    let token = random_token().to_ascii_uppercase();
    let lower = token.to_ascii_lowercase();
    publish("device.register", json!({"userId":"e1","token":"nothex"})).await;
    publish(
        "device.register",
        json!({"userId":"e1","token":token,"environment":"production"}),
    )
    .await;
    let devices = eventually("the registration", Duration::from_secs(10), || async {
        let d = env.store.live_devices("e1", BUNDLE).await.unwrap();
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(devices.len(), 1, "the malformed token was not stored");
    assert_eq!(devices[0].token, lower);
    assert_eq!(devices[0].environment, Some(Environment::Production));

    // What cannot be applied is dead-lettered with its reason, not dropped.
    publish(
        "device.register",
        json!({"userId":"e\u{0}1","token":random_token()}),
    )
    .await;
    publish("device.register", json!({"token":random_token()})).await;
    let mut reasons = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while reasons.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "dead-lettered registrations: {reasons:?}"
        );
        let got = env
            .dead_letters_in(&env.cfg.devices.dead_letter_queue)
            .await;
        reasons.extend(got.into_iter().map(|(_, r)| r.unwrap_or_default()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reasons.sort();
    assert_eq!(reasons, ["bad_field", "bad_field", "missing_field"]);
    env.wait_metric(
        "voip_push_dead_letters_total{lane=\"devices\",reason=\"bad_field\"}",
        2.0,
    )
    .await;

    // A move to another user, then an unregister.
    publish("device.register", json!({"userId":"e2","token":token})).await;
    eventually("the move", Duration::from_secs(10), || async {
        (tokens_of(&env, "e2", BUNDLE).await == vec![lower.clone()]).then_some(())
    })
    .await;
    assert!(tokens_of(&env, "e1", BUNDLE).await.is_empty());
    publish("device.unregister", json!({"token":token})).await;
    eventually("the unregister", Duration::from_secs(10), || async {
        tokens_of(&env, "e2", BUNDLE).await.is_empty().then_some(())
    })
    .await;

    let cfg = env.cfg.amqp.clone();
    env.cleanup().await;
    if let Ok(conn) = voip_push_worker::amqp::connect(&cfg, "test cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
            let _ = ch
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
}
