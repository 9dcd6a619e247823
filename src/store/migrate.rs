//! The migrations runner: numbered SQL files from `migrations/`, compiled into the
//! binary, applied in order under an advisory lock so replicas starting together
//! do not race.

use tokio_postgres::Client;

use super::StoreError;

/// (version, name, SQL). Append only: an applied migration is never edited.
#[rustfmt::skip]
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "devices", include_str!("../../migrations/0001_devices.sql")),
    (2, "delivery_claims", include_str!("../../migrations/0002_delivery_claims.sql")),
    (3, "calls", include_str!("../../migrations/0003_calls.sql")),
    (4, "claim_worker", include_str!("../../migrations/0004_claim_worker.sql")),
    (5, "claims_hot_updates", include_str!("../../migrations/0005_claims_hot_updates.sql")),
    (6, "claims_event_type", include_str!("../../migrations/0006_claims_event_type.sql")),
    (7, "device_moves", include_str!("../../migrations/0007_device_moves.sql")),
    (8, "hot_updates_fillfactor", include_str!("../../migrations/0008_hot_updates_fillfactor.sql")),
    (9, "time_indexes_brin", include_str!("../../migrations/0009_time_indexes_brin.sql")),
    (10, "claim_attempts", include_str!("../../migrations/0010_claim_attempts.sql")),
    (11, "alert_tokens", include_str!("../../migrations/0011_alert_tokens.sql")),
    (12, "claims_json_documents", include_str!("../../migrations/0012_claims_json_documents.sql")),
];

/// Arbitrary but fixed: the key of the advisory lock migrations hold.
const MIGRATION_LOCK_KEY: i64 = 0x766f_6970_7075_7368; // "voippush"

/// Applies every migration not yet recorded; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut now_applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|e| StoreError::Migration {
                version: *version,
                name,
                source: e,
            })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        now_applied.push(*version);
    }
    tx.commit().await?;
    Ok(now_applied)
}

/// The migrations the binary knows that the database has not applied.
pub async fn pending(client: &Client) -> Result<Vec<i32>, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    let applied: Vec<i32> = if exists {
        client
            .query("SELECT version FROM schema_migrations", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        Vec::new()
    };
    Ok(MIGRATIONS
        .iter()
        .map(|(v, _, _)| *v)
        .filter(|v| !applied.contains(v))
        .collect())
}
