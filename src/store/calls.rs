//! Calls as state, and the record of every APNs attempt.
//!
//! The guarantee that a cancelled call never rings again rests on one lock: each
//! ring attempt holds a `FOR SHARE` lock on its call's row from the check "not
//! cancelled" until the attempt is recorded, and a cancel's `UPDATE` waits for
//! those locks. So every ring either happened before the cancel was recorded
//! (and is in `delivery_attempts` when the cancel looks for rung devices) or sees
//! the cancel and does not go out.

use std::time::Duration;

use deadpool_postgres::Object;
use serde::Serialize;

use super::{Store, StoreError};
use crate::event::Environment;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallState {
    Ringing,
    Delivered,
    Failed,
    Expired,
    Cancelled,
}

impl CallState {
    pub fn as_str(self) -> &'static str {
        match self {
            CallState::Ringing => "ringing",
            CallState::Delivered => "delivered",
            CallState::Failed => "failed",
            CallState::Expired => "expired",
            CallState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "delivered" => CallState::Delivered,
            "failed" => CallState::Failed,
            "expired" => CallState::Expired,
            "cancelled" => CallState::Cancelled,
            _ => CallState::Ringing,
        }
    }
}

/// One APNs request and its answer.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptRecord {
    pub environment: Environment,
    /// `None`: no answer (connect failure, timeout).
    pub apns_status: Option<u16>,
    pub reason: Option<String>,
    pub apns_id: Option<String>,
    pub latency_ms: u64,
}

/// A device that accepted a ring, for its cancel push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RungDevice {
    pub device_id: i64,
    pub token: String,
    pub environment: Option<Environment>,
}

/// A ring attempt's hold on its call: an open transaction with the call's row
/// locked `FOR SHARE`. Dropped without [`RingPermit::record`], its connection is
/// detached from the pool so an open transaction never goes back to it.
pub struct RingPermit {
    client: Option<Object>,
    call_id: String,
    device_id: i64,
    event_type: &'static str,
}

impl Drop for RingPermit {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

const INSERT_ATTEMPT: &str = "INSERT INTO delivery_attempts
    (call_id, device_id, event_type, environment, apns_status, reason, apns_id, latency_ms)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

const RECORD_RING_ATTEMPT: &str = "WITH success AS (
        UPDATE devices SET last_success_at = now(), environment = $4
        WHERE id = $2 AND $2 > 0 AND $5::smallint = 200
    )
    INSERT INTO delivery_attempts
    (call_id, device_id, event_type, environment, apns_status, reason, apns_id, latency_ms)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// The call's row, locked until the attempt is recorded.
pub(super) const LOCK_CALL: &str = "SELECT state FROM calls WHERE call_id = $1 FOR SHARE";

impl RingPermit {
    /// The permit of a connection inside a transaction (the one that claimed
    /// the delivery) that read the call's row with [`LOCK_CALL`]: `None` when
    /// the call was cancelled.
    pub async fn locked(
        client: Object,
        call_id: &str,
        device_id: i64,
        row: Option<tokio_postgres::Row>,
    ) -> Result<Option<Self>, StoreError> {
        RingPermit {
            client: Some(client),
            call_id: call_id.to_string(),
            device_id,
            event_type: "call.incoming",
        }
        .unless_cancelled(row)
        .await
    }

    /// The permit, or `None` (transaction rolled back) when the call's row says
    /// it was cancelled.
    async fn unless_cancelled(
        mut self,
        row: Option<tokio_postgres::Row>,
    ) -> Result<Option<Self>, StoreError> {
        if row.is_some_and(|r| CallState::parse(r.get(0)) == CallState::Cancelled) {
            let client = self.client.take().expect("a live permit");
            if client.batch_execute("ROLLBACK").await.is_err() {
                drop(Object::take(client));
            }
            return Ok(None);
        }
        Ok(Some(self))
    }

    /// Records the attempt (and a success on the device, for devices of our own
    /// table) and releases the call.
    pub async fn record(mut self, a: &AttemptRecord) -> Result<(), StoreError> {
        let client = self.client.take().expect("a permit records once");
        let result = async {
            // One statement records the attempt and, on success, the device's
            // success and learned environment (what `Store::record_success` does).
            let stmt = client.prepare_cached(RECORD_RING_ATTEMPT).await?;
            let status = a.apns_status.map(|s| s as i16);
            let latency = a.latency_ms.min(i32::MAX as u64) as i32;
            let environment = a.environment.as_str();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
                &self.call_id,
                &self.device_id,
                &self.event_type,
                &environment,
                &status,
                &a.reason,
                &a.apns_id,
                &latency,
            ];
            let insert = client.execute(&stmt, &params);
            // Pipelined: one round trip for the insert and the commit.
            let (inserted, committed) = tokio::join!(insert, client.batch_execute("COMMIT"));
            inserted?;
            committed?;
            Ok::<_, StoreError>(())
        }
        .await;
        if result.is_err() {
            drop(Object::take(client));
        }
        result
    }
}

/// A call to open (see [`Store::open_call`]).
#[derive(Clone, Debug)]
pub struct OpenCall {
    call_id: String,
    bundle_id: String,
    to_user_id: String,
    ring_deadline_ms: i64,
}

/// Opens many calls in one statement; each request gets its call's state.
async fn open_calls(
    pool: deadpool_postgres::Pool,
    reqs: Vec<OpenCall>,
) -> Result<Vec<CallState>, StoreError> {
    // One row per call: ON CONFLICT cannot touch a row twice in one statement.
    // Sorted, so two batches lock shared rows in the same order.
    let mut unique: Vec<&OpenCall> = reqs.iter().collect();
    unique.sort_unstable_by(|a, b| a.call_id.cmp(&b.call_id));
    unique.dedup_by(|a, b| a.call_id == b.call_id);
    let ids: Vec<&str> = unique.iter().map(|r| r.call_id.as_str()).collect();
    let bundles: Vec<&str> = unique.iter().map(|r| r.bundle_id.as_str()).collect();
    let users: Vec<&str> = unique.iter().map(|r| r.to_user_id.as_str()).collect();
    let deadlines: Vec<i64> = unique.iter().map(|r| r.ring_deadline_ms).collect();
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "INSERT INTO calls (call_id, bundle_id, to_user_id, ring_deadline)
             SELECT c, b, u, to_timestamp(d / 1000.0)
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS k(c, b, u, d)
             ON CONFLICT (call_id) DO UPDATE
                 SET ring_deadline = COALESCE(calls.ring_deadline, EXCLUDED.ring_deadline)
             RETURNING call_id, state",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&ids, &bundles, &users, &deadlines])
        .await?;
    let states: std::collections::HashMap<&str, CallState> = rows
        .iter()
        .map(|r| (r.get(0), CallState::parse(r.get(1))))
        .collect();
    reqs.iter()
        .map(|r| {
            states
                .get(r.call_id.as_str())
                .copied()
                .ok_or_else(|| StoreError::Batch(format!("call {} was not opened", r.call_id)))
        })
        .collect()
}

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

#[derive(Clone, Debug, PartialEq, Serialize)]
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
    /// Opens (or joins) a call for an initiate; returns its state — `Cancelled`
    /// when its cancel came first.
    pub async fn open_call(
        &self,
        call_id: &str,
        bundle_id: &str,
        to_user_id: &str,
        ring_deadline_ms: i64,
    ) -> Result<CallState, StoreError> {
        let req = OpenCall {
            call_id: call_id.to_string(),
            bundle_id: bundle_id.to_string(),
            to_user_id: to_user_id.to_string(),
            ring_deadline_ms,
        };
        super::batcher(
            "open_call",
            &self.batches.open_call,
            &self.batches,
            open_calls,
        )
        .call(req)
        .await
    }

    /// Records a cancel (creating the call if its initiate has not arrived). Waits
    /// for ring attempts under way to be recorded. Returns the ring deadline
    /// (ms since epoch) when the call had one.
    pub async fn cancel_call(
        &self,
        call_id: &str,
        bundle_id: &str,
        to_user_id: &str,
        reason: Option<&str>,
        answered_device_id: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        let mut client = self.pool.get().await?;
        // Always flushed, whatever postgres.synchronous_commit says: a cancel
        // lost in a crash could let its call ring.
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL synchronous_commit = on")
            .await?;
        let row = tx
            .query_one(
                "INSERT INTO calls (call_id, bundle_id, to_user_id, state, cancelled_at, settled_at,
                                    cancel_reason, answered_device_id)
                 VALUES ($1, $2, $3, 'cancelled', clock_timestamp(), clock_timestamp(), $4, $5)
                 ON CONFLICT (call_id) DO UPDATE SET
                     state = 'cancelled',
                     cancelled_at = COALESCE(calls.cancelled_at, clock_timestamp()),
                     settled_at = COALESCE(calls.settled_at, clock_timestamp()),
                     cancel_reason = COALESCE(calls.cancel_reason, EXCLUDED.cancel_reason),
                     answered_device_id = COALESCE(calls.answered_device_id, EXCLUDED.answered_device_id)
                 RETURNING (extract(epoch FROM ring_deadline) * 1000)::bigint",
                &[&call_id, &bundle_id, &to_user_id, &reason, &answered_device_id],
            )
            .await?;
        tx.commit().await?;
        Ok(row.get(0))
    }

    /// Before a ring attempt: `None` if the call was cancelled, else a permit
    /// holding the call until the attempt is recorded.
    pub async fn ring_permit(
        &self,
        call_id: &str,
        device_id: i64,
        event_type: &'static str,
    ) -> Result<Option<RingPermit>, StoreError> {
        let client = self.pool.get().await?;
        let permit = RingPermit {
            client: Some(client),
            call_id: call_id.to_string(),
            device_id,
            event_type,
        };
        let client = permit.client.as_ref().expect("just set");
        let stmt = client.prepare_cached(LOCK_CALL).await?;
        // Pipelined: BEGIN and the locking read in one round trip.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&call_id];
        let (began, row) = tokio::join!(
            client.batch_execute("BEGIN"),
            client.query_opt(&stmt, &params)
        );
        began?;
        permit.unless_cancelled(row?).await
    }

    /// Records an attempt outside any call lock (cancel pushes).
    pub async fn record_attempt(
        &self,
        call_id: &str,
        device_id: i64,
        event_type: &str,
        a: &AttemptRecord,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(INSERT_ATTEMPT).await?;
        let status = a.apns_status.map(|s| s as i16);
        let latency = a.latency_ms.min(i32::MAX as u64) as i32;
        client
            .execute(
                &stmt,
                &[
                    &call_id,
                    &device_id,
                    &event_type,
                    &a.environment.as_str(),
                    &status,
                    &a.reason,
                    &a.apns_id,
                    &latency,
                ],
            )
            .await?;
        Ok(())
    }

    /// Devices that accepted a ring of this call.
    pub async fn rung_devices(&self, call_id: &str) -> Result<Vec<RungDevice>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT DISTINCT ON (a.device_id) a.device_id, d.voip_token, a.environment
                 FROM delivery_attempts a JOIN devices d ON d.id = a.device_id
                 WHERE a.call_id = $1 AND a.event_type = 'call.incoming' AND a.apns_status = 200
                 ORDER BY a.device_id, a.id DESC",
                &[&call_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| RungDevice {
                device_id: r.get(0),
                token: r.get(1),
                environment: Environment::parse(r.get::<_, &str>(2)),
            })
            .collect())
    }

    /// The call's state, or `None` for a call never seen.
    pub async fn call_state(&self, call_id: &str) -> Result<Option<CallState>, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt("SELECT state FROM calls WHERE call_id = $1", &[&call_id])
            .await?;
        Ok(row.map(|r| CallState::parse(r.get(0))))
    }

    /// Everything recorded about one call.
    pub async fn trace_call(&self, call_id: &str) -> Result<Option<CallTrace>, StoreError> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT to_user_id, bundle_id, state, {}, {}, {}, {}, cancel_reason, answered_device_id
             FROM calls WHERE call_id = $1",
            ts("created_at"),
            ts("ring_deadline"),
            ts("settled_at"),
            ts("cancelled_at")
        );
        let Some(call) = client.query_opt(&sql, &[&call_id]).await? else {
            return Ok(None);
        };
        let claims = client
            .query(
                "SELECT device_id, result FROM delivery_claims WHERE call_id = $1 ORDER BY created_at, device_id",
                &[&call_id],
            )
            .await?;
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
            let r = result.unwrap_or_default();
            let text = |k: &str| r.get(k).and_then(|v| v.as_str()).map(str::to_string);
            deliveries.push(DeliveryTrace {
                device_id,
                event_type: text("eventType").unwrap_or_else(|| "call.incoming".into()),
                token_suffix: text("tokenSuffix"),
                status: text("status").unwrap_or_else(|| "ringing".into()),
                environment: text("environment"),
                fallback_used: r
                    .get("fallbackUsed")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
                attempts: Vec::new(),
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

    /// Deletes calls and attempts older than `age`.
    pub async fn purge_calls(&self, age: Duration) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        let secs = age.as_secs_f64();
        let attempts = client
            .execute(
                "DELETE FROM delivery_attempts WHERE at < now() - make_interval(secs => $1)",
                &[&secs],
            )
            .await?;
        let calls = client
            .execute(
                "DELETE FROM calls WHERE created_at < now() - make_interval(secs => $1)",
                &[&secs],
            )
            .await?;
        Ok(attempts + calls)
    }
}
