//! Calls as state: opened, cancelled, settled, purged.
//!
//! The guarantee that a cancelled call never rings after its cancel was recorded
//! rests on the call's row and the rings' claims, with no lock held across a
//! push. A ring is admitted (claimed) in a statement that locks the call's row
//! (see `admit`); a cancel first marks the row `cancelled`, so a ring either was
//! admitted before (its claim is committed) or sees the mark and is not sent; a
//! ring retrying looks at the mark before each further attempt. The cancel then
//! waits, holding no connection, until every admitted ring of the call has its
//! outcome recorded (or its owner is dead), and only then records `cancelled_at`.
//! So every ring either went out before `cancelled_at` (and its claim holds its
//! result when the cancel looks for rung devices) or never does.

use std::time::Duration;

use serde::Serialize;

use super::{Store, StoreError};
use crate::event::Environment;
use crate::retry_policy::RetryPolicy;

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

    /// A state as stored (anything unknown reads as ringing).
    pub fn parse(s: &str) -> Self {
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
    /// When the request was sent, ms since epoch.
    pub at_ms: i64,
}

/// A device that accepted a ring, for its cancel push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RungDevice {
    pub device_id: i64,
    pub token: String,
    pub environment: Option<Environment>,
    /// The app's alert token, when it registered one.
    pub alert_token: Option<String>,
}

/// How often a cancel looks at the rings of its call in flight.
const RING_WAIT_POLL: RetryPolicy =
    RetryPolicy::doubling(Duration::from_millis(5), Duration::from_millis(50));

/// How long a cancel waits for the rings of its call in flight, at most.
const RING_WAIT_CAP: Duration = Duration::from_secs(15);

/// Which of these calls are cancelled, in one statement.
async fn cancelled_calls(
    pool: deadpool_postgres::Pool,
    ids: super::batch::Requests<String>,
) -> Result<Vec<bool>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached("SELECT call_id FROM calls WHERE call_id = ANY($1) AND state = 'cancelled'")
        .await?;
    let ids: &[String] = &ids;
    let rows = client.query(&stmt, &[&ids]).await?;
    let cancelled: std::collections::HashSet<&str> = rows.iter().map(|r| r.get(0)).collect();
    Ok(ids
        .iter()
        .map(|id| cancelled.contains(id.as_str()))
        .collect())
}

/// What recording a cancel found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// Recorded; the call's ring deadline (ms since epoch) when it had one.
    Recorded(Option<i64>),
    /// The call is another user's: nothing was changed.
    OtherUser,
}

/// The devices that accepted a ring of call `$1`, from its claims' results.
static RUNG_DEVICES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT DISTINCT ON (c.device_id) c.device_id, d.voip_token,
                c.result->>'environment', d.alert_token
         FROM (SELECT device_id, created_at, {} AS result FROM delivery_claims
               WHERE call_id = $1 AND event_type = 'call.incoming') c
         JOIN devices d ON d.id = c.device_id
         WHERE c.result->>'status' = 'delivered'
         ORDER BY c.device_id, c.created_at DESC",
        super::claims::STORED_RESULT
    )
});

/// A call as its readers see it (`FROM calls c` then this): the state its
/// rings' claims say, and when. A ring's outcome is written to its claims
/// only; the call's row is settled from them when read, not written for every
/// ring (that update was ~10% of Postgres's CPU per ring, measured). The
/// row's own state wins when it is not `ringing` — `cancelled`, or settled
/// without claims (no device, a cancelled copy) — except that a delivery wins
/// over a recorded failure, as it did when rings wrote it. Rings whose claims
/// are not all published (a live owner's, a dead owner's not yet taken over)
/// leave the call ringing. `r.state` is the claims' verdict, `r.at` the last
/// outcome's time.
pub(super) static SETTLED_BY_CLAIMS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "
    LEFT JOIN LATERAL (
        SELECT CASE WHEN count(*) = 0 THEN NULL
                    WHEN bool_or(x.s = 'delivered') THEN 'delivered'
                    WHEN bool_or(x.published_at IS NULL) THEN NULL
                    WHEN bool_and(x.s = 'cancelled') THEN 'cancelled'
                    WHEN bool_and(x.s = 'expired') THEN 'expired'
                    ELSE 'failed' END AS state,
               max(x.published_at) AS at
        FROM (SELECT published_at, {} ->> 'status' AS s
              FROM delivery_claims
              WHERE call_id = c.call_id AND event_type = 'call.incoming') x
    ) r ON true",
        super::claims::STORED_RESULT
    )
});

/// The call's state (after [`SETTLED_BY_CLAIMS`]).
pub(super) const STATE: &str = "CASE WHEN c.state = 'ringing' THEN COALESCE(r.state, 'ringing')
          WHEN c.state IN ('failed', 'expired') AND r.state = 'delivered' THEN 'delivered'
          ELSE c.state END";

/// When it was settled (after [`SETTLED_BY_CLAIMS`]): when the claims
/// changed the row's state, the last outcome's time.
pub(super) static SETTLED_AT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("CASE WHEN ({STATE}) IS DISTINCT FROM c.state THEN r.at ELSE c.settled_at END")
});

/// [`Store::call_state`]'s statement, put together once.
static CALL_STATE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {STATE} FROM calls c {} WHERE c.call_id = $1",
        *SETTLED_BY_CLAIMS
    )
});

impl Store {
    /// Records a cancel (creating the call if its initiate has not arrived):
    /// marks the call cancelled, so no further ring is admitted or attempted,
    /// waits for the rings already admitted to be answered, then records
    /// `cancelled_at`. A cancel naming another user than the call's changes
    /// nothing: a producer's mistake must not silence someone else's call.
    pub async fn cancel_call(
        &self,
        call_id: &str,
        bundle_id: &str,
        to_user_id: &str,
        reason: Option<&str>,
        answered_device_id: Option<&str>,
    ) -> Result<Cancelled, StoreError> {
        let mut client = self.pool.get().await?;
        // Always flushed, whatever postgres.synchronous_commit says: a cancel
        // lost in a crash could let its call ring.
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL synchronous_commit = on")
            .await?;
        let row = tx
            .query_opt(
                "INSERT INTO calls (call_id, bundle_id, to_user_id, state, cancel_reason,
                                    answered_device_id)
                 VALUES ($1, $2, $3, 'cancelled', $4, $5)
                 ON CONFLICT (call_id) DO UPDATE SET
                     state = 'cancelled',
                     cancel_reason = COALESCE(calls.cancel_reason, EXCLUDED.cancel_reason),
                     answered_device_id = COALESCE(calls.answered_device_id, EXCLUDED.answered_device_id)
                 WHERE calls.to_user_id = EXCLUDED.to_user_id
                 RETURNING (extract(epoch FROM ring_deadline) * 1000)::bigint",
                &[&call_id, &bundle_id, &to_user_id, &reason, &answered_device_id],
            )
            .await?;
        tx.commit().await?;
        drop(client);
        let Some(row) = row else {
            return Ok(Cancelled::OtherUser);
        };
        let ring_deadline: Option<i64> = row.get(0);
        self.wait_for_rings(call_id, ring_deadline).await?;
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE calls SET cancelled_at = COALESCE(cancelled_at, clock_timestamp()),
                                  settled_at = COALESCE(settled_at, clock_timestamp())
                 WHERE call_id = $1",
                &[&call_id],
            )
            .await?;
        Ok(Cancelled::Recorded(ring_deadline))
    }

    /// Waits (polling, no connection held in between) until no ring of the call
    /// is in flight, for at most the ring deadline or [`RING_WAIT_CAP`]. An
    /// attempt in flight ends within its request timeout; a ring between attempts
    /// sees the cancel at its next one.
    async fn wait_for_rings(
        &self,
        call_id: &str,
        ring_deadline_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let cap = tokio::time::Instant::now() + RING_WAIT_CAP;
        let until = match ring_deadline_ms {
            Some(ms) => {
                let left = (ms - crate::event::now_ms()).max(0) as u64;
                cap.min(tokio::time::Instant::now() + Duration::from_millis(left))
            }
            None => cap,
        };
        let mut pauses = RING_WAIT_POLL.delays();
        while self.rings_in_flight(call_id).await? > 0 {
            if tokio::time::Instant::now() >= until {
                tracing::warn!(%call_id, "rings of the cancelled call still unanswered; going on");
                break;
            }
            tokio::time::sleep(pauses.next_delay()).await;
        }
        Ok(())
    }

    /// Whether the call was cancelled (before a further ring attempt), batched
    /// with concurrent checks.
    pub async fn is_cancelled(&self, call_id: &str) -> Result<bool, StoreError> {
        super::batcher(
            "is_cancelled",
            &self.batches.is_cancelled,
            super::Turns::Own,
            super::PROMPT,
            &self.batches,
            cancelled_calls,
        )
        .call(call_id.to_string())
        .await
    }

    /// Devices that accepted a ring of this call.
    pub async fn rung_devices(&self, call_id: &str) -> Result<Vec<RungDevice>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client.query(&*RUNG_DEVICES, &[&call_id]).await?;
        Ok(rows
            .iter()
            .map(|r| RungDevice {
                device_id: r.get(0),
                token: r.get(1),
                environment: r.get::<_, Option<&str>>(2).and_then(Environment::parse),
                alert_token: r.get(3),
            })
            .collect())
    }

    /// The call's callee, or `None` for a call never seen.
    pub async fn callee(&self, call_id: &str) -> Result<Option<String>, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT to_user_id FROM calls WHERE call_id = $1",
                &[&call_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The call's state, or `None` for a call never seen.
    pub async fn call_state(&self, call_id: &str) -> Result<Option<CallState>, StoreError> {
        let client = self.pool.get().await?;
        let row = client.query_opt(CALL_STATE.as_str(), &[&call_id]).await?;
        Ok(row.map(|r| CallState::parse(r.get(0))))
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
