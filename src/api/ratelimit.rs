//! A token bucket per client address for the registration endpoints, so a client
//! cannot flood the devices table or guess tokens. In-process: each replica limits
//! on its own, which is enough to stop a flood.
//!
//! Memory is bounded: at most `capacity` buckets, and when a new address comes
//! the least recently seen one is forgotten (forgetting a bucket only gives that
//! address a full one again). Clearing everything instead would let a flood of
//! fresh addresses reset the bucket of the client being limited.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Instant;

/// Addresses remembered at most: ~100 bytes each, so about 1 MB.
const MAX_CLIENTS: usize = 10_000;

struct Bucket {
    tokens: f64,
    at: Instant,
    /// Its key in `Buckets::by_use`.
    used: u64,
}

#[derive(Default)]
struct Buckets {
    by_ip: HashMap<IpAddr, Bucket>,
    /// Use sequence number → address, oldest first: the eviction order.
    by_use: BTreeMap<u64, IpAddr>,
    next_use: u64,
}

pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    capacity: usize,
    buckets: Mutex<Buckets>,
}

/// One IPv6 host usually holds a whole /64 and can pick any address in it: the
/// /64 is the client.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        other => other,
    }
}

impl RateLimiter {
    /// `per_minute` 0 turns the limit off.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self::with_capacity(per_minute, burst, MAX_CLIENTS)
    }

    fn with_capacity(per_minute: u32, burst: u32, capacity: usize) -> Self {
        Self {
            per_sec: per_minute as f64 / 60.0,
            burst: burst.max(1) as f64,
            capacity: capacity.max(1),
            buckets: Mutex::new(Buckets::default()),
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
        let ip = client_key(ip);
        let mut guard = self.buckets.lock().expect("rate limit lock");
        let b = &mut *guard;
        let used = b.next_use;
        b.next_use += 1;
        if !b.by_ip.contains_key(&ip) && b.by_ip.len() >= self.capacity {
            if let Some((_, oldest)) = b.by_use.pop_first() {
                b.by_ip.remove(&oldest);
            }
        }
        let bucket = b.by_ip.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
            used,
        });
        b.by_use.remove(&bucket.used);
        b.by_use.insert(used, ip);
        bucket.used = used;
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_sec;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    #[cfg(test)]
    fn remembered(&self) -> (usize, usize) {
        let b = self.buckets.lock().unwrap();
        (b.by_ip.len(), b.by_use.len())
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

    #[test]
    fn memory_stays_bounded_and_a_flood_of_addresses_does_not_free_the_limited() {
        let l = RateLimiter::with_capacity(1, 2, 100);
        let limited: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        assert!(l.allow_at(limited, t0) && l.allow_at(limited, t0));
        assert!(!l.allow_at(limited, t0));
        // 20,000 distinct addresses pass while the limited client keeps trying.
        for i in 0..20_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(l.allow_at(ip, t0), "a new address gets a full bucket");
            if i % 50 == 0 {
                assert!(!l.allow_at(limited, t0), "still limited after {i} others");
            }
            let (by_ip, by_use) = l.remembered();
            assert!(by_ip <= 100 && by_use == by_ip, "{by_ip} / {by_use}");
        }
        // The least recently seen went first: an early address starts afresh.
        let early = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000));
        assert!(l.allow_at(early, t0) && l.allow_at(early, t0));
    }

    #[test]
    fn an_ipv6_host_is_its_slash_64() {
        let l = RateLimiter::new(1, 1);
        let t0 = Instant::now();
        assert!(l.allow_at("2001:db8:1:2::1".parse().unwrap(), t0));
        assert!(!l.allow_at("2001:db8:1:2:ffff::9".parse().unwrap(), t0));
        assert!(l.allow_at("2001:db8:1:3::1".parse().unwrap(), t0));
    }
}
