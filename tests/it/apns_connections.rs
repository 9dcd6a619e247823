//! APNs connections under trouble: stalled, sent GOAWAY, dropped, and proven
//! devices kept apart from a storm of dead tokens.

use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use voip_push_worker::apns_sim::Scripted;
use voip_push_worker::event::{Environment, Status};

use crate::common::{metric, random_token, scripted, TestEnv, BUNDLE};

/// A connection that goes silent under a push is PINGed once the push has been
/// unanswered for `apns.probe_after_ms`, retired when the PING goes unanswered
/// too, and the push resent on a fresh connection: seconds, at the default
/// settings, not the 10 s request timeout. The lost attempt says `unanswered`.
#[tokio::test]
async fn stalled_connection_is_found_by_ping_and_the_push_resent_in_seconds() {
    let mut env = TestEnv::with(|cfg| cfg.apns.connections_per_environment = 1).await;
    env.device(
        "120",
        Some(Environment::Production),
        Environment::Production,
    )
    .await;
    // Two calls: the first proves the token (on a probation connection), the
    // second opens the connection proven tokens use: the one the fault hits.
    for warm in ["stall-0", "stall-00"] {
        env.publish(json!({"callId": warm, "toUserId": 120})).await;
        assert_eq!(env.results_for(warm, 1).await[0].status, Status::Delivered);
    }
    let before = env.sim.connections_accepted();

    // The network black-holes the open connection: no answers, no PING replies.
    env.sim.stall_existing_connections();
    let struck = Instant::now();
    env.publish(json!({"callId":"stall-1","toUserId":120,"ringTimeoutSecs":20}))
        .await;
    let r = &env.results_for("stall-1", 1).await[0];
    let recovered = struck.elapsed();
    println!("stalled connection: delivered {recovered:.1?} after the stall, {r:?}");
    assert_eq!(r.status, Status::Delivered, "{r:?}");
    assert_eq!(r.attempts, 2, "{r:?}");
    // The request timeout is 10 s; PING probing finds the dead path in ~2 s.
    assert!(
        recovered < Duration::from_secs(5),
        "delivered {recovered:?} after the stall"
    );
    assert!(
        env.sim.connections_accepted() > before,
        "a new connection was opened"
    );
    let trace = env.recorded_trace("stall-1").await;
    let reasons: Vec<_> = trace.deliveries[0]
        .attempts
        .iter()
        .map(|a| (a.apns_status, a.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        [(None, Some("unanswered".into())), (Some(200), None)],
        "the lost attempt is recorded as unanswered"
    );
    assert!(
        voip_push_worker::trace::render(&trace).contains("unanswered: may have rung"),
        "{}",
        voip_push_worker::trace::render(&trace)
    );
    let delivered: Vec<_> = env
        .sim
        .requests()
        .into_iter()
        .filter(|q| q.headers["apns-collapse-id"] == "stall-1" && q.status == 200)
        .collect();
    assert_eq!(delivered.len(), 1);
    let metrics = env.http_get("/metrics").await.1;
    assert_eq!(
        metric(
            &metrics,
            r#"voip_push_apns_connections_retired_total{environment="production",kind="probe"}"#
        ),
        1.0
    );
    env.cleanup().await;
}

/// Idle connections are PINGed every `apns.ping_interval_secs`, as Apple asks:
/// one whose path died is retired before a ring needs it.
#[tokio::test]
async fn idle_connection_that_stops_answering_pings_is_retired() {
    let mut env = TestEnv::with(|cfg| {
        cfg.apns.ping_interval_secs = 1;
        cfg.apns.ping_timeout_secs = 1;
    })
    .await;
    env.device(
        "125",
        Some(Environment::Production),
        Environment::Production,
    )
    .await;
    env.publish(json!({"callId": "idle-0", "toUserId": 125}))
        .await;
    assert_eq!(
        env.results_for("idle-0", 1).await[0].status,
        Status::Delivered
    );

    env.sim.stall_existing_connections();
    env.wait_metric(
        r#"voip_push_apns_connections_retired_total{environment="production",kind="idle"}"#,
        1.0,
    )
    .await;
    let metrics = env.http_get("/metrics").await.1;
    assert!(
        metric(
            &metrics,
            r#"voip_push_apns_pings_total{environment="production",kind="idle"}"#
        ) >= 1.0,
        "the retiring PING is counted"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn goaway_moves_pushes_to_a_new_connection() {
    let mut env = TestEnv::with(|cfg| cfg.apns.connections_per_environment = 1).await;
    env.device(
        "130",
        Some(Environment::Production),
        Environment::Production,
    )
    .await;
    // Two calls: the first proves the token (on a probation connection), the
    // second opens the connection proven tokens use: the one the fault hits.
    for warm in ["ga-0", "ga-00"] {
        env.publish(json!({"callId": warm, "toUserId": 130})).await;
        assert_eq!(env.results_for(warm, 1).await[0].status, Status::Delivered);
    }
    let before = env.sim.connections_accepted();
    env.sim.goaway();
    // The client notices the GOAWAY (connection closed) and reconnects.
    for i in 1..=3 {
        let call = format!("ga-{i}");
        env.publish(json!({"callId": call, "toUserId":130})).await;
        assert_eq!(env.results_for(&call, 1).await[0].status, Status::Delivered);
    }
    assert!(env.sim.connections_accepted() > before);
    env.cleanup().await;
}

#[tokio::test]
async fn a_storm_of_dead_tokens_does_not_hold_up_a_proven_device() {
    let mut env = TestEnv::with(|cfg| {
        cfg.apns.connections_per_environment = 1;
        // Twelve refusals in a row would otherwise take the app's proof back.
        cfg.apns.misconfigured_after_devices = 20;
    })
    .await;
    // Refusals in both environments invalidate only once both are proven.
    env.prove_app(&[Environment::Sandbox]).await;
    let victim = env.device("victim", None, Environment::Production).await;
    env.publish(json!({"callId":"warm-up","toUserId":"victim"}))
        .await;
    assert_eq!(
        env.results_for("warm-up", 1).await[0].status,
        Status::Delivered
    );

    // Twelve tokens APNs never accepted, each refused slowly in both environments:
    // on a connection cut to one stream after a rejection, that is a queue of 6 s.
    let slow_refusal = Scripted {
        delay_ms: 250,
        ..scripted(400, "BadDeviceToken")
    };
    let mut dead = HashSet::new();
    for _ in 0..12 {
        let t = random_token();
        env.store
            .register_device("storm", BUNDLE, &t, None)
            .await
            .unwrap();
        env.sim
            .script(&t, [slow_refusal.clone(), slow_refusal.clone()]);
        dead.insert(t);
    }
    env.publish(json!({"callId":"storm-1","toUserId":"storm"}))
        .await;
    crate::common::eventually(
        "the storm to start",
        std::time::Duration::from_secs(10),
        || {
            let started = env.sim.requests().iter().any(|r| dead.contains(&r.token));
            async move { started.then_some(()) }
        },
    )
    .await;
    env.publish(json!({"callId":"v-1","toUserId":"victim"}))
        .await;
    let r = &env.results_for("v-1", 1).await[0];
    assert_eq!(r.status, Status::Delivered);
    let requests = env.sim.requests();
    let storm_requests: Vec<_> = requests
        .iter()
        .filter(|q| dead.contains(&q.token))
        .collect();
    assert!(
        storm_requests.len() < 24,
        "the ring went out while the storm was still being refused"
    );
    let storm_connections: HashSet<_> = storm_requests.iter().map(|q| q.connection).collect();
    let ring = requests
        .iter()
        .find(|q| q.token == victim && q.headers["apns-collapse-id"] == "v-1")
        .unwrap();
    assert!(
        !storm_connections.contains(&ring.connection),
        "the proven device's ring did not queue behind the dead tokens"
    );
    let storm = env.results_for("storm-1", 12).await;
    assert!(storm.iter().all(|r| r.status == Status::TokenInvalidated));
    env.cleanup().await;
}

#[tokio::test]
async fn dropped_connections_are_reopened() {
    let mut env = TestEnv::with(|cfg| cfg.apns.connections_per_environment = 1).await;
    env.device(
        "drop",
        Some(Environment::Production),
        Environment::Production,
    )
    .await;
    // Two calls: the first proves the token (on a probation connection), the
    // second opens the connection proven tokens use: the one the fault hits.
    for warm in ["drop-0", "drop-00"] {
        env.publish(json!({"callId": warm, "toUserId": "drop"}))
            .await;
        assert_eq!(env.results_for(warm, 1).await[0].status, Status::Delivered);
    }
    let before = env.sim.connections_accepted();
    env.sim.drop_existing_connections();
    for i in 1..=3 {
        let call = format!("drop-{i}");
        env.publish(json!({"callId": call, "toUserId":"drop"}))
            .await;
        assert_eq!(env.results_for(&call, 1).await[0].status, Status::Delivered);
    }
    assert!(env.sim.connections_accepted() > before);
    env.cleanup().await;
}
