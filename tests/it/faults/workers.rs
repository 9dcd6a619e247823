//! Workers that die or race: `kill -9` mid-load, duplicates across replicas, a
//! live owner retrying longer than any lease.

use super::*;

/// How long the callee's phones wait at most: the longest pause between two
/// pushes from a kill until the end of the load.
fn longest_pause_after(env: &TestEnv, from_ms: i64) -> i64 {
    let mut at: Vec<i64> = env
        .sim
        .requests()
        .iter()
        .map(|r| r.at_ms)
        .filter(|&t| t >= from_ms)
        .collect();
    at.sort_unstable();
    at.insert(0, from_ms);
    at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
}

#[tokio::test]
async fn worker_killed_mid_load_loses_nothing_resumes_at_once_and_sigterm_drains() {
    // At the defaults users get: two replicas at the default concurrency,
    // thousands of events, APNs answering in 25 ms so every slot's push is in
    // flight at the kill.
    let concurrency = Config::default().worker.concurrency;
    let env = TestEnv::without_worker(|_| {}).await;
    let mut results = DurableResults::declare(&env.cfg).await;
    let calls = load(&env, "kill", 2_000, 25).await;
    // A backlog, so the workers are busy when the kill comes.
    publish_all(&env, &calls).await;
    let mut first = worker_process(&env, concurrency);
    let mut second = worker_process(&env, concurrency);
    // Mid-load: kill once 400 pushes have reached APNs (results lag behind).
    eventually("400 pushes", Duration::from_secs(60), || {
        let n = env.sim.requests().len();
        async move { (n >= 400).then_some(()) }
    })
    .await;
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    let killed_ms = voip_push_worker::event::now_ms();
    let killed = Instant::now();
    let done_at_kill = results.calls_done().len();

    results
        .wait_all(&call_ids(&calls), Duration::from_secs(120))
        .await;
    let recovered = killed.elapsed();
    let pause_ms = longest_pause_after(&env, killed_ms);
    let duplicates = duplicate_pushes(&env);
    println!(
        "fault-report: kill -9 mid-load (2 workers, concurrency {concurrency}): events {}, results {} (done at kill {done_at_kill}), longest pause in ringing after the kill {pause_ms} ms, duplicate pushes {duplicates}, duplicate results {}, all results {:.1?} after the kill",
        calls.len(),
        results.seen.len(),
        results.duplicate_results(),
        recovered
    );
    assert!(results.seen.iter().all(|r| r.status == Status::Delivered));
    // The killed worker's events return to the queue and its claims are taken
    // over as soon as its Postgres sessions are gone: no wait for a lease.
    assert!(
        pause_ms <= 2_000,
        "ringing paused {pause_ms} ms after the kill"
    );
    // The only window for a second ring: a push in flight at the kill, whose
    // outcome was not yet recorded — at most one per concurrent slot.
    assert!(
        duplicates <= usize::from(concurrency),
        "{duplicates} phones rung twice"
    );

    // SIGTERM: drains and exits 0.
    let status = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || second.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
    results.delete().await;
    env.cleanup().await;
}

#[tokio::test]
async fn two_workers_and_duplicated_messages_push_each_device_once() {
    let env = TestEnv::with(|c| c.worker.concurrency = 8).await;
    // Same configuration (HTTP already on an ephemeral port), same queue.
    let second = voip_push_worker::start(env.cfg.clone(), CancellationToken::new())
        .await
        .unwrap();
    let mut results = DurableResults::declare(&env.cfg).await;
    let calls = load(&env, "dup", 100, 10).await;
    // Every event twice, with the same message id, as a producer that retried
    // after a lost confirm would.
    for (call, user) in &calls {
        let body = json!({"callId": call, "toUserId": user}).to_string();
        let props = || {
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(format!("msg-{call}").into())
        };
        env.publish_with(body.as_bytes(), props()).await;
        env.publish_with(body.as_bytes(), props()).await;
    }
    results
        .wait_all(&call_ids(&calls), Duration::from_secs(60))
        .await;
    // Let stragglers (the second copies) finish, then count.
    crate::common::wait_idle(&[env.worker(), &second]).await;
    results.drain().await;
    let duplicates = duplicate_pushes(&env);
    let dup_results = results.duplicate_results();
    println!(
        "fault-report: two workers, every event published twice: events {}, messages {}, results {}, duplicate pushes {duplicates}, duplicate results {dup_results}",
        calls.len(),
        calls.len() * 2,
        results.seen.len()
    );
    assert_eq!(duplicates, 0);
    assert_eq!(dup_results, 0);
    assert_eq!(results.seen.len(), calls.len());
    second.stop().await;
    results.delete().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_live_owner_keeps_its_claim_through_long_retries() {
    // Worker A retries one push for longer than a claim lease (10 s) while worker
    // B holds a duplicate of the event: A's renewals must keep B from taking over.
    let env = TestEnv::with(|c| c.worker.concurrency = 2).await;
    let second = voip_push_worker::start(env.cfg.clone(), CancellationToken::new())
        .await
        .unwrap();
    let mut results = DurableResults::declare(&env.cfg).await;
    let token = env
        .device(
            "lease",
            Some(Environment::Production),
            Environment::Production,
        )
        .await;
    env.sim.script(
        &token,
        std::iter::repeat_n(
            Scripted {
                delay_ms: 200,
                ..scripted(503, "ServiceUnavailable")
            },
            30,
        ),
    );
    let body = json!({"callId": "lease-1", "toUserId": "lease", "ringTimeoutSecs": 60}).to_string();
    let props = || {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("lease-msg".into())
    };
    env.publish_with(body.as_bytes(), props()).await;
    env.publish_with(body.as_bytes(), props()).await;
    results
        .wait_all(&["lease-1".to_string()], Duration::from_secs(60))
        .await;
    crate::common::wait_idle(&[env.worker(), &second]).await;
    results.drain().await;
    let requests = env.sim.requests();
    let accepted = requests.iter().filter(|r| r.status == 200).count();
    let span_ms = requests.iter().map(|r| r.at_ms).max().unwrap()
        - requests.iter().map(|r| r.at_ms).min().unwrap();
    println!(
        "fault-report: one push retried for {:.1} s with a duplicate on another worker: attempts {}, accepted {accepted}, results {}",
        span_ms as f64 / 1000.0,
        requests.len(),
        results.seen.len()
    );
    assert!(
        span_ms > 10_000,
        "the retries outlasted a lease ({span_ms} ms)"
    );
    assert_eq!(accepted, 1, "pushed once");
    assert_eq!(results.seen.len(), 1, "one result");
    second.stop().await;
    results.delete().await;
    env.cleanup().await;
}
