//! A ring's one statement: open (or join) the call, resolve the callee's devices
//! and claim each of them, for a whole batch of events at once.
//!
//! The claim commits before the push, with no connection held across it: the
//! call's row is locked only while the statement runs. A cancel's `UPDATE` of
//! that row therefore either comes first (the statement sees `cancelled` and
//! claims nothing) or waits for the statement's commit and then finds the claims
//! it made (see `Store::cancel_call`, which waits for them to be answered).

use std::sync::LazyLock;

use super::calls::CallState;
use super::claims::{claim_taken, Claim, HELD_BY_THE_LIVING, STORED_RESULT, TAKE_OVER};
use super::{Device, Store, StoreError};
use crate::event::Environment;

/// One ring event to admit.
#[derive(Clone, Debug)]
pub struct Ring {
    /// The claim key (see `claims`).
    pub key: String,
    pub call_id: String,
    pub bundle_id: String,
    pub user_id: String,
    pub ring_deadline_ms: i64,
    /// Who claims the deliveries (this worker and this message).
    pub owner: String,
    /// Devices already resolved (tokens in a team's own table); `None`: ours.
    pub devices: Option<Vec<Device>>,
}

/// What the statement found for one event.
#[derive(Clone, Debug, Default)]
pub struct Admitted {
    /// The call's state; `None` when the user has no device (nothing to report
    /// it on).
    pub state: Option<CallState>,
    /// Each live device and what its claim attempt found (`Busy` when nothing
    /// was claimed).
    pub devices: Vec<(Device, Claim)>,
}

/// Shared by both forms: the batch's events (with their position), their calls
/// opened in call-id order (two batches lock shared calls in the same order).
const EVENTS: &str = "
    ev AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                             $6::text[], $7::bool[]) WITH ORDINALITY
            AS e(key, call_id, bundle_id, user_id, deadline_ms, owner, claim, i)
    ),
    opened AS (
        INSERT INTO calls (call_id, bundle_id, to_user_id, ring_deadline)
        SELECT DISTINCT ON (call_id) call_id, bundle_id, user_id, to_timestamp(deadline_ms / 1000.0)
        FROM ev ORDER BY call_id
        ON CONFLICT (call_id) DO UPDATE
            SET ring_deadline = COALESCE(calls.ring_deadline, EXCLUDED.ring_deadline)
        RETURNING call_id, state, to_user_id
    ),";

/// Our devices table: looked up in the statement.
const OUR_DEVICES: &str = "
    dev AS (
        SELECT ev.i, ev.key, ev.call_id, ev.owner, ev.claim, {STATE}, d.id, d.voip_token,
               d.environment, (extract(epoch FROM d.updated_at) * 1000)::bigint AS updated_ms,
               d.last_success_at IS NOT NULL AS proven,
               {RECENT} AS recent
        FROM ev JOIN opened o ON o.call_id = ev.call_id
        JOIN devices d ON d.user_id = ev.user_id AND d.bundle_id = ev.bundle_id
                      AND d.invalidated_at IS NULL
    ),";

/// Devices resolved beforehand: ($9 event position, $10 device id) pairs.
const GIVEN_DEVICES: &str = "
    dev AS (
        SELECT ev.i, ev.key, ev.call_id, ev.owner, ev.claim, {STATE}, x.id,
               NULL::text AS voip_token, NULL::text AS environment, 0::bigint AS updated_ms,
               false AS proven, false AS recent
        FROM unnest($9::bigint[], $10::bigint[]) AS x(i, id)
        JOIN ev ON ev.i = x.i JOIN opened o ON o.call_id = ev.call_id
    ),";

/// Claims every device of a live call, then reports each device with what its
/// claim found (matched by owner too: two copies of an event in one batch are
/// two owners, and only the first claims). A claim not taken is looked up as
/// it was before the statement — only then: `AND` does not evaluate the
/// `EXISTS` for a claim taken, the common case. A cancelled call's ring claims
/// nothing, so for it the last column says whether no live worker holds the
/// device's claim (nobody pushes it; see [`Claim::Unclaimed`]).
fn tail() -> String {
    format!(
        "
    claimed AS (
        INSERT INTO delivery_claims (event_key, device_id, owner, lease_until, call_id, worker_id,
                                     event_type)
        SELECT key, id, owner, now() + make_interval(secs => $8), call_id,
               split_part(owner, '/', 1), 'call.incoming'
        FROM dev WHERE claim AND state <> 'cancelled'
        ORDER BY key, id
        ON CONFLICT (event_key, device_id) DO UPDATE
            SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until,
                worker_id = EXCLUDED.worker_id
            WHERE {TAKE_OVER}
        RETURNING event_key, device_id, owner, {STORED_RESULT} AS result
    )
    SELECT dev.i, dev.state, dev.id, dev.voip_token, dev.environment, dev.updated_ms, dev.proven,
           c.event_key IS NOT NULL, c.result,
           c.event_key IS NULL AND EXISTS (
               SELECT 1 FROM delivery_claims p
               WHERE p.event_key = dev.key AND p.device_id = dev.id
                 AND p.published_at IS NOT NULL),
           dev.recent,
           c.event_key IS NULL AND dev.state = 'cancelled' AND NOT EXISTS (
               SELECT 1 FROM delivery_claims p
               WHERE p.event_key = dev.key AND p.device_id = dev.id AND {HELD_BY_THE_LIVING})
    FROM dev
    LEFT JOIN claimed c ON c.event_key = dev.key AND c.device_id = dev.id AND c.owner = dev.owner
    ORDER BY dev.i, dev.id"
    )
}

/// The call's state as this ring sees it: a call id already taken by another
/// user's call (a cancel for someone else that came first, or a producer's
/// reused id) does not cancel this one.
const STATE: &str = "CASE WHEN o.to_user_id = ev.user_id THEN o.state ELSE 'ringing' END AS state";

fn statement(given: bool) -> String {
    let dev = if given { GIVEN_DEVICES } else { OUR_DEVICES };
    let dev = dev
        .replace("{STATE}", STATE)
        .replace("{RECENT}", super::devices::SUCCESS_IS_RECENT);
    format!("WITH {EVENTS}{dev}{}", tail())
}

/// Both forms, put together once (not for every batch).
static WITH_OUR_DEVICES: LazyLock<String> = LazyLock::new(|| statement(false));
static WITH_GIVEN_DEVICES: LazyLock<String> = LazyLock::new(|| statement(true));

/// Admits a batch of rings in one statement.
pub(super) async fn admit_rings(
    pool: deadpool_postgres::Pool,
    reqs: super::batch::Requests<Ring>,
) -> Result<Vec<Admitted>, StoreError> {
    // Two copies of one event in a batch: only the first claims (a statement
    // cannot claim a row twice); the second only looks, and finds the claim
    // taken.
    let mut seen = std::collections::HashSet::new();
    let claim: Vec<bool> = reqs.iter().map(|r| seen.insert(r.key.as_str())).collect();
    let given = reqs.iter().any(|r| r.devices.is_some());
    let col = |f: fn(&Ring) -> &str| reqs.iter().map(f).collect::<Vec<&str>>();
    let (keys, calls, bundles, users, owners) = (
        col(|r| &r.key),
        col(|r| &r.call_id),
        col(|r| &r.bundle_id),
        col(|r| &r.user_id),
        col(|r| &r.owner),
    );
    let deadlines: Vec<i64> = reqs.iter().map(|r| r.ring_deadline_ms).collect();
    let (mut at, mut ids) = (Vec::new(), Vec::new());
    for (i, r) in reqs.iter().enumerate() {
        for d in r.devices.iter().flatten() {
            at.push(i as i64 + 1);
            ids.push(d.id);
        }
    }
    let lease = super::claims::LEASE.as_secs_f64();
    let client = pool.get().await?;
    let sql = if given {
        &*WITH_GIVEN_DEVICES
    } else {
        &*WITH_OUR_DEVICES
    };
    let stmt = client.prepare_cached(sql).await?;
    let rows = if given {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
            &keys, &calls, &bundles, &users, &deadlines, &owners, &claim, &lease, &at, &ids,
        ];
        client.query(&stmt, &params).await?
    } else {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
            &keys, &calls, &bundles, &users, &deadlines, &owners, &claim, &lease,
        ];
        client.query(&stmt, &params).await?
    };
    let mut out: Vec<Admitted> = vec![Admitted::default(); reqs.len()];
    for row in &rows {
        let i = row.get::<_, i64>(0) as usize - 1;
        let state = CallState::parse(row.get(1));
        let id: i64 = row.get(2);
        let device = match &reqs[i].devices {
            Some(given) => match given.iter().find(|d| d.id == id) {
                Some(d) => d.clone(),
                None => continue,
            },
            None => Device {
                id,
                token: row.get(3),
                environment: Environment::parse(row.get::<_, &str>(4)),
                updated_at_ms: row.get(5),
                proven: row.get(6),
                success_is_recent: row.get(10),
            },
        };
        let claim = match (row.get::<_, bool>(7), row.get::<_, bool>(9), row.get(11)) {
            (true, _, _) => claim_taken(row.get(8)),
            (false, true, _) => Claim::Done,
            (false, false, true) => Claim::Unclaimed,
            (false, false, false) => Claim::Busy,
        };
        out[i].state = Some(state);
        out[i].devices.push((device, claim));
    }
    Ok(out)
}

impl Store {
    /// Opens the ring's call, resolves the callee's live devices for the app and
    /// claims each one for `ring.owner` (see [`Admitted`]), batched with
    /// concurrent rings.
    pub async fn admit_ring(&self, mut ring: Ring) -> Result<Admitted, StoreError> {
        if let Some(ext) = &self.external {
            ring.devices = Some(
                ext.live_devices(&self.pool, &ring.user_id, &ring.bundle_id)
                    .await?,
            );
        }
        super::batcher(
            "admit_ring",
            &self.batches.admit_ring,
            super::Turns::Ring,
            super::PROMPT,
            &self.batches,
            admit_rings,
        )
        .call(ring)
        .await
    }
}
