//! A consumer's acks in runs. Every `basic.ack` frame costs RabbitMQ about as
//! much as the delivery it settles (README, "Acks in runs"), so an ack is held
//! only until the writer's next write, and then the acked deliveries at the
//! front, the oldest ones, go out as one ack with `multiple`. An ack behind a
//! delivery still in hand goes out on its own in that same write: nothing
//! waits longer than it did when every ack was a frame of its own, so no
//! prefetch credit is held back and the crash window does not grow.
//!
//! A nack or reject is never part of a run: it is sent with the acks held
//! before it, then forgotten, so a later `multiple` does not cover it.

use std::collections::VecDeque;

/// The deliveries in hand, in the order of their tags (which the broker hands
/// out increasing on a channel).
#[derive(Default)]
pub(super) struct AckRuns {
    held: VecDeque<Held>,
    /// How many of `held` are acked, waiting for the next write.
    acked: usize,
}

struct Held {
    tag: u64,
    acked: bool,
}

impl AckRuns {
    /// A delivery came: it is in hand until it is settled.
    pub(super) fn delivered(&mut self, tag: u64) {
        debug_assert!(self.held.back().is_none_or(|h| h.tag < tag));
        self.held.push_back(Held { tag, acked: false });
    }

    fn position(&self, tag: u64) -> Option<usize> {
        self.held.binary_search_by_key(&tag, |h| h.tag).ok()
    }

    /// Holds `tag`'s ack for the next write; `false` when `tag` is not in
    /// hand (the caller then sends its ack as it is, and the broker judges).
    pub(super) fn ack(&mut self, tag: u64) -> bool {
        match self.position(tag) {
            Some(i) if !self.held[i].acked => {
                self.held[i].acked = true;
                self.acked += 1;
                true
            }
            _ => false,
        }
    }

    /// `tag` is settled by a frame of its own (nack, reject), sent after
    /// whatever [`Self::drain`] gave before it.
    pub(super) fn forget(&mut self, tag: u64) {
        if let Some(i) = self.position(tag) {
            if self.held[i].acked {
                self.acked -= 1;
            }
            self.held.remove(i);
        }
    }

    /// The acks to send now, as `(tag, multiple)`: one covering the acked
    /// run at the front, then each acked delivery behind one still in hand.
    pub(super) fn drain(&mut self, mut send: impl FnMut(u64, bool)) {
        if self.acked == 0 {
            return;
        }
        let mut front = None;
        while self.held.front().is_some_and(|h| h.acked) {
            front = self.held.pop_front().map(|h| h.tag);
            self.acked -= 1;
        }
        if let Some(tag) = front {
            send(tag, true);
        }
        if self.acked > 0 {
            self.held.retain(|h| {
                if h.acked {
                    send(h.tag, false);
                }
                !h.acked
            });
            self.acked = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::AckRuns;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Fate {
        Acked,
        /// Nacked or rejected: a frame of its own.
        Own,
    }

    /// The broker's side: what each delivery's frames did to it. A frame
    /// naming a tag that is no longer unacked is RabbitMQ's "unknown delivery
    /// tag" (the channel closes).
    #[derive(Default)]
    struct Broker {
        unacked: BTreeMap<u64, ()>,
        fates: BTreeMap<u64, Fate>,
        frames: usize,
    }

    impl Broker {
        fn ack(&mut self, tag: u64, multiple: bool) -> Result<(), String> {
            self.frames += 1;
            if self.unacked.remove(&tag).is_none() {
                return Err(format!("unknown delivery tag {tag}"));
            }
            self.fates.insert(tag, Fate::Acked);
            if multiple {
                let below: Vec<u64> = self.unacked.range(..tag).map(|(t, _)| *t).collect();
                for t in below {
                    self.unacked.remove(&t);
                    self.fates.insert(t, Fate::Acked);
                }
            }
            Ok(())
        }

        fn own(&mut self, tag: u64) -> Result<(), String> {
            self.frames += 1;
            self.unacked
                .remove(&tag)
                .ok_or(format!("unknown delivery tag {tag}"))?;
            self.fates.insert(tag, Fate::Own);
            Ok(())
        }
    }

    /// One step of a consumer's life.
    #[derive(Clone, Debug)]
    enum Step {
        /// The next delivery arrives.
        Deliver,
        /// The `n`th delivery in hand (modulo) is settled: acked or not.
        Settle(prop::sample::Index, bool),
        /// The writer writes.
        Write,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        let step = prop_oneof![
            3 => Just(Step::Deliver),
            4 => (any::<prop::sample::Index>(), prop::bool::weighted(0.8))
                .prop_map(|(i, ack)| Step::Settle(i, ack)),
            2 => Just(Step::Write),
        ];
        prop::collection::vec(step, 1..200)
    }

    proptest! {
        /// Whatever the order deliveries are settled in and whenever the writer
        /// writes: every delivery ends as the consumer settled it, no frame
        /// names a tag the broker no longer holds, and after each write no
        /// settled delivery is still unacked at the broker.
        #[test]
        fn each_delivery_ends_as_settled_and_nothing_waits_past_a_write(steps in steps()) {
            let (mut runs, mut broker) = (AckRuns::default(), Broker::default());
            let mut next_tag = 1;
            let mut in_hand: Vec<u64> = Vec::new();
            let mut settled: BTreeMap<u64, Fate> = BTreeMap::new();
            let mut result = Ok(());
            let mut write = |runs: &mut AckRuns, broker: &mut Broker| {
                runs.drain(|tag, multiple| {
                    if result.is_ok() {
                        result = broker.ack(tag, multiple);
                    }
                });
            };
            for step in steps.iter().chain([&Step::Write]) {
                match step {
                    Step::Deliver => {
                        broker.unacked.insert(next_tag, ());
                        runs.delivered(next_tag);
                        in_hand.push(next_tag);
                        next_tag += 1;
                    }
                    Step::Settle(i, ack) if !in_hand.is_empty() => {
                        let tag = in_hand.remove(i.index(in_hand.len()));
                        if *ack {
                            prop_assert!(runs.ack(tag));
                            settled.insert(tag, Fate::Acked);
                        } else {
                            // Sent with the acks held before it, as `Shared` does.
                            write(&mut runs, &mut broker);
                            prop_assert!(broker.own(tag).is_ok());
                            runs.forget(tag);
                            settled.insert(tag, Fate::Own);
                        }
                    }
                    Step::Settle(..) => {}
                    Step::Write => {
                        write(&mut runs, &mut broker);
                        for tag in settled.keys() {
                            prop_assert!(!broker.unacked.contains_key(tag), "{} waits", tag);
                        }
                    }
                }
            }
            prop_assert_eq!(result, Ok(()));
            prop_assert_eq!(&broker.fates, &settled);
            for tag in &in_hand {
                prop_assert!(broker.unacked.contains_key(tag), "{} acked while in hand", tag);
            }
        }

        /// Acks of the oldest deliveries, in any order before one write, go
        /// out as one frame.
        #[test]
        fn acks_of_the_front_before_a_write_take_one_frame(
            order in Just((1..=64u64).collect::<Vec<_>>()).prop_shuffle(),
            later in 0..8u64,
        ) {
            let (mut runs, mut frames) = (AckRuns::default(), Vec::new());
            for tag in 1..=64 + later {
                runs.delivered(tag);
            }
            for tag in order {
                prop_assert!(runs.ack(tag));
            }
            runs.drain(|tag, multiple| frames.push((tag, multiple)));
            prop_assert_eq!(frames, vec![(64, true)]);
        }
    }

    #[test]
    fn an_ack_of_a_tag_not_in_hand_is_left_to_the_caller() {
        let mut runs = AckRuns::default();
        runs.delivered(1);
        assert!(runs.ack(1));
        assert!(!runs.ack(1), "a second ack of the same delivery");
        assert!(!runs.ack(7), "never delivered");
    }
}
