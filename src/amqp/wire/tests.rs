//! The confirm bookkeeping, against the orders a broker may answer in.

use std::sync::Arc;

use proptest::prelude::*;
use tokio::sync::oneshot;

use super::io::{confirmed, returned};
use super::{message_key, Confirm, Shared, Unconfirmed};

/// Mandatory publishes with these bodies awaiting confirms, tags 1..=n.
fn pending(bodies: &[u8]) -> (Arc<Shared>, Vec<oneshot::Receiver<Confirm>>) {
    let shared = Shared::new(Arc::default(), 131_072);
    let mut rxs = Vec::new();
    let mut st = shared.state.lock().unwrap();
    for (i, b) in bodies.iter().enumerate() {
        let (tx, rx) = oneshot::channel();
        st.unconfirmed.push_back(Unconfirmed {
            tag: i as u64 + 1,
            answer: tx,
            returnable: Some(message_key("x", "k", &[*b])),
            returned: false,
        });
        rxs.push(rx);
    }
    drop(st);
    (shared, rxs)
}

proptest! {
    /// RabbitMQ returns an unroutable mandatory message before it confirms
    /// it, and confirms in runs (`multiple` up to a run's last tag) or one by
    /// one. Whatever the runs and however returns and confirms interleave,
    /// each publish learns whether it was returned, and nacks stay nacks.
    /// (Bodies repeat: alike messages route alike, here odd bodies return.)
    #[test]
    fn every_publish_gets_its_own_answer(
        bodies in prop::collection::vec(0u8..6, 1..60),
        run_ends in prop::collection::vec(any::<bool>(), 60),
        singles in any::<bool>(),
        nack_run in any::<prop::sample::Index>(),
    ) {
        let (shared, mut rxs) = pending(&bodies);
        let routed = |b: u8| b % 2 == 0;
        let n = bodies.len();
        // Runs of consecutive tags, each ending where `run_ends` says.
        let mut runs: Vec<Vec<usize>> = vec![Vec::new()];
        for (i, ends) in run_ends.iter().enumerate().take(n) {
            runs.last_mut().unwrap().push(i);
            if *ends && i + 1 < n {
                runs.push(Vec::new());
            }
        }
        let nacked = nack_run.index(runs.len());
        for (r, run) in runs.iter().enumerate() {
            // The run's returns, newest first, then its confirm.
            for &i in run.iter().rev() {
                if !routed(bodies[i]) {
                    returned(&shared, message_key("x", "k", &[bodies[i]]));
                }
            }
            let ack = r != nacked;
            if singles {
                for &i in run.iter().rev() {
                    confirmed(&shared, i as u64 + 1, false, ack);
                }
            } else {
                confirmed(&shared, *run.last().unwrap() as u64 + 1, true, ack);
            }
        }
        for (r, run) in runs.iter().enumerate() {
            for &i in run {
                let want = if r == nacked {
                    Confirm::Nack
                } else {
                    Confirm::Ack { returned: !routed(bodies[i]) }
                };
                prop_assert_eq!(rxs[i].try_recv().unwrap(), want, "publish {}", i);
            }
        }
        prop_assert!(shared.state.lock().unwrap().unconfirmed.is_empty());
    }
}
