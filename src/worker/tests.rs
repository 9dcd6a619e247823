//! The driver against an in-memory source (`fixtures.rs`), with scripted
//! handlers. Tests wait by polling with a deadline.

mod fixtures;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::*;
use fixtures::{MemSource, Queue, Script, Settled};

fn lane(concurrency: u16, drain: Duration) -> Lane {
    Lane {
        name: "calls",
        concurrency,
        prefetch: concurrency * 2,
        claim_owner: "w".into(),
        drain,
        reconnect: RetryPolicy::doubling(Duration::from_millis(1), Duration::from_millis(5)),
        metrics: Metrics::new(),
        watched: Some(Watched {
            health: Arc::new(ConsumerHealth::default()),
            overdue_after: Duration::from_secs(60),
        }),
    }
}

/// Polls `ok` every few milliseconds until it holds; fails after 10 s.
async fn until(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs the driver on `queue` with `script`; returns its stop and its task.
fn start(
    lane: Lane,
    queue: &Arc<Queue>,
    script: &Arc<Script>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(
        lane,
        MemSource(queue.clone()),
        script.clone(),
        stop.clone(),
    ));
    (stop, task)
}

async fn shut_down(stop: CancellationToken, task: tokio::task::JoinHandle<()>) {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the driver returns after its drain")
        .expect("the driver does not panic");
}

#[tokio::test]
async fn never_more_handlers_than_permits_and_each_message_settled_once() {
    let queue = Queue::with(&["work"; 12]);
    let script = Script::new(Instant::now());
    let (stop, task) = start(lane(3, Duration::from_secs(5)), &queue, &script);

    until("three at work", || {
        script.running.load(Ordering::SeqCst) == 3
    })
    .await;
    // No fourth message is even taken while the three hold their slots.
    tokio::task::yield_now().await;
    assert_eq!(queue.state.lock().unwrap().delivered.len(), 3);

    script.gate.add_permits(12);
    until("twelve acks", || queue.settled().len() == 12).await;
    assert_eq!(script.most.load(Ordering::SeqCst), 3);
    assert!(queue.settled().iter().all(|(_, how)| *how == Settled::Ack));
    shut_down(stop, task).await;
    queue.assert_each_delivery_ended_once();
    assert!(queue.state.lock().unwrap().returned.is_empty());
}

#[tokio::test]
async fn a_panicking_handler_is_dead_lettered_as_internal_error() {
    let queue = Queue::with(&["ack", "panic", "ack"]);
    let script = Script::new(Instant::now());
    let the_lane = lane(1, Duration::from_secs(5));
    let metrics = the_lane.metrics.clone();
    let (stop, task) = start(the_lane, &queue, &script);

    until("three settled", || queue.settled().len() == 3).await;
    assert_eq!(
        queue.settled_as(1),
        Some(Settled::DeadLetter(
            "internal_error",
            "panicked: a collapse id".into()
        ))
    );
    assert_eq!(queue.settled_as(0), Some(Settled::Ack));
    assert_eq!(queue.settled_as(2), Some(Settled::Ack), "the lane goes on");
    let counted = |lane, reason| {
        metrics
            .dead_letters
            .with_label_values(&[lane, reason])
            .get()
    };
    assert_eq!(counted("calls", "internal_error"), 1);
    let ended = metrics.events.with_label_values(&["dead_lettered"]).get();
    assert_eq!(ended, 1);
    shut_down(stop, task).await;
    queue.assert_each_delivery_ended_once();
}

#[tokio::test]
async fn a_wait_gives_its_slot_back_and_is_acked_once_it_is_over() {
    let queue = Queue::with(&["wait", "ack", "ack"]);
    let until_at = Instant::now() + Duration::from_millis(400);
    let script = Script::new(until_at);
    // One slot: the acks can only run while the waiting message has given it back.
    let (stop, task) = start(lane(1, Duration::from_secs(5)), &queue, &script);

    until("both acks", || {
        queue.settled_as(1).is_some() && queue.settled_as(2).is_some()
    })
    .await;
    assert_eq!(
        queue.settled_as(0),
        None,
        "still waiting for the other owner"
    );

    until("the wait's end", || queue.settled_as(0).is_some()).await;
    assert_eq!(queue.settled_as(0), Some(Settled::Ack));
    let acked_at = queue
        .state
        .lock()
        .unwrap()
        .settled
        .iter()
        .find(|e| e.1 == 0)
        .unwrap()
        .3;
    assert!(acked_at >= until_at, "acked only once `until` passed");
    // Its last look is due within a second of `until` (pauses stop doubling at
    // 1 s): it got its slot back from the idle loop, not at the 5 s heartbeat.
    assert!(
        acked_at < until_at + Duration::from_secs(3),
        "acked {:?} after `until`",
        acked_at - until_at
    );
    assert!(
        script.waits.load(Ordering::SeqCst) >= 2,
        "looked at again while it waited"
    );
    shut_down(stop, task).await;
    queue.assert_each_delivery_ended_once();
}

#[tokio::test]
async fn shutdown_drains_in_flight_work_and_requeues_the_rest() {
    // Three slots: `work` finishes during the drain, `stop` gives up at
    // shutdown, `hang` outlives the drain deadline; the last two are never taken.
    let queue = Queue::with(&["work", "stop", "hang", "ack", "ack"]);
    let script = Script::new(Instant::now());
    let (stop, task) = start(lane(3, Duration::from_millis(300)), &queue, &script);
    until("three in hand", || {
        script.running.load(Ordering::SeqCst) == 3
    })
    .await;

    stop.cancel();
    script.gate.add_permits(1);
    shut_down(stop, task).await;

    assert_eq!(queue.settled_as(0), Some(Settled::Ack), "drained");
    assert_eq!(queue.settled_as(1), Some(Settled::Requeue));
    let s = queue.state.lock().unwrap();
    assert_eq!(s.settled.len(), 2);
    let returned: Vec<u32> = s.returned.iter().map(|(_, id)| *id).collect();
    assert_eq!(returned, [2], "unfinished: back to the queue at the close");
    assert_eq!(Vec::from(s.ready.clone()), [2, 3, 4]);
    assert_eq!(s.delivered.len(), 3, "nothing taken after shutdown");
    drop(s);
    queue.assert_each_delivery_ended_once();
}

#[tokio::test]
async fn a_failed_open_or_session_is_followed_by_a_new_session() {
    let queue = Queue::with(&["ack", "ack", "ack"]);
    {
        let mut s = queue.state.lock().unwrap();
        s.failing_opens = 2;
        s.failing_sessions = 1;
    }
    let script = Script::new(Instant::now());
    let the_lane = lane(2, Duration::from_secs(5));
    let health = the_lane.watched.as_ref().unwrap().health.clone();
    health.lanes.store(1, Ordering::SeqCst);
    let (stop, task) = start(the_lane, &queue, &script);

    until("every message acked", || {
        let acked: HashSet<u32> = queue
            .settled()
            .into_iter()
            .filter(|(_, how)| *how == Settled::Ack)
            .map(|(id, _)| id)
            .collect();
        acked.len() == 3
    })
    .await;
    assert_eq!(queue.state.lock().unwrap().sessions, 2);
    assert_eq!(health.sessions.load(Ordering::SeqCst), 2);
    assert!(health.consuming.load(Ordering::SeqCst));
    shut_down(stop, task).await;
    assert!(!health.consuming.load(Ordering::SeqCst));
    queue.assert_each_delivery_ended_once();
}

#[tokio::test]
async fn dead_letters_are_counted_by_lane_and_only_call_events_end_as_events() {
    for (name, events) in [("calls", 1), ("devices", 0)] {
        let queue = Queue::with(&["exhausted"]);
        let script = Script::new(Instant::now());
        let the_lane = Lane {
            name,
            ..lane(1, Duration::from_secs(5))
        };
        let metrics = the_lane.metrics.clone();
        let (stop, task) = start(the_lane, &queue, &script);
        until("the dead letter", || queue.settled().len() == 1).await;
        let detail = "database unavailable".to_string();
        let expected = Settled::DeadLetter("retry_exhausted", detail);
        assert_eq!(queue.settled_as(0), Some(expected));
        let counted = metrics
            .dead_letters
            .with_label_values(&[name, "retry_exhausted"]);
        assert_eq!(counted.get(), 1, "{name}");
        let ended = metrics.events.with_label_values(&["dead_lettered"]).get();
        assert_eq!(ended, events, "{name}");
        shut_down(stop, task).await;
    }
}
