//! Wire types: the call events producers publish and the results we publish back.
//!
//! Producers differ (Socket.IO servers send numbers, PHP sends strings, some send
//! snake_case), so parsing is lenient about shape and strict about meaning: an event
//! without a call id or callee is rejected with a reason, never guessed at.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

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

/// Looks a field up by its camelCase name or its snake_case twin.
fn field<'a>(obj: &'a Map<String, Value>, camel: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(camel) {
        return (!v.is_null()).then_some(v);
    }
    let mut snake = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            snake.push('_');
            snake.push(c.to_ascii_lowercase());
        } else {
            snake.push(c);
        }
    }
    obj.get(&snake).filter(|v| !v.is_null())
}

/// An id may arrive as a JSON string or number.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Booleans arrive as `true`, `"true"`, `1`, `"1"` (and their opposites).
fn lenient_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_i64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// `sentAt` is RFC 3339 text or epoch milliseconds (number or digits).
fn timestamp_ms(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => {
            let s = s.trim();
            if let Ok(ms) = s.parse::<i64>() {
                return Some(ms);
            }
            let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
            Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
        }
        _ => None,
    }
}

impl CallEvent {
    /// Parses a message body. Never panics, whatever the bytes.
    pub fn parse(body: &[u8]) -> Result<CallEvent, InvalidEvent> {
        let invalid = |kind, message: String, call_id: Option<String>| InvalidEvent {
            kind,
            message,
            call_id,
        };
        if body.len() > MAX_EVENT_BYTES {
            return Err(invalid(
                InvalidKind::TooLarge,
                format!(
                    "body is {} bytes, the limit is {MAX_EVENT_BYTES}",
                    body.len()
                ),
                None,
            ));
        }
        let text = std::str::from_utf8(body).map_err(|e| {
            invalid(
                InvalidKind::NotUtf8,
                format!("body is not UTF-8: {e}"),
                None,
            )
        })?;
        let value: Value = serde_json::from_str(text)
            .map_err(|e| invalid(InvalidKind::NotJson, format!("body is not JSON: {e}"), None))?;
        let Value::Object(obj) = value else {
            return Err(invalid(
                InvalidKind::NotAnObject,
                "body is not a JSON object".into(),
                None,
            ));
        };

        // Read the call id first so every later refusal can name the call.
        let call_id_raw = field(&obj, "callId").cloned();
        let call_id = call_id_raw.as_ref().and_then(id_text);
        let call_id_for_error = call_id.clone().filter(|c| c.len() <= MAX_CALL_ID_BYTES);
        let bad = |kind, message: String| invalid(kind, message, call_id_for_error.clone());

        let Some(call_id) = call_id else {
            return Err(bad(
                InvalidKind::MissingField,
                "callId is missing or not a string/number".into(),
            ));
        };
        if call_id.len() > MAX_CALL_ID_BYTES {
            return Err(bad(
                InvalidKind::BadField,
                format!(
                    "callId is {} bytes, APNs allows {MAX_CALL_ID_BYTES}",
                    call_id.len()
                ),
            ));
        }
        let to_user_id = field(&obj, "toUserId").and_then(id_text).ok_or_else(|| {
            bad(
                InvalidKind::MissingField,
                "toUserId is missing or not a string/number".into(),
            )
        })?;

        let event_type = match field(&obj, "type") {
            None => EventType::Incoming,
            Some(Value::String(t)) => match t.as_str() {
                "call.incoming" | "call.initiate" => EventType::Incoming,
                "call.cancel" => EventType::Cancel,
                other => {
                    return Err(bad(
                        InvalidKind::UnknownType,
                        format!("type {other:?} is not call.incoming or call.cancel"),
                    ))
                }
            },
            Some(_) => return Err(bad(InvalidKind::BadField, "type must be a string".into())),
        };

        let has_video = match (field(&obj, "hasVideo"), field(&obj, "callType")) {
            (Some(v), _) => lenient_bool(v).ok_or_else(|| {
                bad(
                    InvalidKind::BadField,
                    format!("hasVideo {v} is not a boolean"),
                )
            })?,
            (None, Some(Value::String(t))) => t.eq_ignore_ascii_case("video"),
            (None, _) => false,
        };

        let bundle_id = match field(&obj, "bundleId") {
            None => None,
            Some(Value::String(b)) if !b.trim().is_empty() => Some(b.trim().to_string()),
            Some(other) => {
                return Err(bad(
                    InvalidKind::BadField,
                    format!("bundleId {other} is not a string"),
                ))
            }
        };

        let sent_at_ms = match field(&obj, "sentAt") {
            None => None,
            Some(v) => Some(timestamp_ms(v).ok_or_else(|| {
                bad(
                    InvalidKind::BadField,
                    format!("sentAt {v} is neither RFC 3339 nor epoch milliseconds"),
                )
            })?),
        };

        let ring_timeout_secs = match field(&obj, "ringTimeoutSecs") {
            None => None,
            Some(v) => {
                let secs = match v {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                };
                Some(secs.filter(|s| *s > 0).ok_or_else(|| {
                    bad(
                        InvalidKind::BadField,
                        format!("ringTimeoutSecs {v} is not a positive integer"),
                    )
                })?)
            }
        };

        Ok(CallEvent {
            event_type,
            call_id,
            call_id_raw: call_id_raw.unwrap_or(Value::Null),
            to_user_id,
            from_user_id: field(&obj, "fromUserId").cloned(),
            from_display_name: field(&obj, "fromDisplayName").cloned(),
            room: field(&obj, "room").cloned(),
            has_video,
            bundle_id,
            sent_at_ms,
            ring_timeout_secs,
            reason: field(&obj, "reason").and_then(id_text),
            answered_device_id: field(&obj, "answeredDeviceId").and_then(id_text),
        })
    }

    /// The VoIP payload the device receives (CONTRACT §4).
    pub fn device_payload(&self, sent_at_ms: i64, expires_at_ms: i64) -> Value {
        let mut p = Map::new();
        p.insert("type".into(), Value::from(self.event_type.as_str()));
        p.insert("callId".into(), self.call_id_raw.clone());
        for (name, v) in [
            ("fromUserId", &self.from_user_id),
            ("fromDisplayName", &self.from_display_name),
            ("room", &self.room),
        ] {
            if let Some(v) = v {
                p.insert(name.into(), v.clone());
            }
        }
        p.insert("hasVideo".into(), Value::Bool(self.has_video));
        if self.event_type == EventType::Cancel {
            if let Some(r) = &self.reason {
                p.insert("reason".into(), Value::from(r.as_str()));
            }
            if let Some(d) = &self.answered_device_id {
                p.insert("answeredDeviceId".into(), Value::from(d.as_str()));
            }
        }
        p.insert("sentAt".into(), Value::from(sent_at_ms));
        p.insert("expiresAt".into(), Value::from(expires_at_ms));
        // PushKit wants an `aps` dictionary present, even empty.
        p.insert("aps".into(), Value::Object(Map::new()));
        Value::Object(p)
    }
}

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
    fn seeds_shape_parses() {
        let e = parse(
            json!({"type":"call.incoming","callId":"11-10","fromUserId":11,
            "fromDisplayName":"User 11","room":"p2p:11-10","hasVideo":true,"toUserId":10}),
        )
        .unwrap();
        assert_eq!(e.event_type, EventType::Incoming);
        assert_eq!(e.call_id, "11-10");
        assert_eq!(e.to_user_id, "10");
        assert_eq!(e.from_user_id, Some(json!(11)));
        assert!(e.has_video);
    }

    #[test]
    fn snake_case_and_string_types_parse_the_same() {
        let e = parse(
            json!({"call_id":"11-10","to_user_id":"10","from_user_id":"11",
            "has_video":"true","from_display_name":"User 11"}),
        )
        .unwrap();
        assert_eq!(
            (e.call_id.as_str(), e.to_user_id.as_str(), e.has_video),
            ("11-10", "10", true)
        );
        for (v, want) in [
            (json!(1), true),
            (json!(0), false),
            (json!("false"), false),
            (json!("1"), true),
        ] {
            assert_eq!(
                parse(json!({"callId":5,"toUserId":6,"hasVideo":v}))
                    .unwrap()
                    .has_video,
                want
            );
        }
        assert!(
            parse(json!({"callId":5,"toUserId":6,"callType":"video"}))
                .unwrap()
                .has_video
        );
        assert_eq!(
            parse(json!({"callId":5,"toUserId":6})).unwrap().call_id,
            "5"
        );
    }

    #[test]
    fn sent_at_accepts_rfc3339_and_epoch_ms() {
        let a =
            parse(json!({"callId":"c","toUserId":"u","sentAt":"2026-11-22T10:00:00Z"})).unwrap();
        let b = parse(json!({"callId":"c","toUserId":"u","sentAt":1795341600000i64})).unwrap();
        assert_eq!(a.sent_at_ms, Some(1_795_341_600_000));
        assert_eq!(a.sent_at_ms, b.sent_at_ms);
    }

    #[test]
    fn refusals_name_their_reason_and_call_when_readable() {
        let cases: Vec<(Vec<u8>, InvalidKind, Option<&str>)> = vec![
            (vec![0xff, 0xfe, 0x00], InvalidKind::NotUtf8, None),
            (b"{not json".to_vec(), InvalidKind::NotJson, None),
            (b"[1,2]".to_vec(), InvalidKind::NotAnObject, None),
            (
                br#"{"toUserId":1}"#.to_vec(),
                InvalidKind::MissingField,
                None,
            ),
            (
                br#"{"callId":"c1"}"#.to_vec(),
                InvalidKind::MissingField,
                Some("c1"),
            ),
            (
                br#"{"callId":"c1","toUserId":1,"type":"call.bogus"}"#.to_vec(),
                InvalidKind::UnknownType,
                Some("c1"),
            ),
            (
                br#"{"callId":"c1","toUserId":1,"hasVideo":"maybe"}"#.to_vec(),
                InvalidKind::BadField,
                Some("c1"),
            ),
            (
                br#"{"callId":"c1","toUserId":{"a":1}}"#.to_vec(),
                InvalidKind::MissingField,
                Some("c1"),
            ),
            (
                format!(r#"{{"callId":"{}","toUserId":1}}"#, "x".repeat(65)).into_bytes(),
                InvalidKind::BadField,
                None,
            ),
            (vec![b' '; MAX_EVENT_BYTES + 1], InvalidKind::TooLarge, None),
        ];
        for (body, kind, call) in cases {
            let err = CallEvent::parse(&body).unwrap_err();
            assert_eq!(err.kind, kind, "{err}");
            assert_eq!(err.call_id.as_deref(), call, "{err}");
        }
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
    fn token_suffix_is_last_eight() {
        assert_eq!(token_suffix("00112233445566778899aabbccddeeff"), "ccddeeff");
        assert_eq!(token_suffix("abc"), "abc");
    }
}
