//! Who the client is, for the rate limit: the socket peer, or — only when the
//! peer is one of `http.trusted_proxies` — the address the proxies put in
//! `X-Forwarded-For`. Anyone can send that header; believing it from any peer
//! would let a client pick a fresh address (and a fresh bucket) per request.

use std::net::IpAddr;

use axum::http::HeaderMap;

/// An address block: `10.0.0.0/8`, `fd00::/8`, or one address (`192.0.2.7`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let net: IpAddr = addr.parse().map_err(|_| "not an IP address or CIDR")?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or("the prefix length is out of range")?,
        };
        Ok(Self { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n).into(), self.prefix, 32)
                    == masked(u32::from(a).into(), self.prefix, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(n.into(), self.prefix, 128) == masked(a.into(), self.prefix, 128)
            }
            _ => false,
        }
    }
}

/// The first `prefix` of `bits` bits of `v`.
fn masked(v: u128, prefix: u8, bits: u8) -> u128 {
    let keep = u32::from(prefix.min(bits));
    let drop = u32::from(bits) - keep;
    if keep == 0 {
        0
    } else {
        v >> drop
    }
}

/// An IPv4 peer on a dual-stack socket shows as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The trusted proxies, parsed once.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub fn parse(list: &[String]) -> Result<Self, String> {
        list.iter()
            .map(|s| Cidr::parse(s).map_err(|why| format!("{s:?}: {why}")))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client of a request from `peer`. Through trusted proxies, the
    /// right-most `X-Forwarded-For` entry that is not itself a trusted proxy
    /// (entries to its left were written by the client and prove nothing); an
    /// entry that is not an address ends the walk at the hop that wrote it.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Ok(ip) = hop.parse::<IpAddr>().map(canonical) else {
                break;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped peers match");
        assert!(Cidr::parse("192.0.2.7").unwrap().contains(ip("192.0.2.7")));
        assert!(!Cidr::parse("192.0.2.7").unwrap().contains(ip("192.0.2.8")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(!Cidr::parse("fd00::/8").unwrap().contains(ip("10.0.0.1")));
        for bad in ["10.0.0.0/33", "::/129", "proxy", "10.0.0.0/x", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_peer() {
        let none = TrustedProxies::default();
        let lb = TrustedProxies::parse(&["10.0.0.0/24".into(), "192.0.2.1".into()]).unwrap();
        let h = xff(&["198.51.100.7"]);
        assert_eq!(none.client(ip("10.0.0.5"), &h), ip("10.0.0.5"));
        assert_eq!(lb.client(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        assert_eq!(lb.client(ip("10.0.0.5"), &h), ip("198.51.100.7"));
        // A client's own entry on the left is not believed over the proxies'.
        let spoofed = xff(&["1.2.3.4, 198.51.100.7"]);
        assert_eq!(lb.client(ip("10.0.0.5"), &spoofed), ip("198.51.100.7"));
        // Through two trusted hops; several headers read in order.
        let chain = xff(&["198.51.100.7", "192.0.2.1"]);
        assert_eq!(lb.client(ip("10.0.0.5"), &chain), ip("198.51.100.7"));
        // Garbage stops at the hop that wrote it; no header: the peer.
        let junk = xff(&["junk, 10.0.0.8"]);
        assert_eq!(lb.client(ip("10.0.0.5"), &junk), ip("10.0.0.8"));
        assert_eq!(lb.client(ip("10.0.0.5"), &HeaderMap::new()), ip("10.0.0.5"));
    }
}
