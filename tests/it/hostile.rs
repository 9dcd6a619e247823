//! Hostile but possible events: control characters and NUL bytes in ids, times in
//! the wrong unit, absurd ring timeouts, odd AMQP properties. Each must end fast
//! (refused, or handled), never hold a prefetch slot, so good calls keep ringing.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use serde_json::{json, Value};
use voip_push_worker::event::{now_ms, Environment, Status};

use crate::common::TestEnv;

/// Panics anywhere in this process. nextest runs each test in a process of its
/// own, so these are the worker's (or this test's failing asserts).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
}

const USER: &str = "hx";
/// The kinds of hostile message [`hostile`] makes, in turn.
const KINDS: usize = 13;

/// One hostile message, and what must become of it.
enum Hostile {
    /// An initiate refused as `bad_field`: dead-lettered once.
    Refused(Value),
    /// A cancel refused as `bad_field`; it sits on the work queue and on the cancel
    /// lane, so it is dead-lettered once or twice.
    RefusedCancel(Value),
    /// A good call whose AMQP properties are hostile: it rings.
    Rings(String, Box<BasicProperties>),
}

fn props() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into())
}

/// An initiate of `call_id` to the test's user, with `extra` fields.
fn call(call_id: String, extra: Value) -> Value {
    let mut body = json!({"callId": call_id, "toUserId": USER});
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body
}

/// The `i`th hostile message. Every body is unique (its dead letter is matched
/// by body) and every one is for a user with a device, so nothing stops early.
fn hostile(i: usize) -> Hostile {
    let id = format!("hx-bad-{i}");
    let refused = |call_id: String, extra: Value| Hostile::Refused(call(call_id, extra));
    let rings = |props: BasicProperties| Hostile::Rings(id.clone(), Box::new(props));
    let cancel = |call_id: String, to: String| {
        Hostile::RefusedCancel(json!({"type": "call.cancel", "callId": call_id,
            "toUserId": to, "reason": "caller_hangup"}))
    };
    match i % KINDS {
        // Control characters mid-id (trimming cannot save them): not a header value.
        0 => refused(format!("hx-{i}\nx"), json!({})),
        1 => refused(format!("hx-{i}\u{1}x"), json!({})),
        2 => refused(format!("hx-{i}\u{7f}x"), json!({})),
        // NUL: Postgres text cannot hold it.
        3 => refused(format!("hx-{i}\u{0}x"), json!({})),
        4 => refused(id.clone(), json!({"toUserId": format!("{USER}\u{0}x")})),
        // sentAt in nanoseconds, far before 1970, in seconds.
        5 => refused(id.clone(), json!({"sentAt": now_ms() * 1_000_000})),
        6 => refused(id.clone(), json!({"sentAt": -1_000_000_000_000i64})),
        7 => refused(id.clone(), json!({"sentAt": now_ms() / 1000})),
        8 => refused(id.clone(), json!({"bundleId": "com.example\u{1b}.chat"})),
        // Message ids are event ids: unique, or the second call would be a duplicate.
        9 if i % 2 == 0 => rings(props().with_message_id(format!("m{i}\u{0}x").into())),
        9 => rings(props().with_message_id(format!("m{i}\r\n\u{1}x").into())),
        10 => rings(props().with_timestamp(u64::MAX)),
        11 => cancel(format!("hx-{i}\r\nx"), USER.into()),
        _ => cancel(id.clone(), format!("{USER}\u{0}x")),
    }
}

/// The `n`th good call: plain, with a ring timeout to clamp, or with a display
/// name to truncate (10 KB: under the 16 KiB body limit, over APNs' 5120 bytes).
fn good(n: usize) -> (String, Value) {
    let id = format!("hx-good-{n}");
    let extra = match n % 4 {
        0 => json!({}),
        1 => json!({"ringTimeoutSecs": u64::MAX}),
        2 => json!({"ringTimeoutSecs": 1_000_000_000_000_000_000u64}),
        _ => json!({"fromDisplayName": "N".repeat(10 * 1024)}),
    };
    (id.clone(), call(id, extra))
}

/// (ready, unacknowledged) of each queue, as the broker counts them.
async fn queue_depths(queues: &[String]) -> Vec<(u64, u64)> {
    let queues = queues.to_vec();
    tokio::task::spawn_blocking(move || {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "name", "messages_ready"])
            .arg("messages_unacknowledged")
            .output()
            .expect("rabbitmqctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let count = |f: Option<&str>| f.and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
        queues
            .iter()
            .map(|q| {
                text.lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .find(|f| f.first() == Some(&q.as_str()))
                    .map(|f| (count(f.get(1).copied()), count(f.get(2).copied())))
                    .unwrap_or((u64::MAX, u64::MAX))
            })
            .collect()
    })
    .await
    .expect("rabbitmqctl task")
}

/// Proves that no hostile message wedges the worker at its default concurrency
/// (64): more than three times 64 of them, every one dead-lettered as `bad_field`
/// or handled, none left ready or unacknowledged, no panic; and that every good
/// call among them — including clamped ring timeouts, a truncated display name and
/// hostile AMQP properties — gets one `delivered` result and rings exactly once.
#[tokio::test]
async fn hostile_messages_end_fast_and_good_calls_ring_exactly_once() {
    count_panics();
    let mut env = TestEnv::new().await;
    env.device(USER, Some(Environment::Production), Environment::Production)
        .await;

    let hostile_count = 16 * KINDS;
    let mut rings = Vec::new();
    let mut refused: HashMap<Vec<u8>, RangeInclusive<usize>> = HashMap::new();
    for i in 0..hostile_count {
        if i % 8 == 0 {
            let (call_id, body) = good(i / 8);
            env.publish(body).await;
            rings.push(call_id);
        }
        match hostile(i) {
            Hostile::Refused(body) => {
                refused.insert(body.to_string().into_bytes(), 1..=1);
                env.publish(body).await;
            }
            Hostile::RefusedCancel(body) => {
                refused.insert(body.to_string().into_bytes(), 1..=2);
                env.publish_cancel(body).await;
            }
            Hostile::Rings(call_id, props) => {
                let body = call(call_id.clone(), json!({})).to_string();
                env.publish_with(body.as_bytes(), *props).await;
                rings.push(call_id);
            }
        }
    }
    let published = Instant::now();

    // One deadline for everything: fixed code settles all of it in a few seconds.
    let deadline = published + Duration::from_secs(30);
    let mut results: HashMap<String, Vec<Status>> = HashMap::new();
    while rings.iter().any(|c| !results.contains_key(c)) && Instant::now() < deadline {
        if let Some(r) = env.watch.next(Duration::from_millis(250)).await {
            results
                .entry(r.call_id.unwrap_or_default())
                .or_default()
                .push(r.status);
        }
    }
    let queues = [
        env.cfg.amqp.work_queue.clone(),
        env.cfg.amqp.cancel_queue.clone(),
    ];
    let mut dead = Vec::new();
    let depths = loop {
        let depths = queue_depths(&queues).await;
        let settled = depths.iter().all(|d| *d == (0, 0));
        // Read after the depths: a message settled by then has its dead letter queued.
        dead.extend(env.dead_letters().await);
        if settled || Instant::now() >= deadline {
            break depths;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let settled_after = published.elapsed();
    // Every result was published before its message settled; a second one for a
    // call would be here by now.
    let quiet_by = Instant::now() + Duration::from_secs(5);
    while let Some(r) = env.watch.next(Duration::from_millis(300)).await {
        results
            .entry(r.call_id.unwrap_or_default())
            .or_default()
            .push(r.status);
        if Instant::now() > quiet_by {
            break;
        }
    }

    let mut pushes: HashMap<String, usize> = HashMap::new();
    for r in env.sim.requests() {
        let call = r.payload["callId"].as_str().unwrap_or_default().to_string();
        *pushes.entry(call).or_default() += 1;
    }
    let not_rung_once: Vec<_> = rings
        .iter()
        .map(|c| {
            (
                c,
                results.get(c).cloned().unwrap_or_default(),
                pushes.get(c).copied().unwrap_or(0),
            )
        })
        .filter(|(_, statuses, n)| *statuses != [Status::Delivered] || *n != 1)
        .collect();
    let mut dead_copies: HashMap<&[u8], usize> = HashMap::new();
    for (body, _) in &dead {
        *dead_copies.entry(body.as_slice()).or_default() += 1;
    }
    let wrongly_ended: Vec<_> = refused
        .iter()
        .filter(|(body, want)| !want.contains(dead_copies.get(body.as_slice()).unwrap_or(&0)))
        .map(|(body, _)| String::from_utf8_lossy(body).into_owned())
        .collect();
    let stray = dead_copies
        .keys()
        .filter(|b| !refused.contains_key(**b))
        .count();
    let bad_reasons: Vec<_> = dead
        .iter()
        .filter(|(_, reason)| reason.as_deref() != Some("bad_field"))
        .map(|(_, reason)| reason.clone())
        .collect();
    let panics = PANICS.load(Ordering::SeqCst);
    let ready = env.http_get("/readyz").await.0;
    let healthy = env.http_get("/healthz").await.0;
    println!(
        "hostile-report: hostile messages {hostile_count}, good calls {}: not rung exactly once {}, \
         dead letters {} ({} hostile messages not dead-lettered as expected, {stray} stray, {} not bad_field), \
         work and cancel queues (ready, unacked) {depths:?} after {settled_after:.1?}, panics {panics}, \
         readyz {ready}, healthz {healthy}",
        rings.len(),
        not_rung_once.len(),
        dead.len(),
        wrongly_ended.len(),
        bad_reasons.len(),
    );

    assert!(
        not_rung_once.is_empty(),
        "{} of {} good calls did not get exactly one delivered result and one push \
         (call, results, pushes): {:?}",
        not_rung_once.len(),
        rings.len(),
        &not_rung_once[..not_rung_once.len().min(12)]
    );
    assert_eq!(
        depths,
        [(0, 0), (0, 0)],
        "messages (ready, unacked) left on the work and cancel queues"
    );
    assert!(
        wrongly_ended.is_empty(),
        "{} of {} hostile messages not dead-lettered as expected: {:?}",
        wrongly_ended.len(),
        refused.len(),
        &wrongly_ended[..wrongly_ended.len().min(12)]
    );
    assert_eq!(stray, 0, "only hostile messages are dead-lettered");
    assert!(
        bad_reasons.is_empty(),
        "dead-letter reasons: {bad_reasons:?}"
    );
    assert_eq!(panics, 0, "nothing panicked");
    assert_eq!(ready, 200, "/readyz");
    assert_eq!(healthy, 200, "/healthz");
    env.cleanup().await;
}
