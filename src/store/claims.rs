//! Delivery claims: at most one push per (event, device), across redeliveries,
//! duplicates and replicas.
//!
//! A worker claims a row before pushing and keeps its lease alive while it works;
//! a redelivered event finds the row and either re-publishes the stored result
//! (the worker died after the push) or waits for the live owner. The one window
//! left is a crash between APNs' answer and `complete`: the push happened but the
//! row does not say so, and the next claimant pushes again.

use std::time::Duration;

use super::calls::CallState;
use super::{Store, StoreError};

/// How long a claim outlives its owner's last renewal. Owners renew every
/// [`LEASE_RENEW_EVERY`], so a live owner never lapses; a dead one frees its claims
/// within this long.
pub const LEASE: Duration = Duration::from_secs(10);
pub const LEASE_RENEW_EVERY: Duration = Duration::from_secs(3);

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
    /// A live worker holds it.
    Busy,
}

/// The claims this worker holds open (taken, result not yet published): the
/// ones whose leases it renews.
#[derive(Clone, Default)]
pub struct OpenClaims(std::sync::Arc<std::sync::Mutex<std::collections::HashSet<(String, i64)>>>);

impl OpenClaims {
    pub fn add(&self, event_key: &str, device_id: i64) {
        self.0
            .lock()
            .expect("open claims lock")
            .insert((event_key.to_string(), device_id));
    }

    pub fn remove(&self, event_key: &str, device_ids: &[i64]) {
        let mut open = self.0.lock().expect("open claims lock");
        for d in device_ids {
            open.remove(&(event_key.to_string(), *d));
        }
    }

    pub fn snapshot(&self) -> Vec<(String, i64)> {
        self.0
            .lock()
            .expect("open claims lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// A claim's recorded result (see [`Store::complete_claim`]).
#[derive(Clone, Debug)]
pub struct Completed {
    event_key: String,
    device_id: i64,
    result: serde_json::Value,
}

/// An event whose results the broker confirmed (see [`Store::finish_event`]).
#[derive(Clone, Debug)]
pub struct Finished {
    event_key: String,
    device_ids: Vec<i64>,
    settle: Option<(String, CallState)>,
}

/// Records many claims' results in one statement.
async fn complete_claims(
    pool: deadpool_postgres::Pool,
    reqs: Vec<Completed>,
) -> Result<Vec<()>, StoreError> {
    let events: Vec<&str> = reqs.iter().map(|r| r.event_key.as_str()).collect();
    let devices: Vec<i64> = reqs.iter().map(|r| r.device_id).collect();
    let results: Vec<&serde_json::Value> = reqs.iter().map(|r| &r.result).collect();
    let client = pool.get().await?;
    // `event_key = ANY` keeps the plan on the primary key whatever the batch size.
    let stmt = client
        .prepare_cached(
            "UPDATE delivery_claims c SET result = k.r
             FROM unnest($1::text[], $2::bigint[], $3::jsonb[]) AS k(e, d, r)
             WHERE c.event_key = ANY($1) AND c.event_key = k.e AND c.device_id = k.d",
        )
        .await?;
    client
        .execute(&stmt, &[&events, &devices, &results])
        .await?;
    Ok(vec![(); reqs.len()])
}

/// Marks many events' claims published and settles their calls. A call stays
/// cancelled; a delivery reported by one copy of an event (which pushed some of
/// its devices) wins over another copy's failure.
async fn finish_events(
    pool: deadpool_postgres::Pool,
    reqs: Vec<Finished>,
) -> Result<Vec<()>, StoreError> {
    let (mut events, mut devices) = (Vec::new(), Vec::new());
    for r in &reqs {
        for d in &r.device_ids {
            events.push(r.event_key.as_str());
            devices.push(*d);
        }
    }
    // Sorted, so two batches lock shared calls in the same order.
    let mut settle: Vec<(&str, &str)> = reqs
        .iter()
        .filter_map(|r| r.settle.as_ref().map(|(c, s)| (c.as_str(), s.as_str())))
        .collect();
    settle.sort_unstable();
    let (calls, states): (Vec<&str>, Vec<&str>) = settle.into_iter().unzip();
    let client = pool.get().await?;
    // Two statements, each its own transaction (pipelined: one round trip). In
    // one, the claims' row locks were held while waiting for a call's row, which
    // a duplicate's claim transaction may hold while it waits for those claims:
    // a deadlock, and a failed batch.
    let publish = client
        .prepare_cached(
            "UPDATE delivery_claims c SET published_at = now()
             FROM unnest($1::text[], $2::bigint[]) AS k(e, d)
             WHERE c.event_key = ANY($1) AND c.event_key = k.e AND c.device_id = k.d
               AND c.published_at IS NULL",
        )
        .await?;
    let settle = client
        .prepare_cached(
            "UPDATE calls c SET state = k.s, settled_at = clock_timestamp()
             FROM unnest($1::text[], $2::text[]) AS k(id, s)
             WHERE c.call_id = ANY($1) AND c.call_id = k.id
               AND (c.state = 'ringing' OR (k.s = 'delivered' AND c.state IN ('failed', 'expired')))",
        )
        .await?;
    let claim_keys: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&events, &devices];
    let call_states: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&calls, &states];
    // A batch may hold only one kind (a device's claims, or a call to settle).
    let (published, settled) = tokio::join!(
        async {
            if events.is_empty() {
                return Ok(0);
            }
            client.execute(&publish, &claim_keys).await
        },
        async {
            if calls.is_empty() {
                return Ok(0);
            }
            client.execute(&settle, &call_states).await
        }
    );
    published?;
    settled?;
    Ok(vec![(); reqs.len()])
}

/// Takes (or takes over) the claim of (event, device); returns the stored result
/// when an earlier owner recorded one, no row when a live owner holds it.
const CLAIM: &str =
    "INSERT INTO delivery_claims (event_key, device_id, owner, lease_until, call_id, worker_id)
     VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5, split_part($3, '/', 1))
     ON CONFLICT (event_key, device_id) DO UPDATE
         SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until,
             worker_id = EXCLUDED.worker_id
         WHERE delivery_claims.published_at IS NULL
           AND (delivery_claims.lease_until < now() OR delivery_claims.owner = EXCLUDED.owner)
     RETURNING result";

const CLAIM_PUBLISHED: &str =
    "SELECT published_at IS NOT NULL FROM delivery_claims WHERE event_key = $1 AND device_id = $2";

/// Drops a connection whose transaction is in an unknown state instead of
/// returning it to the pool.
fn detach(client: deadpool_postgres::Object, e: tokio_postgres::Error) -> StoreError {
    drop(deadpool_postgres::Object::take(client));
    e.into()
}

/// What an unsuccessful claim (no row returned) means.
fn claim_not_taken(row: Option<tokio_postgres::Row>) -> Claim {
    match row {
        Some(r) if r.get::<_, bool>(0) => Claim::Done,
        // Held by a live owner, or gone between the two statements (purged): look again.
        _ => Claim::Busy,
    }
}

fn claim_taken(result: Option<serde_json::Value>) -> Claim {
    match result {
        None => Claim::Push,
        Some(r) => Claim::Republish(r),
    }
}

impl Store {
    /// Claims (event, device) for `owner`, taking over a lapsed lease.
    pub async fn claim(
        &self,
        event_key: &str,
        device_id: i64,
        owner: &str,
        call_id: &str,
    ) -> Result<Claim, StoreError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(CLAIM).await?;
        let lease = LEASE.as_secs_f64();
        if let Some(row) = client
            .query_opt(&stmt, &[&event_key, &device_id, &owner, &lease, &call_id])
            .await?
        {
            return Ok(claim_taken(row.get(0)));
        }
        let row = client
            .query_opt(CLAIM_PUBLISHED, &[&event_key, &device_id])
            .await?;
        Ok(claim_not_taken(row))
    }

    /// [`Store::claim`] for a ring, in one transaction with the first attempt's
    /// call lock: on `Push`, the claim commits with that attempt's record (one
    /// commit fewer per ring), and a worker that dies before leaves no claim.
    /// The permit is `None` when the call was cancelled.
    pub async fn claim_for_ring(
        &self,
        event_key: &str,
        device_id: i64,
        owner: &str,
        call_id: &str,
    ) -> Result<(Claim, Option<super::calls::RingPermit>), StoreError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(CLAIM).await?;
        let lock = client.prepare_cached(super::calls::LOCK_CALL).await?;
        let lease = LEASE.as_secs_f64();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&event_key, &device_id, &owner, &lease, &call_id];
        let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&call_id];
        // Pipelined: BEGIN, the claim and the call lock in one round trip. The
        // lock is taken even when the claim is not ours; it goes with the commit.
        let (began, row, call) = tokio::join!(
            client.batch_execute("BEGIN"),
            client.query_opt(&stmt, &params),
            client.query_opt(&lock, &lock_params)
        );
        let (row, call) = match began.and(row).and_then(|r| call.map(|c| (r, c))) {
            Ok(r) => r,
            Err(e) => return Err(detach(client, e)),
        };
        let claim = match row {
            Some(r) => claim_taken(r.get(0)),
            None => match client
                .query_opt(CLAIM_PUBLISHED, &[&event_key, &device_id])
                .await
            {
                Ok(r) => claim_not_taken(r),
                Err(e) => return Err(detach(client, e)),
            },
        };
        if claim != Claim::Push {
            // A lapsed lease taken over (Republish) must be kept.
            if let Err(e) = client.batch_execute("COMMIT").await {
                return Err(detach(client, e));
            }
            return Ok((claim, None));
        }
        let permit = super::calls::RingPermit::locked(client, call_id, device_id, call).await?;
        Ok((Claim::Push, permit))
    }

    /// Records the outcome of a claimed push.
    pub async fn complete_claim(
        &self,
        event_key: &str,
        device_id: i64,
        result: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let req = Completed {
            event_key: event_key.to_string(),
            device_id,
            result: result.clone(),
        };
        super::batcher(
            "complete_claim",
            &self.batches.complete_claim,
            &self.batches,
            complete_claims,
        )
        .call(req)
        .await
    }

    /// After an event's results were confirmed by the broker: marks its claims
    /// published and, for a ring, settles its call (a cancelled call keeps its
    /// state).
    pub async fn finish_event(
        &self,
        event_key: &str,
        device_ids: &[i64],
        settle: Option<(&str, CallState)>,
    ) -> Result<(), StoreError> {
        let req = Finished {
            event_key: event_key.to_string(),
            device_ids: device_ids.to_vec(),
            settle: settle.map(|(c, s)| (c.to_string(), s)),
        };
        super::batcher(
            "finish_event",
            &self.batches.finish_event,
            &self.batches,
            finish_events,
        )
        .call(req)
        .await
    }

    /// Extends the leases of these open claims (the worker's own): the heartbeat
    /// that tells other workers their owner is alive.
    pub async fn renew_leases(&self, keys: &[(String, i64)]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let (events, devices): (Vec<&str>, Vec<i64>) =
            keys.iter().map(|(e, d)| (e.as_str(), *d)).unzip();
        let client = self.pool.get().await?;
        let lease = LEASE.as_secs_f64();
        Ok(client
            .execute(
                "UPDATE delivery_claims c SET lease_until = now() + make_interval(secs => $3)
                 FROM unnest($1::text[], $2::bigint[]) AS k(event_key, device_id)
                 WHERE c.event_key = k.event_key AND c.device_id = k.device_id
                   AND c.published_at IS NULL",
                &[&events, &devices, &lease],
            )
            .await?)
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
