//! The listener under abuse, with real TCP clients: a head or a body that never
//! finishes is cut off after its timeout; connections over the cap are closed at
//! once while those already open still work.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{all_groups, SERVICE_TOKEN};
use crate::common::{eventually, metric, TestEnv};

/// Reads until the server closes the connection (EOF or reset): what it sent,
/// and when it closed. Panics if it is still open after `bound`.
async fn closed_within(s: &mut TcpStream, bound: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + bound).into(), s.read(&mut buf)).await {
            Err(_) => panic!(
                "the connection is still open after {bound:?}; read {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn a_head_dribbled_byte_by_byte_is_cut_off_at_the_header_timeout() {
    let env = TestEnv::with(|cfg| cfg.http.header_read_timeout_ms = 600).await;
    let mut s = TcpStream::connect(env.worker().http_addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    // Slowloris: one more header byte every 100 ms, the head never ends.
    let (mut read, mut write) = s.into_split();
    let dribble = tokio::spawn(async move {
        for b in b"X-Slow: ".iter().cycle() {
            if write.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open after 5 s of dribbling");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(450),
        "closed too early: {after:?}"
    );
    dribble.abort();
    env.wait_metric("voip_push_http_read_timeouts_total{phase=\"header\"}", 1.0)
        .await;
    // The listener still serves everyone else.
    assert_eq!(env.http_get("/healthz").await.0, 200);
    env.cleanup().await;
}

#[tokio::test]
async fn a_body_that_never_completes_is_408_and_closed_at_the_body_timeout() {
    let env = TestEnv::with(|cfg| {
        all_groups(cfg);
        cfg.http.body_read_timeout_ms = 600;
    })
    .await;
    let mut s = TcpStream::connect(env.worker().http_addr).await.unwrap();
    let head = format!(
        "PUT /v1/devices HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {SERVICE_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"userId\":\"slow\","
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let (answer, after) = closed_within(&mut s, Duration::from_secs(5)).await;
    assert!(
        after >= Duration::from_millis(450),
        "closed too early: {after:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":\"timeout\""), "{answer}");
    env.wait_metric("voip_push_http_read_timeouts_total{phase=\"body\"}", 1.0)
        .await;
    env.cleanup().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_while_open_ones_work() {
    let env = TestEnv::with(|cfg| cfg.http.max_connections = 3).await;
    let addr = env.worker().http_addr;
    let gauge = env.worker().metrics.http_connections.clone();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(TcpStream::connect(addr).await.unwrap());
    }
    eventually("three connections open", Duration::from_secs(5), || {
        let n = gauge.get();
        async move { (n == 3).then_some(()) }
    })
    .await;

    // The fourth is accepted by the kernel and closed by us before any byte.
    let mut extra = TcpStream::connect(addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let (answer, _) = closed_within(&mut extra, Duration::from_secs(2)).await;
    assert_eq!(answer, "", "an answer over the cap");
    assert_eq!(env.worker().metrics.http_connections_refused.get(), 1);

    // A connection inside the cap is served as usual.
    let mut first = open.remove(0);
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = closed_within(&mut first, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // With a slot free again, /metrics shows the refusal.
    eventually(
        "the closed connection's slot",
        Duration::from_secs(5),
        || {
            let n = gauge.get();
            async move { (n == 2).then_some(()) }
        },
    )
    .await;
    let (_, text) = env.http_get("/metrics").await;
    assert_eq!(
        metric(&text, "voip_push_http_connections_refused_total"),
        1.0
    );
    drop(open);
    env.cleanup().await;
}
