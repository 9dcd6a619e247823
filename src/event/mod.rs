//! Wire types: the call events producers publish and the results we publish back.
//!
//! Producers differ (Socket.IO servers send numbers, PHP sends strings, some send
//! snake_case), so parsing is lenient about shape and strict about meaning: an event
//! without a call id or callee is rejected with a reason, never guessed at.

mod parse;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub use parse::{check_text, Limits, MAX_USER_ID_BYTES, SENT_AT_MAX_MS, SENT_AT_MIN_MS};

/// APNs caps `apns-collapse-id` at 64 bytes, and the call id is the collapse id.
pub const MAX_CALL_ID_BYTES: usize = 64;
/// A call event is a few hundred bytes; anything this large is not one, and the
/// device payload could not carry it anyway (VoIP payloads are capped at 5120 bytes).
pub const MAX_EVENT_BYTES: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Production,
    Sandbox,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Sandbox => "sandbox",
        }
    }

    pub fn other(self) -> Self {
        match self {
            Environment::Production => Environment::Sandbox,
            Environment::Sandbox => Environment::Production,
        }
    }

    /// Parses the stored or registered form; `unknown` (and anything else) is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "production" | "prod" => Some(Environment::Production),
            "sandbox" | "development" | "dev" => Some(Environment::Sandbox),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "call.incoming")]
    Incoming,
    #[serde(rename = "call.cancel")]
    Cancel,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Incoming => "call.incoming",
            EventType::Cancel => "call.cancel",
        }
    }
}

/// A call event after lenient parsing.
#[derive(Clone, Debug, PartialEq)]
pub struct CallEvent {
    pub event_type: EventType,
    pub call_id: String,
    /// The call id exactly as received (string or number), passed to the device.
    pub call_id_raw: Value,
    pub to_user_id: String,
    pub from_user_id: Option<Value>,
    pub from_display_name: Option<Value>,
    pub room: Option<Value>,
    pub has_video: bool,
    pub bundle_id: Option<String>,
    /// When the call started, epoch milliseconds, if the event said.
    pub sent_at_ms: Option<i64>,
    pub ring_timeout_secs: Option<u64>,
    pub reason: Option<String>,
    pub answered_device_id: Option<String>,
}

/// Why an event was refused. `call_id` is set when one could still be read, so an
/// `invalid_event` result can tell the producer which call it was.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct InvalidEvent {
    pub kind: InvalidKind,
    pub message: String,
    pub call_id: Option<String>,
}

/// Closed set of reasons, usable as a metric label and a dead-letter header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidKind {
    TooLarge,
    NotUtf8,
    NotJson,
    NotAnObject,
    MissingField,
    BadField,
    UnknownType,
}

impl InvalidKind {
    pub fn label(self) -> &'static str {
        match self {
            InvalidKind::TooLarge => "too_large",
            InvalidKind::NotUtf8 => "not_utf8",
            InvalidKind::NotJson => "not_json",
            InvalidKind::NotAnObject => "not_an_object",
            InvalidKind::MissingField => "missing_field",
            InvalidKind::BadField => "bad_field",
            InvalidKind::UnknownType => "unknown_type",
        }
    }
}

impl std::fmt::Display for InvalidKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A producer's clock may run this far ahead of ours before its `sentAt` is
/// disbelieved (and the call counted from now).
pub const MAX_CLOCK_AHEAD_MS: i64 = 60_000;

impl CallEvent {
    /// When the call started and its ring deadline, epoch milliseconds: from
    /// `sentAt`, else the message's `timestamp` property (UNIX seconds) when it is
    /// plausible, else `now_ms`. A start further ahead than a clock skew counts from
    /// now, so no deadline lies far in the future; no input can overflow.
    pub fn ring_window(
        &self,
        amqp_timestamp: Option<u64>,
        default_ring_secs: u64,
        now_ms: i64,
    ) -> (i64, i64) {
        let from_property = amqp_timestamp
            .and_then(|s| i64::try_from(s).ok())
            .and_then(|s| s.checked_mul(1000))
            .filter(|ms| (SENT_AT_MIN_MS..SENT_AT_MAX_MS).contains(ms));
        let mut sent_at_ms = self.sent_at_ms.or(from_property).unwrap_or(now_ms);
        if sent_at_ms > now_ms.saturating_add(MAX_CLOCK_AHEAD_MS) {
            sent_at_ms = now_ms;
        }
        let ring_secs = self.ring_timeout_secs.unwrap_or(default_ring_secs);
        let ring_ms = i64::try_from(ring_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        (sent_at_ms, sent_at_ms.saturating_add(ring_ms))
    }

    /// The VoIP payload the device receives (CONTRACT §4).
    pub fn device_payload(&self, sent_at_ms: i64, expires_at_ms: i64) -> Value {
        serde_json::to_value(self.payload(sent_at_ms, expires_at_ms)).expect("a payload serialises")
    }

    /// The same payload as it goes on the wire, serialised from the event's own
    /// fields (no map of owned keys built first, once per ring).
    pub fn device_payload_bytes(&self, sent_at_ms: i64, expires_at_ms: i64) -> bytes::Bytes {
        serde_json::to_vec(&self.payload(sent_at_ms, expires_at_ms))
            .expect("a payload serialises")
            .into()
    }

    fn payload(&self, sent_at_ms: i64, expires_at_ms: i64) -> DevicePayload<'_> {
        let cancel = self.event_type == EventType::Cancel;
        DevicePayload {
            answered_device_id: self.answered_device_id.as_deref().filter(|_| cancel),
            aps: EmptyObject {},
            call_id: &self.call_id_raw,
            expires_at: expires_at_ms,
            from_display_name: self.from_display_name.as_ref(),
            from_user_id: self.from_user_id.as_ref(),
            has_video: self.has_video,
            reason: self.reason.as_deref().filter(|_| cancel),
            room: self.room.as_ref(),
            sent_at: sent_at_ms,
            kind: self.event_type.as_str(),
        }
    }
}

/// The device's payload. Its fields are in the order of their names, so it
/// serialises to the same bytes as the map of the same keys (a test holds it).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DevicePayload<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    answered_device_id: Option<&'a str>,
    /// PushKit wants an `aps` dictionary present, even empty.
    aps: EmptyObject,
    call_id: &'a Value,
    expires_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_display_name: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_user_id: Option<&'a Value>,
    has_video: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a Value>,
    sent_at: i64,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct EmptyObject {}

/// What happened to one (event, device) — CONTRACT §5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Delivered,
    Failed,
    Expired,
    TokenInvalidated,
    NoDevice,
    InvalidEvent,
    Cancelled,
    /// APNs refused many distinct devices of the app and accepted none: its
    /// configuration (bundle id, key) is wrong; no token was invalidated.
    AppMisconfigured,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::TokenInvalidated => "token_invalidated",
            Status::NoDevice => "no_device",
            Status::InvalidEvent => "invalid_event",
            Status::Cancelled => "cancelled",
            Status::AppMisconfigured => "app_misconfigured",
        }
    }
}

/// The result event published to `voip.push.results` (routing key `push.<status>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushResult {
    pub event_id: String,
    pub event_type: String,
    pub call_id: Option<String>,
    pub to_user_id: Option<String>,
    pub device_id: Option<i64>,
    /// Last 8 hex characters only; the whole token never leaves the worker.
    pub token_suffix: Option<String>,
    pub bundle_id: Option<String>,
    pub status: Status,
    pub environment: Option<Environment>,
    pub fallback_used: bool,
    pub apns_id: Option<String>,
    pub apns_status: Option<u16>,
    pub reason: Option<String>,
    pub attempts: u32,
    pub latency_ms: Option<u64>,
    /// RFC 3339.
    pub completed_at: String,
}

/// The last 8 characters of a token: enough to tell devices apart in logs and
/// results, useless to push with.
pub fn token_suffix(token: &str) -> String {
    let start = token.len().saturating_sub(8);
    token.get(start..).unwrap_or_default().to_string()
}

pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// HTTP's `date` format (IMF-fixdate, RFC 9110): `Tue, 01 Dec 2026 10:00:00 GMT`.
const HTTP_DATE: &str =
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT";

/// UNIX seconds as an HTTP `date` header value.
pub fn http_date(unix: i64) -> String {
    let format = time::format_description::parse_borrowed::<1>(HTTP_DATE).expect("valid format");
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

/// An HTTP `date` header value as UNIX seconds.
pub fn parse_http_date(date: &str) -> Option<i64> {
    let format = time::format_description::parse_borrowed::<1>(HTTP_DATE).ok()?;
    let t = time::PrimitiveDateTime::parse(date, &format).ok()?;
    Some(t.assume_utc().unix_timestamp())
}

pub fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<CallEvent, InvalidEvent> {
        CallEvent::parse(v.to_string().as_bytes())
    }

    #[test]
    fn payload_carries_fields_as_received_plus_times() {
        let e = parse(json!({"callId":"11-10","toUserId":10,"fromUserId":11,"room":"p2p:11-10","hasVideo":"1"})).unwrap();
        let p = e.device_payload(1000, 46000);
        assert_eq!(p["type"], "call.incoming");
        assert_eq!(p["callId"], "11-10");
        assert_eq!(p["fromUserId"], 11);
        assert_eq!(p["room"], "p2p:11-10");
        assert_eq!(p["hasVideo"], true);
        assert_eq!(p["sentAt"], 1000);
        assert_eq!(p["expiresAt"], 46000);
        assert!(p.get("fromDisplayName").is_none());
    }

    #[test]
    fn a_cancel_payload_carries_its_reason_and_a_ring_does_not() {
        let fields = json!({"callId": 7, "toUserId": "u", "reason": "answered",
                            "answeredDeviceId": "d1", "fromDisplayName": "A"});
        for (kind, carried) in [("call.cancel", true), ("call.incoming", false)] {
            let mut v = fields.clone();
            v["type"] = json!(kind);
            let e = parse(v).unwrap();
            let p = e.device_payload(1000, 46000);
            assert_eq!(p["type"], kind);
            assert_eq!(p["callId"], 7);
            assert_eq!(p["aps"], json!({}));
            assert_eq!(p.get("reason").is_some(), carried, "{kind}");
            assert_eq!(p.get("answeredDeviceId").is_some(), carried, "{kind}");
            let sent = e.device_payload_bytes(1000, 46000);
            assert_eq!(std::str::from_utf8(&sent).unwrap(), p.to_string());
        }
    }

    #[test]
    fn token_suffix_is_last_eight() {
        assert_eq!(token_suffix("00112233445566778899aabbccddeeff"), "ccddeeff");
        assert_eq!(token_suffix("abc"), "abc");
    }
}
