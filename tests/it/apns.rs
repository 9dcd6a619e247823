//! The APNs client against the simulator over real TLS + HTTP/2 with real ES256
//! provider tokens: Apple's rules, and the worker's fallback and retries.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use voip_push_worker::apns::token::{unix_now, SigningKey};
use voip_push_worker::apns::{ApnsClient, ClientSettings, PushRequest};
use voip_push_worker::apns_sim::{ApnsSim, SimApp, SimOptions};
use voip_push_worker::event::{Environment, Status};
use voip_push_worker::metrics::Metrics;

use crate::common::{metric, random_token, scripted, TestEnv, TestKey, BUNDLE};

pub(crate) struct Rig {
    pub(crate) sim: ApnsSim,
    pub(crate) client: ApnsClient,
    pub(crate) key: SigningKey,
    /// One provider token for the rig's connections, as APNs expects.
    pub(crate) jwt: Arc<str>,
    _key_files: TestKey,
}

/// Our client, trusting the simulator's CA, one connection per environment.
pub(crate) fn sim_client(sim: &ApnsSim) -> ApnsClient {
    ApnsClient::new(sim_settings(sim), Metrics::new()).unwrap()
}

/// Client settings for `sim`: trusting its CA, one connection per environment.
pub fn sim_settings(sim: &ApnsSim) -> ClientSettings {
    ClientSettings {
        production_url: sim.production_url(),
        sandbox_url: sim.sandbox_url(),
        extra_roots_pem: Some(sim.ca_pem.clone().into_bytes()),
        connections_per_environment: 1,
        request_timeout: Duration::from_secs(5),
        pings: voip_push_worker::config::ApnsConfig::default().ping_settings(),
    }
}

pub(crate) async fn rig() -> Rig {
    let key_files = TestKey::new(BUNDLE, "TEAMAAAAAA", "KEYAAAAAAA");
    let sim = ApnsSim::start(SimOptions::local(
        SimApp::from_config(std::slice::from_ref(&key_files.app)).unwrap(),
    ))
    .await
    .unwrap();
    let client = sim_client(&sim);
    let key =
        SigningKey::from_p8_file(&key_files.app.key_file, "TEAMAAAAAA", "KEYAAAAAAA").unwrap();
    Rig {
        sim,
        client,
        jwt: Arc::from(key.sign(unix_now())),
        key,
        _key_files: key_files,
    }
}

pub(crate) fn request(token: &str, jwt: &Arc<str>) -> PushRequest {
    PushRequest {
        push_type: Default::default(),
        token: token.into(),
        topic: format!("{BUNDLE}.voip"),
        provider_token: jwt.clone(),
        apns_id: uuid::Uuid::new_v4(),
        expiration: unix_now() + 45,
        priority: 10,
        collapse_id: "call-1".into(),
        payload: Bytes::from(
            json!({"type":"call.incoming","callId":"call-1","aps":{}}).to_string(),
        ),
    }
}

pub(crate) async fn answer(
    rig: &Rig,
    env: Environment,
    req: &PushRequest,
) -> (u16, Option<String>) {
    let r = rig
        .client
        .send(env, req, Duration::from_secs(5))
        .await
        .expect("an answer");
    (r.status, r.reason)
}

#[tokio::test]
async fn sandbox_token_registered_as_production_falls_back_and_is_learned() {
    let mut env = TestEnv::new().await;
    let token = env
        .device("20", Some(Environment::Production), Environment::Sandbox)
        .await;
    env.publish(json!({"callId":"fb-1","toUserId":20})).await;
    let r = &env.results_for("fb-1", 1).await[0];
    assert_eq!(r.status, Status::Delivered);
    assert!(r.fallback_used);
    assert_eq!(r.environment, Some(Environment::Sandbox));
    assert_eq!(r.attempts, 2);
    let first: Vec<_> = env
        .sim
        .requests()
        .iter()
        .map(|q| (q.environment, q.status))
        .collect();
    assert_eq!(
        first,
        vec![(Environment::Production, 400), (Environment::Sandbox, 200)]
    );
    // The environment is learned with the outcome, recorded after the result.
    env.recorded_trace("fb-1").await;
    let learned = env.store.live_devices("20", BUNDLE).await.unwrap();
    assert_eq!(learned[0].environment, Some(Environment::Sandbox));

    // The second call goes straight to the sandbox: one request.
    env.publish(json!({"callId":"fb-2","toUserId":20})).await;
    let r = &env.results_for("fb-2", 1).await[0];
    assert_eq!(
        (r.status, r.fallback_used, r.attempts),
        (Status::Delivered, false, 1)
    );
    let second: Vec<_> = env
        .sim
        .requests()
        .into_iter()
        .filter(|q| q.headers["apns-collapse-id"] == "fb-2")
        .map(|q| (q.environment, q.token))
        .collect();
    assert_eq!(second, vec![(Environment::Sandbox, token)]);

    let (_, text) = env.http_get("/metrics").await;
    assert_eq!(
        metric(
            &text,
            "voip_push_environment_fallbacks_total{from=\"production\",result=\"delivered\",to=\"sandbox\"}"
        ),
        1.0
    );
    env.cleanup().await;
}

/// Requests the simulator received for `token`.
fn requests_to(env: &TestEnv, token: &str) -> usize {
    env.sim
        .requests()
        .iter()
        .filter(|q| q.token == token)
        .count()
}

#[tokio::test]
async fn token_refused_by_both_environments_is_invalidated_and_never_pushed_again() {
    let mut env = TestEnv::new().await;
    // Once the app's configuration is proven in both (the misconfiguration guard).
    env.prove_app(&[Environment::Production, Environment::Sandbox])
        .await;
    // Registered with us, unknown to APNs in either environment.
    let token = random_token();
    env.store
        .register_device("30", BUNDLE, &token, None)
        .await
        .unwrap();
    env.publish(json!({"callId":"inv-1","toUserId":30})).await;
    let r = &env.results_for("inv-1", 1).await[0];
    assert_eq!(r.status, Status::TokenInvalidated);
    assert_eq!(r.reason.as_deref(), Some("BadDeviceToken"));
    assert!(env
        .store
        .live_devices("30", BUNDLE)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(requests_to(&env, &token), 2);

    env.publish(json!({"callId":"inv-2","toUserId":30})).await;
    assert_eq!(
        env.results_for("inv-2", 1).await[0].status,
        Status::NoDevice
    );
    assert_eq!(
        requests_to(&env, &token),
        2,
        "an invalidated token is never pushed to"
    );
    let (_, text) = env.http_get("/metrics").await;
    assert_eq!(
        metric(
            &text,
            "voip_push_tokens_invalidated_total{reason=\"BadDeviceToken\"}"
        ),
        1.0
    );
    env.cleanup().await;
}

#[tokio::test]
async fn transient_errors_are_retried_with_one_apns_id() {
    let mut env = TestEnv::new().await;
    let token = env
        .device("40", Some(Environment::Production), Environment::Production)
        .await;
    let unavailable = scripted(503, "ServiceUnavailable");
    env.sim.script(&token, [unavailable.clone(), unavailable]);
    env.publish(json!({"callId":"retry-1","toUserId":40})).await;
    let r = &env.results_for("retry-1", 1).await[0];
    assert_eq!((r.status, r.attempts), (Status::Delivered, 3));
    let requests = env.sim.requests();
    let statuses: Vec<u16> = requests.iter().map(|q| q.status).collect();
    assert_eq!(statuses, vec![503, 503, 200]);
    let ids: std::collections::HashSet<_> = requests
        .iter()
        .map(|q| q.headers["apns-id"].clone())
        .collect();
    assert_eq!(ids.len(), 1, "every attempt carries the same apns-id");
    assert_eq!(r.apns_id.as_ref(), ids.iter().next());
    let (_, text) = env.http_get("/metrics").await;
    assert_eq!(
        metric(
            &text,
            "voip_push_retries_total{reason=\"ServiceUnavailable\"}"
        ),
        2.0
    );
    env.cleanup().await;
}

#[tokio::test]
async fn endless_503_stops_at_the_ring_deadline() {
    let mut env = TestEnv::new().await;
    let token = env
        .device("50", Some(Environment::Production), Environment::Production)
        .await;
    env.sim.script(
        &token,
        std::iter::repeat_n(scripted(503, "ServiceUnavailable"), 10_000),
    );
    let started = std::time::Instant::now();
    env.publish(json!({"callId":"endless","toUserId":50,"ringTimeoutSecs":2}))
        .await;
    let r = &env.results_for("endless", 1).await[0];
    assert_eq!(r.status, Status::Expired);
    assert!(r.attempts > 2, "retried: {}", r.attempts);
    assert_eq!(r.apns_status, Some(503));
    let last = env.sim.requests().iter().map(|q| q.at_ms).max().unwrap();
    let first = env.sim.requests().iter().map(|q| q.at_ms).min().unwrap();
    assert!(
        last - first < 2_000,
        "no attempt after the 2 s ring deadline"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    env.cleanup().await;
}

#[tokio::test]
async fn configuration_errors_fail_at_once() {
    let mut env = TestEnv::new().await;
    let token = env
        .device("60", Some(Environment::Production), Environment::Production)
        .await;
    env.sim.script(&token, [scripted(400, "TopicDisallowed")]);
    env.publish(json!({"callId":"cfg-1","toUserId":60})).await;
    let r = &env.results_for("cfg-1", 1).await[0];
    assert_eq!((r.status, r.attempts), (Status::Failed, 1));
    assert_eq!(r.reason.as_deref(), Some("TopicDisallowed"));
    assert_eq!(
        env.store.live_devices("60", BUNDLE).await.unwrap().len(),
        1,
        "the token stays live"
    );
    env.cleanup().await;
}
