//! One push as APNs sees it: the request we send, the answer we get, and the ways
//! there can be no answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Request;

/// Apple's error bodies are a few dozen bytes; anything larger is not APNs.
pub(super) const MAX_RESPONSE_BODY: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to APNs {environment}: {detail}")]
    Connect {
        environment: &'static str,
        detail: String,
    },
    #[error("APNs {environment} did not answer within {timeout_ms} ms")]
    Timeout {
        environment: &'static str,
        timeout_ms: u128,
    },
    /// The connection failed. `sent`: the request had left, so APNs may have
    /// taken it; otherwise it certainly did not.
    #[error("APNs {environment} connection failed mid-request: {detail}")]
    Transport {
        environment: &'static str,
        detail: String,
        sent: bool,
    },
    /// The request went out, no answer came, and the connection then failed to
    /// answer a PING: it was retired. Whether APNs got the push is unknown.
    #[error("APNs {environment} left the push unanswered for {waited_ms} ms and its connection stopped answering PINGs")]
    Unanswered {
        environment: &'static str,
        waited_ms: u128,
    },
    /// The request could not be built (a part is not a valid header value): no
    /// retry can change that.
    #[error("APNs request cannot be built: {detail}")]
    Request { detail: String },
}

impl SendError {
    /// Every transport failure is worth a retry on a fresh connection, within the
    /// call's ring deadline; a request that cannot be built is not.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SendError::Request { .. })
    }

    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SendError::Connect { .. } => "connect",
            SendError::Timeout { .. } => "timeout",
            SendError::Transport { .. } => "transport",
            SendError::Unanswered { .. } => "unanswered",
            SendError::Request { .. } => "bad_request",
        }
    }

    /// The push may have reached APNs (and the phone) though no answer came: a
    /// retry can ring a second time.
    pub fn fate_unknown(&self) -> bool {
        match self {
            SendError::Timeout { .. } | SendError::Unanswered { .. } => true,
            SendError::Transport { sent, .. } => *sent,
            SendError::Connect { .. } | SendError::Request { .. } => false,
        }
    }

    /// The attempt's `reason` in `trace`: `unanswered` whenever the push's fate is
    /// unknown, so a phone that rang twice is explained; else the label.
    pub fn attempt_reason(&self) -> &'static str {
        if self.fate_unknown() {
            "unanswered"
        } else {
            self.label()
        }
    }
}

/// What kind of notification a push is (`apns-push-type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PushType {
    /// A PushKit push: rings through CallKit.
    #[default]
    Voip,
    /// A visible notification.
    Alert,
}

impl PushType {
    pub fn as_str(self) -> &'static str {
        match self {
            PushType::Voip => "voip",
            PushType::Alert => "alert",
        }
    }

    /// APNs' payload limit: VoIP payloads may be larger than the others.
    pub fn max_payload(self) -> usize {
        match self {
            PushType::Voip => crate::pipeline::MAX_VOIP_PAYLOAD,
            PushType::Alert => 4096,
        }
    }
}

/// One push request, ready to send.
#[derive(Clone, Debug)]
pub struct PushRequest {
    pub push_type: PushType,
    pub token: String,
    pub topic: String,
    pub provider_token: Arc<str>,
    pub apns_id: uuid::Uuid,
    /// UNIX seconds; 0 = deliver now or never.
    pub expiration: u64,
    pub priority: u8,
    pub collapse_id: String,
    pub payload: Bytes,
}

/// APNs' answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApnsResponse {
    pub status: u16,
    pub reason: Option<String>,
    pub apns_id: Option<String>,
    /// On 410: when APNs learned the token was no longer valid (ms since epoch).
    pub timestamp_ms: Option<i64>,
    pub latency: Duration,
    /// The `date` header: APNs' clock, which `doctor` compares with ours.
    pub date: Option<String>,
}

/// Splits `https://host[:port][/]` into host and port.
pub(super) fn parse_base_url(url: &str) -> Result<(String, String, u16), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?} is not an https:// URL"))?;
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') {
        return Err(format!("{url:?} must be a bare origin without a path"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed ["))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or(""))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), ""),
        }
    };
    let port = if port.is_empty() {
        443
    } else {
        port.parse().map_err(|_| format!("{url:?}: bad port"))?
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((format!("https://{authority}"), host, port))
}

/// Header names, made once: a name given as text is parsed again per request.
mod names {
    use hyper::header::HeaderName;

    pub const PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
    pub const TOPIC: HeaderName = HeaderName::from_static("apns-topic");
    pub const PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
    pub const EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
    pub const COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");
    pub const ID: HeaderName = HeaderName::from_static("apns-id");
}
pub(super) use names::ID as APNS_ID;

/// The HTTP/2 request head of one push (the payload goes as its body). Refuses,
/// rather than panics on, a part that is not a valid header value (event parsing
/// keeps such ids out; this is the last line).
pub fn build_request(base: &str, req: &PushRequest) -> Result<Request<()>, SendError> {
    use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
    let invalid = |e: &dyn std::fmt::Display| SendError::Request {
        detail: e.to_string(),
    };
    let text = |v: &str| HeaderValue::from_str(v).map_err(|e| invalid(&e));
    let mut request = Request::post(format!("{base}/3/device/{}", req.token))
        .body(())
        .map_err(|e| invalid(&e))?;
    let headers = request.headers_mut();
    headers.reserve(9);
    // Empty for a certificate app: the TLS handshake authenticated it.
    if !req.provider_token.is_empty() {
        let bearer = Bytes::from(format!("bearer {}", req.provider_token));
        let value = HeaderValue::from_maybe_shared(bearer).map_err(|e| invalid(&e))?;
        headers.insert(AUTHORIZATION, value);
    }
    let push_type = HeaderValue::from_static(req.push_type.as_str());
    headers.insert(names::PUSH_TYPE, push_type);
    headers.insert(names::TOPIC, text(&req.topic)?);
    headers.insert(names::PRIORITY, HeaderValue::from(u16::from(req.priority)));
    headers.insert(names::EXPIRATION, HeaderValue::from(req.expiration));
    headers.insert(names::COLLAPSE_ID, text(&req.collapse_id)?);
    let mut id = uuid::Uuid::encode_buffer();
    headers.insert(
        names::ID,
        text(req.apns_id.hyphenated().encode_lower(&mut id))?,
    );
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(req.payload.len()));
    Ok(request)
}

/// Apple's error body: `{"reason": "...", "timestamp": 1234}`. Anything unparseable
/// yields no reason, and the status code decides.
pub(super) fn parse_error_body(body: &[u8]) -> (Option<String>, Option<i64>) {
    if body.is_empty() {
        return (None, None);
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None);
    };
    (
        v.get("reason").and_then(|r| r.as_str()).map(str::to_string),
        v.get("timestamp").and_then(|t| t.as_i64()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_parse() {
        assert_eq!(
            parse_base_url("https://api.push.apple.com").unwrap(),
            (
                "https://api.push.apple.com".into(),
                "api.push.apple.com".into(),
                443
            )
        );
        assert_eq!(
            parse_base_url("https://127.0.0.1:2197/").unwrap(),
            ("https://127.0.0.1:2197".into(), "127.0.0.1".into(), 2197)
        );
        assert_eq!(parse_base_url("https://[::1]:2197").unwrap().1, "::1");
        assert!(parse_base_url("http://api.push.apple.com").is_err());
        assert!(parse_base_url("https://host/3/device").is_err());
    }

    /// The head APNs expects (the simulator checks it too, in the integration
    /// tests): every header, with the values of the push.
    #[test]
    fn a_request_carries_every_apns_header() {
        let req = PushRequest {
            push_type: PushType::Voip,
            token: "ab".repeat(32),
            topic: "com.example.app.voip".into(),
            provider_token: "eyJ.x.y".into(),
            apns_id: uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            expiration: 1_700_000_045,
            priority: 10,
            collapse_id: "call-1".into(),
            payload: Bytes::from_static(b"{}"),
        };
        let r = build_request("https://127.0.0.1:2197", &req).unwrap();
        assert_eq!(
            r.uri().to_string(),
            format!("https://127.0.0.1:2197/3/device/{}", req.token)
        );
        let got: Vec<(&str, &str)> = r
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("authorization", "bearer eyJ.x.y"),
                ("apns-push-type", "voip"),
                ("apns-topic", "com.example.app.voip"),
                ("apns-priority", "10"),
                ("apns-expiration", "1700000045"),
                ("apns-collapse-id", "call-1"),
                ("apns-id", "01234567-89ab-cdef-0123-456789abcdef"),
                ("content-type", "application/json"),
                ("content-length", "2"),
            ]
        );
        let cert_app = PushRequest {
            provider_token: "".into(),
            ..req.clone()
        };
        let head = build_request("https://h", &cert_app).unwrap();
        assert!(head.headers().get("authorization").is_none());
        let broken = PushRequest {
            collapse_id: "bad\nid".into(),
            ..req
        };
        assert!(matches!(
            build_request("https://h", &broken),
            Err(SendError::Request { .. })
        ));
    }

    #[test]
    fn error_bodies_parse() {
        assert_eq!(
            parse_error_body(br#"{"reason":"Unregistered","timestamp":1700000000000}"#),
            (Some("Unregistered".into()), Some(1_700_000_000_000))
        );
        assert_eq!(parse_error_body(b""), (None, None));
        assert_eq!(parse_error_body(b"<html>"), (None, None));
    }

    #[test]
    fn a_push_whose_answer_never_came_is_unanswered() {
        let env = "production";
        let timeout = SendError::Timeout {
            environment: env,
            timeout_ms: 1,
        };
        let lost = SendError::Transport {
            environment: env,
            detail: String::new(),
            sent: true,
        };
        let unsent = SendError::Transport {
            environment: env,
            detail: String::new(),
            sent: false,
        };
        assert_eq!(timeout.attempt_reason(), "unanswered");
        assert_eq!(lost.attempt_reason(), "unanswered");
        assert_eq!(unsent.attempt_reason(), "transport");
        assert_eq!(
            SendError::Unanswered {
                environment: env,
                waited_ms: 1
            }
            .attempt_reason(),
            "unanswered"
        );
    }
}
