//! Delivery claims: at most one push per (event, device), across redeliveries,
//! duplicates and replicas.
//!
//! A worker claims a row before pushing (for rings, in the admitting statement,
//! see `admit`); a redelivered event finds the row and either re-publishes the
//! stored result (the worker died after the push), takes it over (its owner is
//! dead: its liveness lock is free, see `liveness`), or leaves it to the live
//! owner, whose own copy of the message publishes the result. The one window left is a crash
//! between sending a push and recording its outcome (with its published result,
//! see `outcomes`): the row does not say it was pushed, and the next claimant
//! pushes again.

use std::time::Duration;

use super::{Store, StoreError};

pub use super::outcomes::{Finished, JsonText, Outcome};

/// Written into each claim's `lease_until` for workers of earlier versions
/// (which take over a claim whose lease lapsed) during a rolling upgrade; this
/// version goes by its owner's liveness alone (see `liveness`).
pub const LEASE: Duration = Duration::from_secs(10);

/// What a claim attempt found.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// Ours, nothing pushed yet: push.
    Push,
    /// Ours, pushed before (by a worker that died) with this result, not yet
    /// confirmed by the broker: publish it, do not push.
    Republish(serde_json::Value),
    /// Done: result already published.
    Done,
    /// A live worker holds it and publishes its result; nothing to do here.
    Busy,
    /// Nobody live holds it and this ring did not claim it: the ring of a
    /// cancelled call claims nothing, and it publishes `cancelled` for such a
    /// device (never for one a live owner is pushing: that one is [`Self::Busy`]).
    Unclaimed,
}

/// True when the worker named by the column `$worker_id` is dead: its liveness
/// lock (class [`super::liveness::LOCK_CLASS`]) is free.
macro_rules! owner_gone {
    ($worker_id:literal) => {
        concat!(
            "pg_try_advisory_xact_lock_shared(1987082033, hashtext(COALESCE(",
            $worker_id,
            ", '')))"
        )
    };
}

/// A claim's stored result: `json` since migration 12 (`result_json`), `jsonb`
/// in the claims of earlier versions (`result`).
macro_rules! stored_result {
    () => {
        "COALESCE(result_json, result::json)"
    };
}
pub(super) const STORED_RESULT: &str = stored_result!();

/// When a claim not yet published may be taken: by its own owner (the same
/// message, tried again), or when its owner is dead. A live owner keeps its
/// claims for as long as it works on them, however long its retries take.
macro_rules! take_over {
    () => {
        concat!(
            "delivery_claims.published_at IS NULL
             AND (delivery_claims.owner = EXCLUDED.owner OR ",
            owner_gone!("delivery_claims.worker_id"),
            ")"
        )
    };
}
pub(super) const TAKE_OVER: &str = take_over!();

/// The claim `p`, not yet published, is held by a live worker.
pub(super) const HELD_BY_THE_LIVING: &str = concat!(
    "p.published_at IS NULL AND NOT ",
    owner_gone!("p.worker_id")
);

/// Takes (or takes over) the claim of (event, device) for a cancel push;
/// returns the stored result when an earlier owner recorded one, no row when a
/// live owner holds it.
const CLAIM: &str = concat!(
    "INSERT INTO delivery_claims (event_key, device_id, owner, lease_until, call_id, worker_id,
                                  event_type)
     VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5, split_part($3, '/', 1), $6)
     ON CONFLICT (event_key, device_id) DO UPDATE
         SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until,
             worker_id = EXCLUDED.worker_id
         WHERE ",
    take_over!(),
    "
     RETURNING ",
    stored_result!()
);

const CLAIM_PUBLISHED: &str =
    "SELECT published_at IS NOT NULL FROM delivery_claims WHERE event_key = $1 AND device_id = $2";

/// What an unsuccessful claim (no row returned) means.
fn claim_not_taken(row: Option<tokio_postgres::Row>) -> Claim {
    match row {
        Some(r) if r.get::<_, bool>(0) => Claim::Done,
        // Held by a live owner, or gone between the two statements (purged): look again.
        _ => Claim::Busy,
    }
}

/// What a claim taken (a row returned, with any stored result) means.
pub(super) fn claim_taken(result: Option<serde_json::Value>) -> Claim {
    match result {
        None => Claim::Push,
        Some(r) => Claim::Republish(r),
    }
}

impl Store {
    /// Claims (event, device) for `owner`, taking over a dead owner's claim.
    pub async fn claim(
        &self,
        event_key: &str,
        device_id: i64,
        owner: &str,
        call_id: &str,
        event_type: &str,
    ) -> Result<Claim, StoreError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(CLAIM).await?;
        let lease = LEASE.as_secs_f64();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            &event_key,
            &device_id,
            &owner,
            &lease,
            &call_id,
            &event_type,
        ];
        if let Some(row) = client.query_opt(&stmt, &params).await? {
            return Ok(claim_taken(row.get(0)));
        }
        let row = client
            .query_opt(CLAIM_PUBLISHED, &[&event_key, &device_id])
            .await?;
        Ok(claim_not_taken(row))
    }

    /// How many rings of this call are still in flight: claimed by a live owner
    /// and without a recorded outcome.
    pub async fn rings_in_flight(&self, call_id: &str) -> Result<i64, StoreError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(concat!(
                "SELECT count(*) FROM delivery_claims
                 WHERE call_id = $1 AND event_type = 'call.incoming'
                   AND result IS NULL AND result_json IS NULL AND published_at IS NULL AND NOT ",
                owner_gone!("worker_id")
            ))
            .await?;
        Ok(client.query_one(&stmt, &[&call_id]).await?.get(0))
    }

    /// Deletes claims older than `age`; returns how many.
    pub async fn purge_claims(&self, age: Duration) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .execute(
                "DELETE FROM delivery_claims WHERE created_at < now() - make_interval(secs => $1)",
                &[&age.as_secs_f64()],
            )
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_takeover_checks_the_liveness_lock_class() {
        let class = super::super::liveness::LOCK_CLASS.to_string();
        assert!(TAKE_OVER.contains(&class));
        assert!(CLAIM.contains(&class));
        assert!(owner_gone!("worker_id").contains(&class));
    }
}
