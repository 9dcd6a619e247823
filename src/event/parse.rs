//! Parsing a call event: lenient about shape, strict about meaning, and strict about
//! every use a field will have. An id becomes an HTTP/2 header value (the collapse
//! id), a Postgres `text` parameter, a log field and a JSON value, so it may hold no
//! control character (NUL included); numbers are range-checked before any
//! arithmetic; pass-through fields are cut so the VoIP payload always fits.

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{CallEvent, EventType, InvalidEvent, InvalidKind, MAX_CALL_ID_BYTES, MAX_EVENT_BYTES};

/// A user id is a database key or a UUID; anything longer is not one.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Bundle ids are reverse-DNS names, at most 155 characters in App Store Connect.
const MAX_BUNDLE_ID_BYTES: usize = 256;
/// `reason` and `answeredDeviceId` are short codes and ids.
const MAX_SHORT_FIELD_BYTES: usize = 64;
/// Each pass-through field (`fromUserId`, `fromDisplayName`, `room`) as JSON in the
/// device payload. Three of them plus the fixed fields stay far below APNs' 5,120
/// bytes for VoIP payloads, so no event can turn into a `PayloadTooLarge` refusal.
pub const MAX_PASS_THROUGH_JSON_BYTES: usize = 512;
/// `sentAt` must fall in 2000..2100 as epoch milliseconds: a value in seconds,
/// microseconds or nanoseconds (or a negative one) lands outside and is refused
/// instead of giving the call a deadline decades away or long past.
pub const SENT_AT_MIN_MS: i64 = 946_684_800_000;
pub const SENT_AT_MAX_MS: i64 = 4_102_444_800_000;
/// How much of a refused value a refusal message quotes.
const SHOWN_BYTES: usize = 64;

/// Bounds that come from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `ringTimeoutSecs` above this is clamped to it (CONTRACT §13).
    pub max_ring_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_ring_timeout_secs: 120,
        }
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

/// Refuses text that is too long or holds a control character (C0 with NUL and
/// tab, DEL, C1): such a value breaks a header, a Postgres `text` or a log line.
pub fn check_text(name: &str, s: &str, max_bytes: usize) -> Result<(), String> {
    if s.len() > max_bytes {
        return Err(format!(
            "{name} is {} bytes, the limit is {max_bytes}",
            s.len()
        ));
    }
    if let Some((at, c)) = s.char_indices().find(|(_, c)| c.is_control()) {
        return Err(format!(
            "{name} contains the control character U+{:04X} at byte {at}",
            c as u32
        ));
    }
    Ok(())
}

/// A value quoted in a refusal, cut short.
fn shown(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(SHOWN_BYTES) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
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

/// `sentAt` is RFC 3339 text or epoch milliseconds (number or digits), within
/// [`SENT_AT_MIN_MS`, `SENT_AT_MAX_MS`).
fn timestamp_ms(v: &Value) -> Option<i64> {
    let ms = match v {
        Value::Number(n) => match n.as_i64() {
            Some(ms) => ms,
            None => {
                let f = n.as_f64()?;
                let in_range =
                    f.is_finite() && f >= SENT_AT_MIN_MS as f64 && f < SENT_AT_MAX_MS as f64;
                in_range.then_some(f as i64)?
            }
        },
        Value::String(s) => {
            let s = s.trim();
            match s.parse::<i64>() {
                Ok(ms) => ms,
                Err(_) => {
                    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
                    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()?
                }
            }
        }
        _ => return None,
    };
    (SENT_AT_MIN_MS..SENT_AT_MAX_MS).contains(&ms).then_some(ms)
}

/// The JSON-escaped length of `c` as serde_json writes it, or more.
fn json_width(c: char) -> usize {
    match c {
        '"' | '\\' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// A pass-through field as the device will get it: strings cut (on a character
/// boundary) so their JSON form fits `max_json` bytes, numbers and booleans as
/// they are, objects and arrays only when small enough.
fn pass_through(name: &str, v: &Value, max_json: usize) -> Result<Value, String> {
    if holds_nul(v) {
        // Postgres can store no NUL, in `text` or `jsonb`.
        return Err(format!("{name} contains a NUL character"));
    }
    match v {
        Value::String(s) => {
            let mut used = 2;
            let mut end = s.len();
            for (at, c) in s.char_indices() {
                used += json_width(c);
                if used > max_json {
                    end = at;
                    break;
                }
            }
            Ok(Value::String(s[..end].to_string()))
        }
        Value::Array(_) | Value::Object(_) => {
            let len = v.to_string().len();
            if len > max_json {
                Err(format!(
                    "{name} is {len} bytes of JSON, the limit is {max_json}"
                ))
            } else {
                Ok(v.clone())
            }
        }
        other => Ok(other.clone()),
    }
}

/// Whether a string (or a key) anywhere in `v` holds a NUL.
fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

impl CallEvent {
    /// Parses a message body with the default [`Limits`]. Never panics, whatever
    /// the bytes.
    pub fn parse(body: &[u8]) -> Result<CallEvent, InvalidEvent> {
        Self::parse_with(body, &Limits::default())
    }

    /// Parses a message body. Never panics, whatever the bytes; every event it
    /// returns can be stored, logged and pushed.
    pub fn parse_with(body: &[u8], limits: &Limits) -> Result<CallEvent, InvalidEvent> {
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

        // Read the call id first so every later refusal can name the call — but
        // only a call id that is itself valid is ever repeated back.
        let call_id_raw = field(&obj, "callId");
        let call_id = call_id_raw.and_then(id_text);
        let call_id_check = call_id
            .as_deref()
            .map(|c| check_text("callId", c, MAX_CALL_ID_BYTES));
        let call_id_for_error = call_id
            .clone()
            .filter(|_| matches!(call_id_check, Some(Ok(()))));
        let bad = |kind, message: String| invalid(kind, message, call_id_for_error.clone());

        let Some(call_id) = call_id else {
            return Err(bad(
                InvalidKind::MissingField,
                "callId is missing or not a string/number".into(),
            ));
        };
        if let Some(Err(message)) = call_id_check {
            return Err(bad(InvalidKind::BadField, message));
        }
        let to_user_id = field(&obj, "toUserId").and_then(id_text).ok_or_else(|| {
            bad(
                InvalidKind::MissingField,
                "toUserId is missing or not a string/number".into(),
            )
        })?;
        check_text("toUserId", &to_user_id, MAX_USER_ID_BYTES)
            .map_err(|m| bad(InvalidKind::BadField, m))?;

        let event_type = match field(&obj, "type") {
            None => EventType::Incoming,
            Some(Value::String(t)) => match t.as_str() {
                "call.incoming" | "call.initiate" => EventType::Incoming,
                "call.cancel" => EventType::Cancel,
                _ => {
                    return Err(bad(
                        InvalidKind::UnknownType,
                        format!(
                            "type {} is not call.incoming or call.cancel",
                            shown(&Value::String(t.clone()))
                        ),
                    ))
                }
            },
            Some(_) => return Err(bad(InvalidKind::BadField, "type must be a string".into())),
        };

        let has_video = match (field(&obj, "hasVideo"), field(&obj, "callType")) {
            (Some(v), _) => lenient_bool(v).ok_or_else(|| {
                bad(
                    InvalidKind::BadField,
                    format!("hasVideo {} is not a boolean", shown(v)),
                )
            })?,
            (None, Some(Value::String(t))) => t.eq_ignore_ascii_case("video"),
            (None, _) => false,
        };

        let bundle_id = match field(&obj, "bundleId") {
            None => None,
            Some(Value::String(b)) if !b.trim().is_empty() => {
                let b = b.trim();
                check_text("bundleId", b, MAX_BUNDLE_ID_BYTES)
                    .map_err(|m| bad(InvalidKind::BadField, m))?;
                Some(b.to_string())
            }
            Some(other) => {
                return Err(bad(
                    InvalidKind::BadField,
                    format!("bundleId {} is not a string", shown(other)),
                ))
            }
        };

        let sent_at_ms = match field(&obj, "sentAt") {
            None => None,
            Some(v) => Some(timestamp_ms(v).ok_or_else(|| {
                bad(
                    InvalidKind::BadField,
                    format!(
                        "sentAt {} is neither RFC 3339 nor epoch milliseconds between the years 2000 and 2100",
                        shown(v)
                    ),
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
                let secs = secs.filter(|s| *s > 0).ok_or_else(|| {
                    bad(
                        InvalidKind::BadField,
                        format!("ringTimeoutSecs {} is not a positive integer", shown(v)),
                    )
                })?;
                Some(secs.min(limits.max_ring_timeout_secs.max(1)))
            }
        };

        let short = |name: &str| -> Result<Option<String>, InvalidEvent> {
            let Some(text) = field(&obj, name).and_then(id_text) else {
                return Ok(None);
            };
            check_text(name, &text, MAX_SHORT_FIELD_BYTES)
                .map_err(|m| bad(InvalidKind::BadField, m))?;
            Ok(Some(text))
        };
        let reason = short("reason")?;
        let answered_device_id = short("answeredDeviceId")?;

        let pass = |name: &str| -> Result<Option<Value>, InvalidEvent> {
            field(&obj, name)
                .map(|v| pass_through(name, v, MAX_PASS_THROUGH_JSON_BYTES))
                .transpose()
                .map_err(|m| bad(InvalidKind::BadField, m))
        };

        Ok(CallEvent {
            event_type,
            // A string id goes to the device trimmed, as it was checked.
            call_id_raw: match call_id_raw {
                Some(Value::String(_)) => Value::String(call_id.clone()),
                Some(other) => other.clone(),
                None => Value::Null,
            },
            call_id,
            to_user_id,
            from_user_id: pass("fromUserId")?,
            from_display_name: pass("fromDisplayName")?,
            room: pass("room")?,
            has_video,
            bundle_id,
            sent_at_ms,
            ring_timeout_secs,
            reason,
            answered_device_id,
        })
    }
}

#[cfg(test)]
mod tests;
