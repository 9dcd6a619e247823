//! Long polls of `GET /v1/calls/{id}?waitMs=` run on their own pool and under a
//! cap: over it, a 503 with Retry-After at once; at it, calls still ring; and a
//! status read is answered while every connection of the pipeline's pool is taken.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use voip_push_worker::event::{Environment, Status};

use super::{all_groups, bearer, SERVICE_TOKEN};
use crate::common::{delayed, eventually, http_request_with_headers, TestEnv};

#[tokio::test]
async fn long_polls_over_the_cap_are_503_and_never_hold_up_a_ring() {
    let mut env = TestEnv::with(|cfg| {
        all_groups(cfg);
        // One connection for the pipeline: whatever polls take from it, a ring waits for.
        cfg.postgres.pool_size = 1;
        cfg.http.max_long_polls = 2;
    })
    .await;
    let addr = env.worker().http_addr;
    let token = env
        .device("lp", Some(Environment::Production), Environment::Production)
        .await;
    // A slow APNs answer keeps the call ringing for a while.
    env.sim.script(&token, [delayed(1_500)]);
    let service = bearer(SERVICE_TOKEN);

    let polls: Vec<_> = (0..2)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                let auth = [("Authorization", service.as_str())];
                http_request_with_headers(addr, "GET", "/v1/calls/lp-1?waitMs=20000", &auth, "")
                    .await
            })
        })
        .collect();
    let waiting = env.worker().metrics.long_polls_waiting.clone();
    eventually("two long polls waiting", Duration::from_secs(5), || {
        let n = waiting.get();
        async move { (n == 2).then_some(()) }
    })
    .await;

    // A third would wait: refused at once, with when to come back.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let third = format!(
        "GET /v1/calls/lp-2?waitMs=20000 HTTP/1.1\r\nHost: t\r\nAuthorization: {service}\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(third.as_bytes()).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "{answer}");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\"error\":\"busy\""), "{answer}");
    assert_eq!(env.worker().metrics.long_polls_refused.get(), 1);

    // The call rings while the cap is full.
    env.publish(json!({"callId":"lp-1","toUserId":"lp"})).await;
    eventually("the push to be in flight", Duration::from_secs(10), || {
        let n = env.sim.requests().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    // A ring is under way on the pipeline's only connection (a ring used to hold
    // it across the push); a status read does not wait for the pipeline's pool.
    let started = Instant::now();
    let auth = [("Authorization", service.as_str())];
    let (status, body) = http_request_with_headers(addr, "GET", "/v1/calls/lp-1", &auth, "").await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "ringing", "{v}");
    assert!(
        took < Duration::from_millis(700),
        "status read took {took:?}"
    );

    let r = &env.results_for("lp-1", 1).await[0];
    assert_eq!(r.status, Status::Delivered, "{r:?}");
    for poll in polls {
        let (status, body) = poll.await.unwrap();
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["state"], "delivered", "{v}");
    }
    assert_eq!(waiting.get(), 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_status_read_never_waits_for_the_pipelines_connections() {
    let mut env = TestEnv::with(|cfg| {
        all_groups(cfg);
        cfg.postgres.pool_size = 1;
    })
    .await;
    let addr = env.worker().http_addr;
    env.device("sr", Some(Environment::Production), Environment::Production)
        .await;
    env.publish(json!({"callId":"sr-1","toUserId":"sr"})).await;
    assert_eq!(
        env.results_for("sr-1", 1).await[0].status,
        Status::Delivered
    );

    // A registration stuck behind a table lock holds the pipeline pool's only
    // connection.
    let (db, conn) = tokio_postgres::connect(&env.db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    db.batch_execute("BEGIN; LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let service = bearer(SERVICE_TOKEN);
    let stuck = {
        let service = service.clone();
        let body = json!({"userId":"sr2","token":crate::common::random_token()}).to_string();
        tokio::spawn(async move {
            let auth = [("Authorization", service.as_str())];
            http_request_with_headers(addr, "PUT", "/v1/devices", &auth, &body).await
        })
    };
    eventually(
        "the registration to wait on the lock",
        Duration::from_secs(5),
        || {
            let db = &db;
            async move {
                // This session is in a transaction: without this, it would see
                // pg_stat_activity as it was at its first look.
                db.batch_execute("SELECT pg_stat_clear_snapshot()")
                    .await
                    .unwrap();
                let waiting: i64 = db
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (waiting > 0).then_some(())
            }
        },
    )
    .await;

    let started = Instant::now();
    let auth = [("Authorization", service.as_str())];
    let (status, body) = http_request_with_headers(addr, "GET", "/v1/calls/sr-1", &auth, "").await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(took < Duration::from_secs(1), "status read took {took:?}");

    db.batch_execute("COMMIT").await.unwrap();
    assert_eq!(stuck.await.unwrap().0, 200);
    env.cleanup().await;
}
