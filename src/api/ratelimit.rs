//! A token bucket per client address for the registration endpoints, so a client
//! cannot flood the devices table or guess tokens. In-process: each replica limits
//! on its own, which is enough to stop a flood.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Addresses remembered at most; beyond that, full buckets are forgotten first
/// (they carry no state worth keeping).
const MAX_CLIENTS: usize = 10_000;

pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    /// `per_minute` 0 turns the limit off.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_sec: per_minute as f64 / 60.0,
            burst: burst.max(1) as f64,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `ip`; `false` when its bucket is empty.
    pub fn allow(&self, ip: IpAddr) -> bool {
        self.allow_at(ip, Instant::now())
    }

    fn allow_at(&self, ip: IpAddr, now: Instant) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        let mut buckets = self.buckets.lock().expect("rate limit lock");
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(&ip) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_sec < burst
            });
            if buckets.len() >= MAX_CLIENTS {
                buckets.clear();
            }
        }
        let (tokens, at) = buckets.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_per_address() {
        let l = RateLimiter::new(60, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow_at(a, t0)));
        assert!(!l.allow_at(a, t0));
        assert!(l.allow_at(b, t0), "another address has its own bucket");
        assert!(l.allow_at(a, t0 + Duration::from_millis(1100)));
        assert!(!l.allow_at(a, t0 + Duration::from_millis(1200)));
    }

    #[test]
    fn zero_rate_means_no_limit() {
        let l = RateLimiter::new(0, 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..100).all(|_| l.allow(a)));
    }
}
