//! The driver against an in-memory source: a queue that hands out deliveries,
//! records how each was settled, and at a session's close takes back what was
//! left unsettled, as a broker does. Handlers follow a script named by the
//! message's body. Tests wait by polling with a deadline.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::*;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Settled {
    Ack,
    Requeue,
    DeadLetter(&'static str, String),
}

/// The queue and what became of every delivery (a delivery tag per handing out).
#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    arrived: Notify,
}

#[derive(Default)]
struct State {
    ready: VecDeque<u32>,
    bodies: HashMap<u32, &'static str>,
    next_tag: u64,
    /// Handed out and not yet settled: tag → message.
    unsettled: HashMap<u64, u32>,
    delivered: Vec<(u64, u32)>,
    settled: Vec<(u64, u32, Settled, Instant)>,
    /// Unsettled when their session closed: back in the queue.
    returned: Vec<(u64, u32)>,
    sessions: usize,
    /// Opens that fail before one succeeds, and sessions that fail after handing
    /// out one delivery.
    failing_opens: usize,
    failing_sessions: usize,
}

impl Queue {
    fn with(bodies: &[&'static str]) -> Arc<Self> {
        let q = Arc::new(Queue::default());
        let mut s = q.state.lock().unwrap();
        for (i, body) in bodies.iter().enumerate() {
            let id = i as u32;
            s.ready.push_back(id);
            s.bodies.insert(id, body);
        }
        drop(s);
        q
    }

    fn settled(&self) -> Vec<(u32, Settled)> {
        let s = self.state.lock().unwrap();
        s.settled
            .iter()
            .map(|(_, id, how, _)| (*id, how.clone()))
            .collect()
    }

    fn settled_as(&self, id: u32) -> Option<Settled> {
        self.settled()
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, how)| how)
    }

    /// Every delivery was settled or returned at a close, exactly once.
    fn assert_each_delivery_ended_once(&self) {
        let s = self.state.lock().unwrap();
        let mut ends: HashMap<u64, usize> = HashMap::new();
        for tag in s
            .settled
            .iter()
            .map(|e| e.0)
            .chain(s.returned.iter().map(|e| e.0))
        {
            *ends.entry(tag).or_default() += 1;
        }
        for (tag, id) in &s.delivered {
            assert_eq!(ends.get(tag), Some(&1), "delivery {tag} of message {id}");
        }
        assert!(s.unsettled.is_empty(), "left unsettled: {:?}", s.unsettled);
    }
}

struct MemSource(Arc<Queue>);
struct MemSession {
    queue: Arc<Queue>,
    fails_after_one: bool,
    handed_out: usize,
}
struct MemDelivery {
    queue: Arc<Queue>,
    tag: u64,
    id: u32,
    body: &'static str,
}

impl Source for MemSource {
    type Session = MemSession;

    fn name(&self) -> &str {
        "memory"
    }

    async fn open(&self, _prefetch: u16) -> Result<MemSession, SourceError> {
        let mut s = self.0.state.lock().unwrap();
        if s.failing_opens > 0 {
            s.failing_opens -= 1;
            return Err("connection refused".into());
        }
        s.sessions += 1;
        let fails_after_one = s.failing_sessions > 0;
        s.failing_sessions = s.failing_sessions.saturating_sub(1);
        Ok(MemSession {
            queue: self.0.clone(),
            fails_after_one,
            handed_out: 0,
        })
    }
}

impl Session for MemSession {
    type Delivery = MemDelivery;

    async fn next(&mut self) -> Option<Result<MemDelivery, SourceError>> {
        if self.fails_after_one && self.handed_out == 1 {
            return Some(Err("connection reset".into()));
        }
        loop {
            // Created before the look, so a message pushed meanwhile wakes it.
            let arrived = self.queue.arrived.notified();
            {
                let mut s = self.queue.state.lock().unwrap();
                if let Some(id) = s.ready.pop_front() {
                    s.next_tag += 1;
                    let tag = s.next_tag;
                    s.unsettled.insert(tag, id);
                    s.delivered.push((tag, id));
                    self.handed_out += 1;
                    let body = s.bodies[&id];
                    let queue = self.queue.clone();
                    return Some(Ok(MemDelivery {
                        queue,
                        tag,
                        id,
                        body,
                    }));
                }
            }
            arrived.await;
        }
    }

    async fn stop(&mut self) {}

    async fn close(self, _why: &'static str) {
        let mut s = self.queue.state.lock().unwrap();
        let mut left: Vec<(u64, u32)> = s.unsettled.drain().collect();
        left.sort();
        for (tag, id) in left.into_iter().rev() {
            s.ready.push_front(id);
            s.returned.push((tag, id));
        }
        drop(s);
        self.queue.arrived.notify_waiters();
    }
}

impl MemDelivery {
    fn end(self, how: Settled) -> Result<(), SourceError> {
        let mut s = self.queue.state.lock().unwrap();
        if s.unsettled.remove(&self.tag).is_none() {
            return Err("the channel closed".into());
        }
        s.settled.push((self.tag, self.id, how, Instant::now()));
        Ok(())
    }
}

impl Delivery for MemDelivery {
    fn incoming(&self, claim_owner: String) -> Incoming {
        Incoming {
            body: self.body.as_bytes().to_vec(),
            claim_owner,
            ..Default::default()
        }
    }

    async fn ack(self) -> Result<(), SourceError> {
        self.end(Settled::Ack)
    }

    async fn requeue(self) -> Result<(), SourceError> {
        self.end(Settled::Requeue)
    }

    async fn dead_letter(self, reason: &'static str, detail: &str) -> Result<(), SourceError> {
        self.end(Settled::DeadLetter(reason, detail.into()))
    }
}

/// Does what the message's body says: `ack`; `work` (until the test opens
/// `gate`); `panic`; `wait` (another worker holds its claims until `until`);
/// `stop` (until shutdown, then `Retry`); `hang` (for ever, shutdown or not).
struct Script {
    running: AtomicUsize,
    most: AtomicUsize,
    gate: Semaphore,
    until: Instant,
    waits: AtomicUsize,
}

impl Script {
    fn new(until: Instant) -> Arc<Self> {
        Arc::new(Script {
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            gate: Semaphore::new(0),
            until,
            waits: AtomicUsize::new(0),
        })
    }
}

impl Handler for Script {
    async fn handle(&self, msg: &Incoming, stop: &CancellationToken) -> Disposition {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let disposition = match std::str::from_utf8(&msg.body).unwrap() {
            "ack" => Disposition::Ack,
            "work" => {
                self.gate.acquire().await.unwrap().forget();
                Disposition::Ack
            }
            "panic" => {
                self.running.fetch_sub(1, Ordering::SeqCst);
                panic!("a collapse id")
            }
            "wait" => {
                self.waits.fetch_add(1, Ordering::SeqCst);
                Disposition::Wait { until: self.until }
            }
            "stop" => {
                stop.cancelled().await;
                Disposition::Retry("shutting down".into())
            }
            "hang" => std::future::pending().await,
            other => panic!("no script {other:?}"),
        };
        self.running.fetch_sub(1, Ordering::SeqCst);
        disposition
    }
}

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
        let acked: std::collections::HashSet<u32> = queue
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
