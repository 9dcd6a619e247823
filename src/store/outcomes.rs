//! A push's outcome, recorded once its result is confirmed by the broker: the
//! claim's result, its APNs attempts and `published_at`, the device's success,
//! and the call settled, for many events in one statement.

use std::sync::LazyLock;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{accepts, to_sql_checked, IsNull, ToSql, Type};

use super::calls::{AttemptRecord, CallState};
use super::history::AttemptTrace;
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

/// A push's outcome, recorded with its claim once the broker confirmed its
/// result (see [`Store::finish_event`]).
#[derive(Clone, Debug)]
pub struct Outcome {
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

/// What an event's confirmed results leave behind (see [`Store::finish_event`]).
#[derive(Clone, Debug, Default)]
pub struct Finished {
    /// The claim key of the event.
    pub event_key: String,
    /// Pushes this worker made: their claims take the outcome and are marked
    /// published in the same update.
    pub outcomes: Vec<Outcome>,
    /// Results re-published from this worker's claims (recorded by an earlier
    /// owner): marked published only.
    pub published_only: Vec<i64>,
    /// For a ring: the call's state from the results of this copy of the event.
    pub settle: Option<(String, CallState)>,
}

/// Finishes many events in one statement: each claim's result and
/// `published_at` (and the delivery's attempts) in one update, the devices that
/// accepted a push (their learned environment), and the calls settled. A call
/// stays cancelled; a delivery reported by one copy of an event (which pushed
/// some of its devices) wins over another copy's failure.
///
/// A device's success is rewritten only when it says something new (first
/// success, another environment) or is an hour old: most pushes go to proven
/// devices, and rewriting their row each time was one update per push. (The
/// pipeline does not even send a success its admission found recent.)
async fn finish_events(
    pool: deadpool_postgres::Pool,
    reqs: super::batch::Requests<Finished>,
) -> Result<Vec<()>, StoreError> {
    let mut claims = ClaimColumns::default();
    let mut successes: Vec<(i64, &str)> = Vec::new();
    for r in reqs.iter() {
        for o in &r.outcomes {
            claims.push(
                &r.event_key,
                o.device_id,
                Some(&o.result),
                Some(attempts_json(o)),
            );
            if let (true, Some(env)) = (o.device_id > 0, o.success) {
                successes.push((o.device_id, env.as_str()));
            }
        }
        for d in &r.published_only {
            claims.push(&r.event_key, *d, None, None);
        }
    }
    // Sorted, so two batches (of two replicas) lock shared rows in one order.
    successes.sort_unstable();
    successes.dedup_by_key(|s| s.0);
    let (success_ids, success_envs): (Vec<i64>, Vec<&str>) = successes.into_iter().unzip();
    let mut settle: Vec<(&str, &str)> = reqs
        .iter()
        .filter_map(|r| r.settle.as_ref().map(|(c, s)| (c.as_str(), s.as_str())))
        .collect();
    settle.sort_unstable();
    let (calls, states): (Vec<&str>, Vec<&str>) = settle.into_iter().unzip();
    let client = pool.get().await?;
    type Param<'p> = &'p (dyn tokio_postgres::types::ToSql + Sync);
    let mut params: Vec<Param> = vec![
        &claims.events,
        &claims.devices,
        &claims.results,
        &claims.attempts,
    ];
    if !success_ids.is_empty() {
        params.extend([&success_ids as Param, &success_envs]);
    }
    if !calls.is_empty() {
        params.extend([&calls as Param, &states]);
    }
    let sql = &FORMS[usize::from(!success_ids.is_empty()) | usize::from(!calls.is_empty()) << 1];
    let finish = client.prepare_cached(sql).await?;
    client.execute(&finish, &params).await?;
    Ok(vec![(); reqs.len()])
}

/// The finishing statement, in four forms: with the devices' successes to
/// record or without (most batches: a success within the hour is not sent,
/// see `Device::success_is_recent`), with calls to settle or without (nearly
/// all: a ring's call is settled by its claims, see
/// `calls::SETTLED_BY_CLAIMS`; only events settled without claims, as a ring
/// to a user with no device, name their call). A statement without an update
/// spares Postgres its start-up, its locks and its index probes. `= ANY` keeps
/// the plans on the primary keys whatever the batch size; the attempts stay in
/// the claim (no row of their own, no index entries).
///
/// Lock order: an admitting statement locks a call's row, then its claims, so
/// a finish that held claims while it waited for a call's row could deadlock
/// with a duplicate's admission. The claims' update is therefore gated on a
/// one-time look at `settled` (an initial plan, run before the update reads a
/// row): the calls are locked first. The devices' update takes no lock an
/// admission needs. (`batching::a_finish_waits_for_its_call…` holds this.)
fn finish_statement(with_successes: bool, with_settles: bool) -> String {
    let (success, next) = if with_successes {
        let refresh = super::devices::SUCCESS_REFRESH;
        let success = format!(
            "
    success AS (
        UPDATE devices d SET last_success_at = now(), environment = k.env
        FROM unnest($5::bigint[], $6::text[]) AS k(id, env)
        WHERE d.id = ANY($5) AND d.id = k.id
          AND (d.last_success_at IS NULL OR d.environment IS DISTINCT FROM k.env
               OR d.last_success_at < now() - {refresh})
    ),"
        );
        (success, 7)
    } else {
        (String::new(), 5)
    };
    let (settled, gate) = if with_settles {
        let (calls, states) = (format!("${next}"), format!("${}", next + 1));
        let settled = format!(
            "
    settled AS (
        UPDATE calls c SET state = k.s, settled_at = clock_timestamp()
        FROM unnest({calls}::text[], {states}::text[]) AS k(id, s)
        WHERE c.call_id = ANY({calls}) AND c.call_id = k.id
          AND (c.state = 'ringing' OR (k.s = 'delivered' AND c.state IN ('failed', 'expired')))
        RETURNING 1
    ),"
        );
        (settled, "(SELECT count(*) FROM settled) >= 0 AND")
    } else {
        (String::new(), "")
    };
    let ctes = format!("{success}{settled}");
    let with = match ctes.strip_suffix(',') {
        Some(ctes) => format!("WITH {ctes}"),
        None => String::new(),
    };
    format!(
        "
    {with}
    UPDATE delivery_claims c
    SET result_json = COALESCE(k.r, c.result_json), attempts_json = COALESCE(k.a, c.attempts_json),
        published_at = now()
    FROM unnest($1::text[], $2::bigint[], $3::json[], $4::json[]) AS k(e, d, r, a)
    WHERE {gate} c.event_key = ANY($1) AND c.event_key = k.e AND c.device_id = k.d
      AND c.published_at IS NULL"
    )
}

/// Every form (bit 0: successes, bit 1: settles), put together once.
static FORMS: LazyLock<[String; 4]> =
    LazyLock::new(|| std::array::from_fn(|i| finish_statement(i & 1 == 1, i & 2 == 2)));

/// A delivery's attempts as its claim keeps them (what `trace` shows).
fn attempts_json(o: &Outcome) -> JsonText {
    let attempts: Vec<AttemptTrace> = o.attempts.iter().map(AttemptTrace::from_record).collect();
    JsonText(
        serde_json::to_vec(&attempts)
            .expect("attempts serialise")
            .into(),
    )
}

/// The claims to finish, as columns for `unnest`.
#[derive(Default)]
struct ClaimColumns<'a> {
    events: Vec<&'a str>,
    devices: Vec<i64>,
    results: Vec<Option<&'a JsonText>>,
    attempts: Vec<Option<JsonText>>,
}

impl<'a> ClaimColumns<'a> {
    fn push(
        &mut self,
        event: &'a str,
        device: i64,
        result: Option<&'a JsonText>,
        attempts: Option<JsonText>,
    ) {
        self.events.push(event);
        self.devices.push(device);
        self.results.push(result);
        self.attempts.push(attempts);
    }
}

impl Store {
    /// After an event's results were confirmed by the broker: records the
    /// outcomes of its pushes and marks their claims published, and, for a ring,
    /// settles its call; batched with concurrent events.
    pub async fn finish_event(&self, finished: Finished) -> Result<(), StoreError> {
        if let Some(ext) = &self.external {
            for o in finished.outcomes.iter().filter(|o| o.device_id < 0) {
                if let Some(env) = o.success {
                    ext.record_success(&self.pool, o.device_id, env).await?;
                }
            }
        }
        super::batcher(
            "finish_event",
            &self.batches.finish_event,
            super::Turns::Ring,
            super::LINGERING,
            &self.batches,
            finish_events,
        )
        .call(finished)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each form numbers exactly the parameters `finish_events` passes it
    /// (claims, then successes, then settles), and only a form that settles
    /// locks calls, before the claims.
    #[test]
    fn each_form_takes_the_parameters_it_is_given() {
        for (i, sql) in FORMS.iter().enumerate() {
            let (successes, settles) = (i & 1 == 1, i & 2 == 2);
            let want = 4 + 2 * usize::from(successes) + 2 * usize::from(settles);
            let highest = (1..=10).filter(|n| sql.contains(&format!("${n}"))).max();
            assert_eq!(highest, Some(want), "form {i}: {sql}");
            assert_eq!(sql.contains("UPDATE devices"), successes, "form {i}");
            assert_eq!(sql.contains("UPDATE calls"), settles, "form {i}");
            assert_eq!(sql.contains("FROM settled) >= 0"), settles, "form {i}");
        }
    }
}
