//! A call that ended never rings: cancels, cancel pushes, call state and trace.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use voip_push_worker::apns_sim::RecordedRequest;
use voip_push_worker::config::CancelPush;
use voip_push_worker::event::{Environment, Status};

use crate::common::{delayed, eventually, random_token, scripted, TestEnv, BUNDLE};

pub fn pushes_of<'a>(requests: &'a [RecordedRequest], call: &str) -> Vec<&'a RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.headers.get("apns-collapse-id").map(String::as_str) == Some(call))
        .collect()
}

/// `cancelled_at` of a call in ms since epoch, from Postgres, once it is
/// recorded: after the rings in flight are answered, so a ring's `cancelled`
/// result may come first.
async fn cancelled_at_ms(env: &TestEnv, call: &str) -> i64 {
    let client = env.db.client().await;
    let client = &client;
    eventually("the cancel to be recorded", Duration::from_secs(10), || async move {
        client
            .query_opt(
                "SELECT (extract(epoch FROM cancelled_at) * 1000)::bigint FROM calls WHERE call_id = $1",
                &[&call],
            )
            .await
            .unwrap()
            .and_then(|r| r.get::<_, Option<i64>>(0))
    })
    .await
}

#[tokio::test]
async fn cancel_published_while_the_ring_is_queued_stops_it() {
    let mut env = TestEnv::with(|c| c.worker.concurrency = 1).await;
    let slow = env
        .device(
            "slow",
            Some(Environment::Production),
            Environment::Production,
        )
        .await;
    env.sim.script(&slow, [delayed(1_500)]);
    env.device(
        "callee",
        Some(Environment::Production),
        Environment::Production,
    )
    .await;

    env.publish(json!({"callId":"busy-1","toUserId":"slow"}))
        .await;
    eventually("the slow push to start", Duration::from_secs(10), || {
        let n = env.sim.requests().len();
        async move { (n > 0).then_some(()) }
    })
    .await;
    // Queued behind the slow push (one slot), then cancelled.
    env.publish(json!({"callId":"q-1","toUserId":"callee"}))
        .await;
    env.publish_cancel(
        json!({"type":"call.cancel","callId":"q-1","toUserId":"callee","reason":"caller_hangup"}),
    )
    .await;
    let r = &env.results_for("q-1", 1).await[0];
    assert_eq!(
        (r.status, r.event_type.as_str(), r.attempts),
        (Status::Cancelled, "call.incoming", 0)
    );
    assert!(
        pushes_of(&env.sim.requests(), "q-1").is_empty(),
        "the cancelled call never rang"
    );
    assert_eq!(
        env.results_for("busy-1", 1).await[0].status,
        Status::Delivered
    );
    env.cleanup().await;
}

#[tokio::test]
async fn cancel_that_arrives_before_its_initiate_wins() {
    let mut env = TestEnv::new().await;
    env.device("u2", Some(Environment::Production), Environment::Production)
        .await;
    env.publish_cancel(
        json!({"type":"call.cancel","callId":"early-1","toUserId":"u2","reason":"caller_hangup"}),
    )
    .await;
    cancelled_at_ms(&env, "early-1").await;
    env.publish(json!({"callId":"early-1","toUserId":"u2"}))
        .await;
    let r = &env.results_for("early-1", 1).await[0];
    assert_eq!(r.status, Status::Cancelled);
    assert!(env.sim.requests().is_empty());
    let trace = env.store.trace_call("early-1").await.unwrap().unwrap();
    assert_eq!(trace.state.as_str(), "cancelled");
    assert_eq!(trace.cancel_reason.as_deref(), Some("caller_hangup"));
    env.cleanup().await;
}

#[tokio::test]
async fn cancel_during_retries_stops_the_next_attempt() {
    let mut env = TestEnv::new().await;
    let token = env
        .device("u3", Some(Environment::Production), Environment::Production)
        .await;
    env.sim.script(
        &token,
        std::iter::repeat_n(scripted(503, "ServiceUnavailable"), 10_000),
    );
    env.publish(json!({"callId":"retry-c","toUserId":"u3","ringTimeoutSecs":30}))
        .await;
    eventually("a few 503s", Duration::from_secs(10), || {
        let n = env.sim.requests().len();
        async move { (n >= 3).then_some(()) }
    })
    .await;
    env.publish_cancel(
        json!({"type":"call.cancel","callId":"retry-c","toUserId":"u3","reason":"caller_hangup"}),
    )
    .await;
    let r = &env.results_for("retry-c", 1).await[0];
    assert_eq!(r.status, Status::Cancelled);
    let cancelled = cancelled_at_ms(&env, "retry-c").await;
    let requests = env.sim.requests();
    assert!(
        requests.iter().all(|q| q.at_ms <= cancelled),
        "no attempt after the cancel was recorded"
    );
    assert_eq!(r.attempts as usize, requests.len());
    // Nothing was delivered, so nothing needs a cancel push.
    assert!(requests
        .iter()
        .all(|q| q.payload["type"] == "call.incoming"));
    env.cleanup().await;
}

#[tokio::test]
async fn cancel_after_delivery_sends_a_cancel_push_to_each_rung_device() {
    let mut env = TestEnv::with(|c| c.worker.cancel_push = CancelPush::Voip).await;
    let a = env
        .device("u4", Some(Environment::Production), Environment::Production)
        .await;
    let b = env.device("u4", None, Environment::Sandbox).await;
    let dead = random_token();
    env.store
        .register_device("u4", BUNDLE, &dead, None)
        .await
        .unwrap();
    env.publish(json!({"callId":"done-1","toUserId":"u4","fromUserId":7}))
        .await;
    let rings = env.results_for("done-1", 3).await;
    assert_eq!(
        rings
            .iter()
            .filter(|r| r.status == Status::Delivered)
            .count(),
        2
    );

    env.publish_cancel(
        json!({"type":"call.cancel","callId":"done-1","toUserId":"u4","reason":"caller_hangup"}),
    )
    .await;
    let cancels = env.results_for("done-1", 2).await;
    assert!(cancels
        .iter()
        .all(|r| r.event_type == "call.cancel" && r.status == Status::Delivered));
    let requests = env.sim.requests();
    let cancel_pushes: Vec<_> = pushes_of(&requests, "done-1")
        .into_iter()
        .filter(|r| r.payload["type"] == "call.cancel")
        .collect();
    let tokens: HashSet<_> = cancel_pushes.iter().map(|r| r.token.clone()).collect();
    assert_eq!(
        tokens,
        HashSet::from([a.clone(), b.clone()]),
        "one cancel per rung device, none to the dead token"
    );
    assert_eq!(cancel_pushes.len(), 2);
    for p in &cancel_pushes {
        assert_eq!(p.status, 200);
        assert_eq!(p.headers["apns-push-type"], "voip");
        assert_eq!(p.payload["callId"], "done-1");
        assert_eq!(p.payload["reason"], "caller_hangup");
        // The sandbox device is cancelled where it was rung: no second fallback.
        let env_of_ring = requests
            .iter()
            .find(|r| r.token == p.token && r.payload["type"] == "call.incoming" && r.status == 200)
            .unwrap()
            .environment;
        assert_eq!(p.environment, env_of_ring);
    }

    let trace = env.recorded_trace("done-1").await;
    assert_eq!(trace.state.as_str(), "cancelled");
    let kinds: HashMap<_, usize> = trace.deliveries.iter().fold(HashMap::new(), |mut m, d| {
        *m.entry(d.event_type.clone()).or_default() += 1;
        m
    });
    assert_eq!(kinds.get("call.incoming"), Some(&3));
    assert_eq!(kinds.get("call.cancel"), Some(&2));
    env.cleanup().await;
}

#[tokio::test]
async fn answered_elsewhere_skips_the_answering_device() {
    let mut env = TestEnv::with(|c| c.worker.cancel_push = CancelPush::Voip).await;
    env.device("u5", Some(Environment::Production), Environment::Production)
        .await;
    env.device("u5", Some(Environment::Production), Environment::Production)
        .await;
    env.publish(json!({"callId":"ans-1","toUserId":"u5"})).await;
    let rings = env.results_for("ans-1", 2).await;
    let answering = rings[0].device_id.unwrap();
    let other = rings[1].device_id.unwrap();
    env.publish_cancel(
        json!({"type":"call.cancel","callId":"ans-1","toUserId":"u5",
        "reason":"answered_elsewhere","answeredDeviceId": answering.to_string()}),
    )
    .await;
    let cancels = env.results_for("ans-1", 1).await;
    assert_eq!(cancels[0].device_id, Some(other));
    assert_eq!(cancels[0].event_type, "call.cancel");
    let cancel_pushes = env
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.payload["type"] == "call.cancel")
        .count();
    assert_eq!(cancel_pushes, 1);
    let trace = env.store.trace_call("ans-1").await.unwrap().unwrap();
    assert_eq!(trace.answered_device_id, Some(answering.to_string()));
    env.cleanup().await;
}

#[tokio::test]
async fn two_workers_racing_initiates_and_cancels_never_ring_after_the_cancel() {
    let mut env = TestEnv::with(|c| {
        c.worker.concurrency = 8;
        c.worker.cancel_push = CancelPush::Voip;
    })
    .await;
    let second = voip_push_worker::start(env.cfg.clone(), CancellationToken::new())
        .await
        .unwrap();
    let n = 40;
    let mut tokens = HashMap::new();
    for i in 0..n {
        let user = format!("race-{i}");
        let t = env
            .device(
                &user,
                Some(Environment::Production),
                Environment::Production,
            )
            .await;
        // A little APNs latency, so rings are in flight when cancels land.
        env.sim.script(&t, [delayed(5 * (i % 4))]);
        tokens.insert(format!("race-call-{i}"), t);
    }
    for i in 0..n {
        let (call, user) = (format!("race-call-{i}"), format!("race-{i}"));
        let cancel =
            json!({"type":"call.cancel","callId": call,"toUserId": user,"reason":"caller_hangup"});
        let ring = json!({"callId": call, "toUserId": user});
        if i % 2 == 0 {
            env.publish(ring).await;
            env.publish_cancel(cancel).await;
        } else {
            env.publish_cancel(cancel).await;
            env.publish(ring).await;
        }
    }
    let mut rung = 0;
    for i in 0..n {
        let call = format!("race-call-{i}");
        let ring = env
            .results_for(&call, 1)
            .await
            .into_iter()
            .find(|r| r.event_type == "call.incoming");
        let ring = match ring {
            Some(r) => r,
            // The cancel push's result came first; the ring's follows.
            None => env.results_for(&call, 1).await.remove(0),
        };
        if ring.status == Status::Delivered {
            rung += 1;
        } else {
            assert_eq!(ring.status, Status::Cancelled, "{ring:?}");
        }
    }
    // Wait until every rung device also got its cancel push.
    let requests = eventually(
        "a cancel push for every ring",
        Duration::from_secs(20),
        || {
            let requests = env.sim.requests();
            let rings: HashSet<_> = requests
                .iter()
                .filter(|r| r.payload["type"] == "call.incoming" && r.status == 200)
                .map(|r| r.token.clone())
                .collect();
            let cancels: HashSet<_> = requests
                .iter()
                .filter(|r| r.payload["type"] == "call.cancel")
                .map(|r| r.token.clone())
                .collect();
            async move { (rings == cancels).then_some(requests) }
        },
    )
    .await;
    for (call, token) in &tokens {
        let cancelled = cancelled_at_ms(&env, call).await;
        for ring in requests
            .iter()
            .filter(|r| &r.token == token && r.payload["type"] == "call.incoming")
        {
            assert!(
                ring.at_ms <= cancelled,
                "{call} rang {} ms after its cancel",
                ring.at_ms - cancelled
            );
        }
    }
    println!("race: {n} calls, {rung} rang before their cancel and got a cancel push");
    second.stop().await;
    env.cleanup().await;
}
