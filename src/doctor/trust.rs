//! What breaks every connection or every token without a single push failing
//! for a visible reason: a trust store without the CA Apple's servers chain to,
//! and a clock that disagrees with APNs'.
//!
//! Apple's APNs servers chain to "AAA Certificate Services" since 29 March 2021,
//! and to the SHA-2 root "USERTrust RSA Certification Authority" since 20 January
//! 2025 (sandbox) and 24 February 2025 (production). Provider tokens carry the
//! time they were signed: APNs refuses one over an hour old by its clock, and one
//! from its future.

use rustls_pki_types::TrustAnchor;
use x509_parser::prelude::{FromDer, X509Name};

use super::{Check, Section};
use crate::apns::ApnsResponse;
use crate::event::parse_http_date;

/// The root Apple's servers chain to now.
pub const APPLE_SERVER_ROOT: &str = "USERTrust RSA Certification Authority";

/// The common name of a trust anchor (its subject is stored without the outer
/// SEQUENCE header).
fn common_name(anchor: &TrustAnchor<'_>) -> Option<String> {
    let inner = anchor.subject.as_ref();
    let mut der = vec![0x30];
    match inner.len() {
        n if n < 0x80 => der.push(n as u8),
        n if n <= 0xff => der.extend([0x81, n as u8]),
        n => der.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    der.extend_from_slice(inner);
    let (_, name) = X509Name::from_der(&der).ok()?;
    let cn = name.iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// `apns.trust`: the roots the APNs client trusts (the compiled-in public roots
/// plus `VPW__APNS__CA_FILE`) hold the root Apple's servers chain to.
pub fn trust_store(anchors: &[TrustAnchor<'_>]) -> Check {
    let c = Check::new("apns.trust", Section::Apns, "Apple's server CA trusted");
    if anchors
        .iter()
        .any(|a| common_name(a).as_deref() == Some(APPLE_SERVER_ROOT))
    {
        c.pass(format!(
            "{APPLE_SERVER_ROOT} (Apple's APNs servers chain to it since 2025) is among the {} trusted roots",
            anchors.len()
        ))
    } else {
        c.fail(
            format!("{APPLE_SERVER_ROOT} is not among the {} trusted roots: no connection to Apple's APNs can be verified", anchors.len()),
            "add Sectigo's \"USERTrust RSA Certification Authority\" certificate (PEM) to \
             the file VPW__APNS__CA_FILE names; Apple links it from \"Apple Push \
             Notification service server certificate update\"",
        )
    }
}

/// Skews within this are normal (the `date` header has whole seconds).
const SKEW_OK_SECS: i64 = 5;
/// A provider token from APNs' future is refused: a clock this far ahead fails.
const AHEAD_FAILS_SECS: i64 = 60;
/// Tokens are refreshed at 50 minutes and refused at 60: a clock this far
/// behind has them refused before their refresh.
const BEHIND_FAILS_SECS: i64 = 10 * 60;

/// `apns.clock`: this machine's clock against the `date` of APNs' answers
/// (`now` = UNIX seconds here when they arrived).
pub fn clock<'a>(answers: impl IntoIterator<Item = &'a ApnsResponse>, now: i64) -> Check {
    let c = Check::new("apns.clock", Section::Apns, "clock agrees with APNs");
    let Some(theirs) = answers
        .into_iter()
        .find_map(|r| r.date.as_deref().and_then(parse_http_date))
    else {
        return c.skip("no APNs answer with a date header");
    };
    // Positive: this machine is ahead of APNs.
    let skew = now - theirs;
    let how = match skew {
        0 => "in step with APNs".to_string(),
        s if s > 0 => format!("{} ahead of APNs", human(s)),
        s => format!("{} behind APNs", human(-s)),
    };
    let data = serde_json::json!({ "skewSecs": skew });
    let fix = "synchronise this machine's clock with NTP (timedatectl set-ntp true, or \
               chronyc makestep with chrony; in a container, fix the host's clock)";
    let c = c.with_data(data);
    if skew > AHEAD_FAILS_SECS {
        c.fail(
            format!("this machine's clock is {how}: provider tokens signed now are from APNs' future and refused (InvalidProviderToken)"),
            fix,
        )
    } else if -skew > BEHIND_FAILS_SECS {
        c.fail(
            format!("this machine's clock is {how}: provider tokens look that much older to APNs, which refuses them past an hour (ExpiredProviderToken) before the worker renews them at 50 minutes"),
            fix,
        )
    } else if skew.abs() > SKEW_OK_SECS {
        c.warn(
            format!("this machine's clock is {how}; provider tokens break past 1 minute ahead or 10 minutes behind"),
            fix,
        )
    } else {
        c.pass(format!(
            "this machine's clock is {how} (within {SKEW_OK_SECS} s)"
        ))
    }
}

fn human(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    fn answer(date: &str) -> ApnsResponse {
        ApnsResponse {
            status: 400,
            reason: Some("BadDeviceToken".into()),
            apns_id: None,
            timestamp_ms: None,
            latency: std::time::Duration::from_millis(5),
            date: Some(date.into()),
        }
    }

    #[test]
    fn http_dates_parse() {
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:01:40 GMT"), Some(100));
        assert_eq!(parse_http_date("yesterday"), None);
        let t = 1_795_341_600;
        assert_eq!(parse_http_date(&crate::event::http_date(t)), Some(t));
    }

    #[test]
    fn skew_is_measured_and_judged_by_what_it_breaks() {
        let date = "Tue, 01 Dec 2026 10:00:00 GMT";
        let t = parse_http_date(date).unwrap();
        let a = [answer(date)];
        let verdict = |now| clock(a.iter(), now);
        assert_eq!(verdict(t + 2).status, Status::Pass);
        assert_eq!(verdict(t + 2).data["skewSecs"], 2);
        let warn = verdict(t - 120);
        assert_eq!(warn.status, Status::Warn);
        assert!(
            warn.detail.contains("2 min 0 s behind APNs"),
            "{}",
            warn.detail
        );
        let ahead = verdict(t + 900);
        assert_eq!(ahead.status, Status::Fail);
        assert!(
            ahead.detail.contains("15 min 0 s ahead"),
            "{}",
            ahead.detail
        );
        assert!(ahead.fix.as_deref().unwrap().contains("NTP"));
        let behind = verdict(t - 2 * 3600);
        assert_eq!(behind.status, Status::Fail);
        assert!(
            behind.detail.contains("2 h 0 min behind"),
            "{}",
            behind.detail
        );
        assert_eq!(clock([].iter(), t).status, Status::Skip);
    }

    #[test]
    fn the_compiled_in_roots_hold_apples_server_root() {
        let c = trust_store(webpki_roots::TLS_SERVER_ROOTS);
        assert_eq!(c.status, Status::Pass, "{}", c.detail);
        // Without it, the check fails and names the certificate to add.
        let without: Vec<_> = webpki_roots::TLS_SERVER_ROOTS
            .iter()
            .filter(|a| common_name(a).as_deref() != Some(APPLE_SERVER_ROOT))
            .cloned()
            .collect();
        assert_eq!(without.len() + 1, webpki_roots::TLS_SERVER_ROOTS.len());
        let c = trust_store(&without);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.as_deref().unwrap().contains("VPW__APNS__CA_FILE"));
    }
}
