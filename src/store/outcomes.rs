//! A push's outcome, recorded once it is known: the claim's result, every APNs
//! attempt, and the device's success, for many pushes in one statement.

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{accepts, to_sql_checked, IsNull, ToSql, Type};

use super::calls::AttemptRecord;
use super::{Store, StoreError};
use crate::event::Environment;

/// JSON already serialised (a result, the same bytes as published), written as
/// `json`/`jsonb` without being parsed and serialised again.
#[derive(Clone, Debug)]
pub struct JsonText(pub bytes::Bytes);

impl From<serde_json::Value> for JsonText {
    fn from(v: serde_json::Value) -> Self {
        JsonText(
            serde_json::to_vec(&v)
                .expect("a JSON value serialises")
                .into(),
        )
    }
}

impl ToSql for JsonText {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            // jsonb's binary form: a version byte, then the text.
            out.put_u8(1);
        }
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    accepts!(JSON, JSONB);
    to_sql_checked!();
}

/// A push's outcome to record (see [`Store::record_outcome`]).
#[derive(Clone, Debug)]
pub struct Outcome {
    pub event_key: String,
    pub device_id: i64,
    pub call_id: String,
    pub event_type: &'static str,
    /// The result event, stored in the claim.
    pub result: JsonText,
    /// Every APNs request of the delivery.
    pub attempts: Vec<AttemptRecord>,
    /// The environment that accepted the token (our devices only).
    pub success: Option<Environment>,
}

/// Records many pushes' outcomes in one statement: each claim's result, every
/// attempt, and the devices that accepted a push (their learned environment).
/// A device's success is rewritten only when it says something new (first
/// success, another environment) or is an hour old: most pushes go to proven
/// devices, and rewriting their row each time was one update per push.
async fn record_outcomes(
    pool: deadpool_postgres::Pool,
    reqs: Vec<Outcome>,
) -> Result<Vec<()>, StoreError> {
    let events: Vec<&str> = reqs.iter().map(|r| r.event_key.as_str()).collect();
    let devices: Vec<i64> = reqs.iter().map(|r| r.device_id).collect();
    let results: Vec<&JsonText> = reqs.iter().map(|r| &r.result).collect();
    let (success_ids, success_envs): (Vec<i64>, Vec<&str>) = reqs
        .iter()
        .filter(|r| r.device_id > 0)
        .filter_map(|r| r.success.map(|e| (r.device_id, e.as_str())))
        .unzip();
    let mut a = AttemptColumns::default();
    for r in &reqs {
        for attempt in &r.attempts {
            a.push(&r.call_id, r.device_id, r.event_type, attempt);
        }
    }
    let client = pool.get().await?;
    // `= ANY` keeps the plans on the primary keys whatever the batch size.
    let stmt = client
        .prepare_cached(
            "WITH claim AS (
                 UPDATE delivery_claims c SET result = k.r
                 FROM unnest($1::text[], $2::bigint[], $3::jsonb[]) AS k(e, d, r)
                 WHERE c.event_key = ANY($1) AND c.event_key = k.e AND c.device_id = k.d
             ), success AS (
                 UPDATE devices d SET last_success_at = now(), environment = k.env
                 FROM unnest($4::bigint[], $5::text[]) AS k(id, env)
                 WHERE d.id = ANY($4) AND d.id = k.id
                   AND (d.last_success_at IS NULL OR d.environment IS DISTINCT FROM k.env
                        OR d.last_success_at < now() - interval '1 hour')
             )
             INSERT INTO delivery_attempts
                 (call_id, device_id, event_type, at, environment, apns_status, reason, apns_id,
                  latency_ms)
             SELECT c, d, t, to_timestamp(at / 1000.0), e, s, r, i, l
             FROM unnest($6::text[], $7::bigint[], $8::text[], $9::bigint[], $10::text[],
                         $11::smallint[], $12::text[], $13::text[], $14::int[])
                 AS k(c, d, t, at, e, s, r, i, l)",
        )
        .await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 14] = [
        &events,
        &devices,
        &results,
        &success_ids,
        &success_envs,
        &a.call_ids,
        &a.device_ids,
        &a.event_types,
        &a.at_ms,
        &a.environments,
        &a.statuses,
        &a.reasons,
        &a.apns_ids,
        &a.latencies,
    ];
    client.execute(&stmt, &params).await?;
    Ok(vec![(); reqs.len()])
}

/// `delivery_attempts` rows as columns, for `unnest`.
#[derive(Default)]
struct AttemptColumns<'a> {
    call_ids: Vec<&'a str>,
    device_ids: Vec<i64>,
    event_types: Vec<&'a str>,
    at_ms: Vec<i64>,
    environments: Vec<&'static str>,
    statuses: Vec<Option<i16>>,
    reasons: Vec<Option<&'a str>>,
    apns_ids: Vec<Option<&'a str>>,
    latencies: Vec<i32>,
}

impl<'a> AttemptColumns<'a> {
    fn push(
        &mut self,
        call_id: &'a str,
        device_id: i64,
        event_type: &'a str,
        a: &'a AttemptRecord,
    ) {
        self.call_ids.push(call_id);
        self.device_ids.push(device_id);
        self.event_types.push(event_type);
        self.at_ms.push(a.at_ms);
        self.environments.push(a.environment.as_str());
        self.statuses.push(a.apns_status.map(|s| s as i16));
        self.reasons.push(a.reason.as_deref());
        self.apns_ids.push(a.apns_id.as_deref());
        self.latencies
            .push(a.latency_ms.min(i32::MAX as u64) as i32);
    }
}

impl Store {
    /// Records a push's outcome (its claim's result, its attempts, the device's
    /// success), batched with concurrent pushes.
    pub async fn record_outcome(&self, outcome: Outcome) -> Result<(), StoreError> {
        if let (Some(ext), Some(env)) = (&self.external, outcome.success) {
            if outcome.device_id < 0 {
                ext.record_success(&self.pool, outcome.device_id, env)
                    .await?;
            }
        }
        super::batcher(
            "record_outcome",
            &self.batches.record_outcome,
            &self.batches,
            record_outcomes,
        )
        .call(outcome)
        .await
    }
}
