//! A replica's Postgres connections stay within 8 at the defaults, whatever the
//! load: rings hold none across a push.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use voip_push_worker::event::Environment;

use crate::common::{delayed, eventually, http_request_with_headers, metric, TestEnv};

/// Backends connected to `db` now.
async fn backends(url: &str, db: &str) -> HashSet<i32> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_replica_opens_at_most_eight_postgres_connections_under_load() {
    const EVENTS: usize = 600;
    let mut env = TestEnv::without_worker(|c| {
        c.http.service_token = Some("conn-token".into());
        let default = voip_push_worker::config::Config::default()
            .worker
            .concurrency;
        assert_eq!(c.worker.concurrency, default, "the default users get");
    })
    .await;
    for i in 0..EVENTS {
        let token = env
            .device(
                &format!("conn-{i}"),
                Some(Environment::Production),
                Environment::Production,
            )
            .await;
        // Answered after 500 ms: every slot has a push in flight.
        env.sim.script(&token, [delayed(500)]);
    }
    // The test's own connections, before the worker starts.
    let url = env.db.url.clone();
    let name = env.db.name.clone();
    let ours = backends(&url, &name).await;
    env.start_worker().await;

    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = tokio::spawn({
        let (stop, most, url, name) = (stop.clone(), most.clone(), url.clone(), name.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                let now = backends(&url, &name).await;
                let worker = now.difference(&ours).count();
                most.fetch_max(worker, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    for i in 0..EVENTS {
        env.publish(json!({"callId": format!("conn-call-{i}"), "toUserId": format!("conn-{i}")}))
            .await;
        if i % 100 == 0 {
            // Cancels and status reads use the other pools meanwhile.
            env.publish_cancel(
                json!({"type": "call.cancel", "callId": format!("conn-call-{i}"),
                "toUserId": format!("conn-{i}"), "reason": "caller_hangup"}),
            )
            .await;
            let (status, _) = http_request_with_headers(
                env.worker().http_addr,
                "GET",
                &format!("/v1/calls/conn-call-{i}?waitMs=200"),
                &[("Authorization", "Bearer conn-token")],
                "",
            )
            .await;
            assert!(status == 200 || status == 404, "status read: {status}");
        }
    }
    eventually("every event handled", Duration::from_secs(60), || {
        let env = &env;
        async move {
            let (_, text) = env.http_get("/metrics").await;
            let handled: f64 = ["delivered", "cancelled", "cancel"]
                .iter()
                .map(|o| metric(&text, &format!("voip_push_events_total{{outcome=\"{o}\"}}")))
                .sum();
            (handled >= (EVENTS + EVENTS / 100) as f64).then_some(())
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let most = most.load(Ordering::Relaxed);
    println!(
        "postgres connections of one worker at the default concurrency, {EVENTS} events: at most {most}"
    );
    assert!(
        most >= 3,
        "the sampler saw the worker's connections ({most})"
    );
    assert!(most <= 8, "{most} connections");
    env.cleanup().await;
}
