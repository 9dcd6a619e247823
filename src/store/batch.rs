//! Opportunistic batching: concurrent calls of one kind share one statement.
//!
//! A [`Batcher`] runs a statement as soon as a request arrives; requests that
//! arrive while it runs wait and go together in the next one. An idle worker
//! pays no delay, a busy one pays one statement (and one commit) for many
//! events instead of one each — Postgres spent more CPU per ring than the
//! worker did, most of it on small statements.
//!
//! A statement off the ring's critical path (recording outcomes) may linger:
//! while the statement it takes turns with is idle, a small batch waits a few
//! milliseconds for more before it runs. At a paced load, where events come
//! one by one, that turns one statement (and one commit, and one ack) per event
//! into one per handful of events; under a heavy one the batch waits for its
//! turn instead, gathering meanwhile, as it always did.
//!
//! A batch that fails with a statement error (not a lost connection) runs again
//! request by request, so one bad request fails alone.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Histogram;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::warn;

use super::StoreError;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A batch's requests, shared with the statement that runs them: a batch that
/// fails runs again request by request from the same requests, with no copy
/// of every batch made in case it fails.
pub type Requests<R> = Arc<[R]>;

/// A batch slower than this is logged: every event in it waited that long.
const SLOW_BATCH: Duration = Duration::from_secs(1);

/// Requests of one kind, executed in batches by a task of its own.
pub struct Batcher<R, T> {
    jobs: mpsc::UnboundedSender<(R, Reply<T>)>,
}

/// How a batcher forms its batches.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Most requests a batch.
    pub max: usize,
    /// How long a batch of fewer than `max / 2` requests waits, from its first
    /// request's arrival, for more before it takes its turn, while the turn
    /// stays free (see `linger`); zero: not at all.
    pub linger: Duration,
}

impl<R, T> Batcher<R, T>
where
    R: Clone + Send + Sync + 'static,
    T: Send + 'static,
{
    /// Starts the task: batches shaped by `shape`, each run while it holds a
    /// permit of `turns` (batchers sharing one semaphore take turns), its size
    /// observed in `sizes`. `run` answers a batch with one result per request,
    /// in order. The task ends when the batcher is dropped. `name` is for the
    /// logs.
    pub fn spawn<F, Fut>(
        name: &'static str,
        shape: Shape,
        turns: Arc<Semaphore>,
        sizes: Option<Histogram>,
        run: F,
    ) -> Self
    where
        F: Fn(Requests<R>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<T>, StoreError>> + Send + 'static,
    {
        let (jobs, mut rx) = mpsc::unbounded_channel::<(R, Reply<T>)>();
        let run = Arc::new(run);
        tokio::spawn(async move {
            loop {
                // The turn is taken once there is work (an idle batcher holds
                // none), and the batch is everything that arrived until then.
                let Some(first) = rx.recv().await else { break };
                let mut batch = vec![first];
                // Lingering pays only while the other statement is idle: a
                // batch that must wait for its turn gathers during the wait.
                if !shape.linger.is_zero() && turns.available_permits() > 0 {
                    linger(&mut rx, &mut batch, shape, &turns).await;
                }
                let slot = turns.clone().acquire_owned().await.expect("never closed");
                while batch.len() < shape.max {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                if let Some(sizes) = &sizes {
                    sizes.observe(batch.len() as f64);
                }
                let run = run.clone();
                tokio::spawn(async move {
                    let (started, size) = (Instant::now(), batch.len());
                    execute(&*run, batch).await;
                    drop(slot);
                    if started.elapsed() > SLOW_BATCH {
                        warn!(
                            statement = name,
                            requests = size,
                            ms = started.elapsed().as_millis() as u64,
                            "shared statement was slow"
                        );
                    }
                });
            }
        });
        Self { jobs }
    }

    /// Runs `req` in the next batch and returns its result.
    pub async fn call(&self, req: R) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((req, reply))
            .map_err(|_| StoreError::Batch("the batch task has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Batch("the batch was abandoned".into()))?
    }
}

/// Adds to `batch` what arrives within `shape.linger` of now, until it holds
/// half of `shape.max`, or until a request finds the turn taken (the batch then
/// gathers while it waits for it). A channel that closes meanwhile ends it too.
async fn linger<J>(
    rx: &mut mpsc::UnboundedReceiver<J>,
    batch: &mut Vec<J>,
    shape: Shape,
    turns: &Semaphore,
) {
    let until = tokio::time::Instant::now() + shape.linger;
    while batch.len() < shape.max / 2 {
        tokio::select! {
            job = rx.recv() => match job {
                Some(job) => batch.push(job),
                None => return,
            },
            _ = tokio::time::sleep_until(until) => return,
        }
        if turns.available_permits() == 0 {
            return;
        }
    }
}

async fn execute<R, T, F, Fut>(run: &F, batch: Vec<(R, Reply<T>)>)
where
    R: Clone,
    F: Fn(Requests<R>) -> Fut,
    Fut: Future<Output = Result<Vec<T>, StoreError>>,
{
    let (reqs, replies): (Vec<R>, Vec<Reply<T>>) = batch.into_iter().unzip();
    let reqs: Requests<R> = reqs.into();
    let alone = (reqs.len() > 1).then(|| reqs.clone());
    match (run(reqs).await, alone) {
        (Ok(outs), _) => {
            debug_assert_eq!(outs.len(), replies.len(), "one result per request");
            for (reply, out) in replies.into_iter().zip(outs) {
                let _ = reply.send(Ok(out));
            }
        }
        // One bad request must not fail the others: each runs on its own.
        (Err(e), Some(reqs)) if e.is_statement_error() => {
            for (req, reply) in reqs.iter().zip(replies) {
                let out = run(Arc::from([req.clone()])).await.and_then(|mut v| {
                    v.pop()
                        .ok_or_else(|| StoreError::Batch("no result for the request".into()))
                });
                let _ = reply.send(out);
            }
        }
        (Err(e), None) => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
        (Err(e), Some(_)) => {
            let message = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(StoreError::Batch(message.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNHURRIED: Shape = Shape {
        max: 64,
        linger: Duration::ZERO,
    };

    /// Requests `gap` apart, each answered; the sizes of the batches they went in.
    async fn one_by_one(shape: Shape, n: u32, gap: Duration) -> Vec<usize> {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let batcher = Arc::new(Batcher::spawn(
            "test",
            shape,
            Arc::new(Semaphore::new(1)),
            None,
            move |reqs: Requests<u32>| {
                seen.lock().unwrap().push(reqs.len());
                async move { Ok(reqs.to_vec()) }
            },
        ));
        let mut calls = Vec::new();
        for i in 0..n {
            let b = batcher.clone();
            calls.push(tokio::spawn(async move { b.call(i).await }));
            tokio::time::sleep(gap).await;
        }
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), i as u32);
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), n as usize);
        sizes
    }

    /// Requests that come one by one: without lingering each runs alone; a
    /// lingering batcher gathers those within its linger of the first, and
    /// stops gathering at half of its most.
    #[tokio::test(start_paused = true)]
    async fn a_lingering_batcher_gathers_requests_that_come_one_by_one() {
        let ms = Duration::from_millis;
        assert_eq!(one_by_one(UNHURRIED, 6, ms(1)).await, vec![1; 6]);
        let lingering = Shape {
            max: 64,
            linger: ms(10),
        };
        // 1 ms apart: the first batch holds those sent within 10 ms of the first.
        let sizes = one_by_one(lingering, 25, ms(1)).await;
        assert!(sizes.len() <= 4 && sizes[0] >= 9, "{sizes:?}");
        // Farther apart than the linger: each alone, none held back for ever.
        assert_eq!(one_by_one(lingering, 4, ms(15)).await, vec![1; 4]);
        // Half of the most ends the wait: a long linger never delays a full batch.
        let long = Shape {
            max: 8,
            linger: Duration::from_secs(3600),
        };
        let started = tokio::time::Instant::now();
        let sizes = one_by_one(long, 4, Duration::ZERO).await;
        assert_eq!(sizes, vec![4]);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// A batch that finds the other statement running does not linger: it
    /// waits for its turn, gathering meanwhile, and runs once it has it.
    #[tokio::test(start_paused = true)]
    async fn a_batch_that_must_wait_for_its_turn_does_not_linger() {
        let turns = Arc::new(Semaphore::new(1));
        let batcher = Batcher::spawn(
            "test",
            Shape {
                max: 64,
                linger: Duration::from_secs(3600),
            },
            turns.clone(),
            None,
            |reqs: Requests<u32>| async move { Ok(reqs.to_vec()) },
        );
        let other = turns.clone().acquire_owned().await.unwrap();
        let started = tokio::time::Instant::now();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(other);
        });
        assert_eq!(batcher.call(7).await.unwrap(), 7);
        release.await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "it lingered");
    }

    #[tokio::test]
    async fn concurrent_requests_share_batches_and_keep_their_order() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let batcher = Batcher::spawn(
            "test",
            Shape {
                max: 8,
                linger: Duration::ZERO,
            },
            Arc::new(Semaphore::new(1)),
            None,
            move |reqs: Requests<u32>| {
                seen.lock().unwrap().push(reqs.len());
                async move {
                    tokio::task::yield_now().await;
                    Ok(reqs.iter().map(|r| r * 10).collect())
                }
            },
        );
        let answers = futures_util::future::join_all((0..20u32).map(|i| batcher.call(i))).await;
        let answers: Vec<u32> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(answers, (0..20).map(|i| i * 10).collect::<Vec<_>>());
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|&n| n <= 8), "{sizes:?}");
        assert!(sizes.len() < 20, "requests were batched: {sizes:?}");
    }

    #[tokio::test]
    async fn a_failed_batch_runs_again_request_by_request() {
        // A statement error (a value Postgres refuses) in one request of a batch.
        let batcher = Batcher::spawn(
            "test",
            Shape {
                max: 8,
                linger: Duration::ZERO,
            },
            Arc::new(Semaphore::new(1)),
            None,
            |reqs: Requests<i32>| async move {
                if reqs.contains(&-1) {
                    return Err(StoreError::BadToken("refused"));
                }
                Ok(reqs.to_vec())
            },
        );
        let answers = futures_util::future::join_all([1, -1, 2].map(|i| batcher.call(i))).await;
        assert_eq!(answers[0].as_ref().ok(), Some(&1));
        assert!(answers[1].is_err());
        assert_eq!(answers[2].as_ref().ok(), Some(&2));
    }

    /// Two batchers on one semaphore (a ring's admit and finish): never both
    /// at once, an idle one holds no turn, and one waiting for its turn
    /// gathers everything that arrives meanwhile into one batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batchers_sharing_turns_take_them_in_turn() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        let turns = Arc::new(Semaphore::new(1));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let gate = Arc::new(tokio::sync::Notify::new());
        let gated = Arc::new(AtomicBool::new(false));
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let spawn = |gate_it: bool| {
            let (running, most, gate, gated, sizes) = (
                running.clone(),
                most.clone(),
                gate.clone(),
                gated.clone(),
                sizes.clone(),
            );
            Batcher::spawn(
                "test",
                UNHURRIED,
                turns.clone(),
                None,
                move |reqs: Requests<u32>| {
                    let (running, most, gate, gated) =
                        (running.clone(), most.clone(), gate.clone(), gated.clone());
                    if !gate_it {
                        sizes.lock().unwrap().push(reqs.len());
                    }
                    async move {
                        most.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                        if gate_it && reqs.contains(&0) {
                            gated.store(true, SeqCst);
                            gate.notified().await;
                        }
                        for _ in 0..3 {
                            tokio::task::yield_now().await;
                        }
                        running.fetch_sub(1, SeqCst);
                        Ok(reqs.to_vec())
                    }
                },
            )
        };
        let (a, b) = (Arc::new(spawn(true)), Arc::new(spawn(false)));
        // A is idle: B gets its turn.
        let alone = tokio::time::timeout(Duration::from_secs(5), b.call(7)).await;
        assert_eq!(alone.expect("an idle batcher holds no turn").ok(), Some(7));

        // A runs (held at the gate) while ten requests reach B: one batch.
        sizes.lock().unwrap().clear();
        let held = tokio::spawn({
            let a = a.clone();
            async move { a.call(0).await }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gated.load(SeqCst) {
            assert!(Instant::now() < deadline, "A never ran");
            tokio::task::yield_now().await;
        }
        let sent = Arc::new(AtomicUsize::new(0));
        let waiting = tokio::spawn(futures_util::future::join_all((1..=10).map(|i| {
            let (b, sent) = (b.clone(), sent.clone());
            // Counted in the same poll that sends the request.
            async move {
                sent.fetch_add(1, SeqCst);
                b.call(i).await
            }
        })));
        while sent.load(SeqCst) < 10 {
            assert!(Instant::now() < deadline, "the requests were never sent");
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        held.await.unwrap().unwrap();
        let answers: Vec<u32> = waiting
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(answers, (1..=10).collect::<Vec<_>>());
        assert_eq!(
            *sizes.lock().unwrap(),
            vec![10],
            "B gathered its requests while A ran"
        );

        // Both busy at once: never two statements at a time.
        let (xs, ys) = futures_util::future::join(
            futures_util::future::join_all((100..150).map(|i| a.call(i))),
            futures_util::future::join_all((200..250).map(|i| b.call(i))),
        )
        .await;
        assert!(xs.iter().chain(&ys).all(Result::is_ok));
        assert_eq!(most.load(SeqCst), 1, "the two batchers ran at once");
    }
}
