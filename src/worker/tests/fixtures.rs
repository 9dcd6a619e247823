//! The in-memory source (a queue that hands out deliveries, records how each
//! was settled, and at a session's close takes back what was left unsettled,
//! as a broker does) and a handler that follows a script named by the
//! message's body.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::worker::{Delivery, Disposition, Handler, Incoming, Session, Source, SourceError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Settled {
    Ack,
    Requeue,
    DeadLetter(&'static str, String),
}

/// The queue and what became of every delivery (a delivery tag per handing out).
#[derive(Default)]
pub(super) struct Queue {
    pub(super) state: Mutex<State>,
    pub(super) arrived: Notify,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) ready: VecDeque<u32>,
    pub(super) bodies: HashMap<u32, &'static str>,
    pub(super) next_tag: u64,
    /// Handed out and not yet settled: tag → message.
    pub(super) unsettled: HashMap<u64, u32>,
    pub(super) delivered: Vec<(u64, u32)>,
    pub(super) settled: Vec<(u64, u32, Settled, Instant)>,
    /// Unsettled when their session closed: back in the queue.
    pub(super) returned: Vec<(u64, u32)>,
    pub(super) sessions: usize,
    /// Opens that fail before one succeeds, and sessions that fail after handing
    /// out one delivery.
    pub(super) failing_opens: usize,
    pub(super) failing_sessions: usize,
}

impl Queue {
    pub(super) fn with(bodies: &[&'static str]) -> Arc<Self> {
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

    pub(super) fn settled(&self) -> Vec<(u32, Settled)> {
        let s = self.state.lock().unwrap();
        s.settled
            .iter()
            .map(|(_, id, how, _)| (*id, how.clone()))
            .collect()
    }

    pub(super) fn settled_as(&self, id: u32) -> Option<Settled> {
        self.settled()
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, how)| how)
    }

    /// Every delivery was settled or returned at a close, exactly once.
    pub(super) fn assert_each_delivery_ended_once(&self) {
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

pub(super) struct MemSource(pub(super) Arc<Queue>);
pub(super) struct MemSession {
    pub(super) queue: Arc<Queue>,
    pub(super) fails_after_one: bool,
    pub(super) handed_out: usize,
}
pub(super) struct MemDelivery {
    pub(super) queue: Arc<Queue>,
    pub(super) tag: u64,
    pub(super) id: u32,
    pub(super) body: &'static str,
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
/// `stop` (until shutdown, then `Retry`); `hang` (for ever, shutdown or not);
/// `exhausted` (dead-lettered as `retry_exhausted`).
pub(super) struct Script {
    pub(super) running: AtomicUsize,
    pub(super) most: AtomicUsize,
    pub(super) gate: Semaphore,
    pub(super) until: Instant,
    pub(super) waits: AtomicUsize,
}

impl Script {
    pub(super) fn new(until: Instant) -> Arc<Self> {
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
            "exhausted" => Disposition::DeadLetter {
                kind: "retry_exhausted",
                message: "database unavailable".into(),
            },
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
