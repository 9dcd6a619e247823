//! What is recorded of a call, read back for `trace` and `GET /v1/calls/{id}`:
//! the call's row, its claims (each delivery's result and attempts).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::calls::{AttemptRecord, CallState};
use super::{Store, StoreError};

/// A call with every delivery and attempt (CONTRACT §10).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallTrace {
    pub call_id: String,
    pub to_user_id: String,
    pub bundle_id: String,
    pub state: CallState,
    pub created_at: String,
    pub ring_deadline: Option<String>,
    pub settled_at: Option<String>,
    pub cancelled_at: Option<String>,
    pub cancel_reason: Option<String>,
    pub answered_device_id: Option<String>,
    pub deliveries: Vec<DeliveryTrace>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryTrace {
    pub device_id: i64,
    pub event_type: String,
    pub token_suffix: Option<String>,
    /// The result's status; `ringing` while the delivery is under way.
    pub status: String,
    pub environment: Option<String>,
    pub fallback_used: bool,
    pub attempts: Vec<AttemptTrace>,
}

/// One APNs request of a delivery, as `trace` shows it (and as a claim's
/// `attempts` keep it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptTrace {
    pub at: String,
    pub environment: String,
    pub apns_status: Option<u16>,
    pub reason: Option<String>,
    pub apns_id: Option<String>,
    pub latency_ms: i64,
}

/// Timestamps as RFC 3339 text, straight from Postgres.
const TS: &str = r#"to_char(%s AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"#;

fn ts(column: &str) -> String {
    TS.replace("%s", column)
}

impl Store {
    /// Everything recorded about one call.
    pub async fn trace_call(&self, call_id: &str) -> Result<Option<CallTrace>, StoreError> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT to_user_id, bundle_id, {}, {}, {}, {}, {}, cancel_reason, answered_device_id
             FROM calls c {} WHERE c.call_id = $1",
            super::calls::STATE,
            ts("c.created_at"),
            ts("ring_deadline"),
            ts(&format!("({})", *super::calls::SETTLED_AT)),
            ts("cancelled_at"),
            *super::calls::SETTLED_BY_CLAIMS
        );
        let Some(call) = client.query_opt(&sql, &[&call_id]).await? else {
            return Ok(None);
        };
        let sql = format!(
            "SELECT device_id, {}, COALESCE(attempts_json, attempts::json), event_type
             FROM delivery_claims WHERE call_id = $1 ORDER BY created_at, device_id",
            super::claims::STORED_RESULT
        );
        let claims = client.query(&sql, &[&call_id]).await?;
        // Attempts recorded by earlier versions, which kept them in a table.
        let sql = format!(
            "SELECT device_id, event_type, {}, environment, apns_status, reason, apns_id, latency_ms
             FROM delivery_attempts WHERE call_id = $1 ORDER BY id",
            ts("at")
        );
        let attempts = client.query(&sql, &[&call_id]).await?;

        let mut deliveries: Vec<DeliveryTrace> = Vec::new();
        for c in &claims {
            let device_id: i64 = c.get(0);
            let result: Option<serde_json::Value> = c.get(1);
            let attempts: Option<serde_json::Value> = c.get(2);
            let r = result.unwrap_or_default();
            let text = |k: &str| r.get(k).and_then(|v| v.as_str()).map(str::to_string);
            deliveries.push(DeliveryTrace {
                device_id,
                // A claim whose outcome is not recorded yet is of its own kind
                // too: a cancel push in flight is no ring.
                event_type: text("eventType")
                    .or_else(|| c.get(3))
                    .unwrap_or_else(|| "call.incoming".into()),
                token_suffix: text("tokenSuffix"),
                status: text("status").unwrap_or_else(|| "ringing".into()),
                environment: text("environment"),
                fallback_used: r
                    .get("fallbackUsed")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
                attempts: attempts
                    .and_then(|a| serde_json::from_value(a).ok())
                    .unwrap_or_default(),
            });
        }
        for a in &attempts {
            let device_id: i64 = a.get(0);
            let event_type: String = a.get(1);
            let attempt = AttemptTrace {
                at: a.get(2),
                environment: a.get(3),
                apns_status: a.get::<_, Option<i16>>(4).map(|s| s as u16),
                reason: a.get(5),
                apns_id: a.get(6),
                latency_ms: a.get::<_, i32>(7) as i64,
            };
            match deliveries
                .iter_mut()
                .find(|d| d.device_id == device_id && d.event_type == event_type)
            {
                Some(d) => d.attempts.push(attempt),
                None => deliveries.push(DeliveryTrace {
                    device_id,
                    event_type,
                    token_suffix: None,
                    status: "ringing".into(),
                    environment: Some(attempt.environment.clone()),
                    fallback_used: false,
                    attempts: vec![attempt],
                }),
            }
        }
        Ok(Some(CallTrace {
            call_id: call_id.to_string(),
            to_user_id: call.get(0),
            bundle_id: call.get(1),
            state: CallState::parse(call.get(2)),
            created_at: call.get(3),
            ring_deadline: call.get(4),
            settled_at: call.get(5),
            cancelled_at: call.get(6),
            cancel_reason: call.get(7),
            answered_device_id: call.get(8),
            deliveries,
        }))
    }
}

impl AttemptTrace {
    /// An attempt as it is kept in its claim.
    pub fn from_record(a: &AttemptRecord) -> Self {
        AttemptTrace {
            at: rfc3339_ms(a.at_ms),
            environment: a.environment.as_str().to_string(),
            apns_status: a.apns_status,
            reason: a.reason.clone(),
            apns_id: a.apns_id.clone(),
            latency_ms: a.latency_ms.min(i64::MAX as u64) as i64,
        }
    }
}

/// Milliseconds since the epoch as `TS` writes them (UTC, milliseconds, `Z`).
fn rfc3339_ms(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_times_read_like_the_databases() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_764_633_600_123), "2025-12-02T00:00:00.123Z");
    }
}
