//! Where a latency phase's slow samples sit in time.

use serde::Serialize;

/// Samples slower than [`Slow::MS`] by the second of the phase they were sent
/// in: a stall shows as a few seconds with many, and `from` (UTC) is when it
/// began, to find it in the worker's, Postgres's and RabbitMQ's logs.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Slow {
    pub samples: usize,
    /// (second of the phase, slow samples sent in it), in order.
    pub by_second: Vec<(i64, usize)>,
    pub from: Option<String>,
}

impl Slow {
    pub const MS: i64 = 50;

    /// From (sent at, ms since the epoch; latency in ms) samples.
    pub fn of(samples: &[(i64, i64)]) -> Self {
        let Some(start) = samples.iter().map(|(sent, _)| *sent).min() else {
            return Slow::default();
        };
        let mut by_second = std::collections::BTreeMap::new();
        let mut first = None::<i64>;
        for (sent, _) in samples.iter().filter(|(_, ms)| *ms > Self::MS) {
            *by_second.entry((sent - start) / 1000).or_insert(0) += 1;
            first = Some(first.map_or(*sent, |f| f.min(*sent)));
        }
        Slow {
            samples: by_second.values().sum(),
            by_second: by_second.into_iter().collect(),
            from: first.map(|ms| voip_push_worker::apns::cert::rfc3339(ms / 1000)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Slow;

    #[test]
    fn slow_samples_are_told_by_the_second_they_were_sent_in() {
        let t0 = 1_800_000_000_000;
        // 1 ms apart for 5 s; those sent in the phase's fourth second waited 120 ms.
        let samples: Vec<(i64, i64)> = (0..5_000)
            .map(|i| (t0 + i, if (3_000..3_100).contains(&i) { 120 } else { 3 }))
            .collect();
        let slow = Slow::of(&samples);
        assert_eq!(slow.samples, 100);
        assert_eq!(slow.by_second, vec![(3, 100)]);
        assert_eq!(slow.from.as_deref(), Some("2027-01-15T08:00:03Z"));
        assert_eq!(Slow::of(&samples[..3_000]), Slow::default(), "none slow");
        assert_eq!(Slow::of(&[]), Slow::default());
    }
}
