//! How every retry in the worker is spaced: one value type, a schedule per use.
//!
//! A schedule starts at `min_delay` and doubles up to `max_delay`, with or
//! without jitter, and never runs out: what bounds a retry (a ring deadline, a
//! patience, shutdown) is the caller's business, not the schedule's.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// How retries are spaced. A value, so tests can make it fast and deterministic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub jitter: bool,
}

impl RetryPolicy {
    /// `min` doubling to `max`, without jitter.
    pub const fn doubling(min: Duration, max: Duration) -> Self {
        Self {
            min_delay: min,
            max_delay: max,
            jitter: false,
        }
    }

    /// The same, jittered (many clients retrying one server).
    pub const fn jittered(self) -> Self {
        Self {
            jitter: true,
            ..self
        }
    }

    /// A fresh schedule.
    pub fn delays(&self) -> Delays {
        let mut b = ExponentialBuilder::new()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .without_max_times();
        if self.jitter {
            b = b.with_jitter();
        }
        Delays {
            inner: b.build(),
            max: self.max_delay,
        }
    }
}

/// One schedule's pauses, in order; endless.
pub struct Delays {
    inner: backon::ExponentialBackoff,
    max: Duration,
}

impl Delays {
    /// The next pause.
    pub fn next_delay(&mut self) -> Duration {
        self.inner.next().unwrap_or(self.max)
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_doubles_to_its_cap_and_never_ends() {
        let p = RetryPolicy::doubling(Duration::from_millis(100), Duration::from_millis(500));
        let got: Vec<u128> = p.delays().take(6).map(|d| d.as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 500, 500, 500]);
    }

    #[test]
    fn jitter_stays_within_twice_the_schedule() {
        let p =
            RetryPolicy::doubling(Duration::from_millis(100), Duration::from_secs(1)).jittered();
        for (i, d) in p.delays().take(8).enumerate() {
            let base = (100u128 << i.min(4)).min(1000);
            assert!(
                d.as_millis() >= base && d.as_millis() <= 2 * base,
                "{i}: {d:?}"
            );
        }
    }
}
