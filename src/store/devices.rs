//! Devices: tokens checked and stored, a user's live devices, and what APNs
//! teaches about them (success, invalidation).

use deadpool_postgres::Pool;

use super::{batcher, Store, StoreError, Turns, PROMPT};
use crate::event::Environment;

/// Tokens are hex of opaque bytes; Apple's are 32 bytes today, but the length is
/// not promised, so any even length up to 200 digits is accepted.
pub const MAX_TOKEN_HEX: usize = 200;

/// Lower-cases and checks a device token: hex only, an even number of digits.
pub fn normalize_token(token: &str) -> Result<String, StoreError> {
    let t = token.trim().to_ascii_lowercase();
    if t.is_empty() {
        return Err(StoreError::BadToken("empty"));
    }
    if t.len() > MAX_TOKEN_HEX {
        return Err(StoreError::BadToken("longer than 200 hex digits"));
    }
    if !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StoreError::BadToken("not hexadecimal"));
    }
    if t.len() % 2 != 0 {
        return Err(StoreError::BadToken("odd number of hex digits"));
    }
    Ok(t)
}

/// What a registration did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub id: i64,
    /// The user the token belonged to, when this registration moved it.
    pub moved_from: Option<String>,
}

/// A live device of a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub id: i64,
    pub token: String,
    /// `None` while unknown.
    pub environment: Option<Environment>,
    /// Last registration, ms since epoch (compared with APNs' 410 timestamp).
    pub updated_at_ms: i64,
    /// APNs has accepted a push to this token before.
    pub proven: bool,
    /// …within the last 50 minutes ([`SUCCESS_IS_RECENT`]). With `environment`
    /// the one now accepting it, another success would change nothing the
    /// finishing statement writes.
    pub success_is_recent: bool,
}

/// A device's last success is rewritten when it is older than this
/// (`outcomes::finish_statement`: it says the token still works)…
pub(super) const SUCCESS_REFRESH: &str = "interval '1 hour'";
/// …so a success within 50 minutes of the row `d` (less, for the time a ring
/// takes) is not sent to be recorded at all: most pushes go to such devices.
pub(super) const SUCCESS_IS_RECENT: &str =
    "COALESCE(d.last_success_at > now() - interval '50 minutes', false)";

impl Store {
    /// Forgets a token (every app): `DELETE /v1/devices/{token}`.
    pub async fn unregister_token(&self, token: &str) -> Result<u64, StoreError> {
        let token = normalize_token(token)?;
        let client = self.pool.get().await?;
        Ok(client
            .execute("DELETE FROM devices WHERE voip_token = $1", &[&token])
            .await?)
    }

    /// Registers or refreshes a token: re-registration clears any invalidation and
    /// moves the token to `user_id` (recording whom it moved from, and when).
    /// `environment` `None` keeps what was known.
    pub async fn register_device(
        &self,
        user_id: &str,
        bundle_id: &str,
        token: &str,
        environment: Option<Environment>,
    ) -> Result<Registration, StoreError> {
        let token = normalize_token(token)?;
        let client = self.pool.get().await?;
        let env = environment.map(Environment::as_str);
        // `moved_at = now()` only when this statement moved it: `now()` is the
        // transaction's start, and any earlier move committed before it.
        let row = client
            .query_one(
                "INSERT INTO devices (user_id, bundle_id, voip_token, environment)
                 VALUES ($1, $2, $3, COALESCE($4, 'unknown'))
                 ON CONFLICT (bundle_id, voip_token) DO UPDATE SET
                     user_id = EXCLUDED.user_id,
                     previous_user_id = CASE WHEN devices.user_id <> EXCLUDED.user_id
                         THEN devices.user_id ELSE devices.previous_user_id END,
                     moved_at = CASE WHEN devices.user_id <> EXCLUDED.user_id
                         THEN now() ELSE devices.moved_at END,
                     environment = COALESCE($4, devices.environment),
                     updated_at = now(),
                     invalidated_at = NULL,
                     invalid_reason = NULL
                 RETURNING id, CASE WHEN moved_at = now() THEN previous_user_id END",
                &[&user_id, &bundle_id, &token, &env],
            )
            .await?;
        Ok(Registration {
            id: row.get(0),
            moved_from: row.get(1),
        })
    }

    /// Stores the app's alert token beside device `device_id`'s VoIP token (it
    /// replaces the one before: a reinstall changes both).
    pub async fn set_alert_token(
        &self,
        device_id: i64,
        alert_token: &str,
    ) -> Result<(), StoreError> {
        let token = normalize_token(alert_token)?;
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE devices SET alert_token = $2 WHERE id = $1",
                &[&device_id, &token],
            )
            .await?;
        Ok(())
    }

    /// Forgets device `device_id`'s alert token after APNs refused it; its VoIP
    /// token is untouched (a refusal of one says nothing of the other).
    pub async fn clear_alert_token(
        &self,
        device_id: i64,
        alert_token: &str,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE devices SET alert_token = NULL WHERE id = $1 AND alert_token = $2",
                &[&device_id, &alert_token],
            )
            .await?;
        Ok(())
    }

    /// A user's live (not invalidated) devices for one app, oldest first.
    pub async fn live_devices(
        &self,
        user_id: &str,
        bundle_id: &str,
    ) -> Result<Vec<Device>, StoreError> {
        if let Some(ext) = &self.external {
            return ext.live_devices(&self.pool, user_id, bundle_id).await;
        }
        batcher(
            "live_devices",
            &self.batches.live_devices,
            Turns::Own,
            PROMPT,
            &self.batches,
            live_devices_of,
        )
        .call((user_id.to_string(), bundle_id.to_string()))
        .await
    }

    /// Records a success and the environment that accepted the token, so the next
    /// call goes straight there. (The pipeline records them with each push's
    /// outcome; this is for tools and tests.)
    pub async fn record_success(
        &self,
        device_id: i64,
        environment: Environment,
    ) -> Result<(), StoreError> {
        if let (Some(ext), true) = (&self.external, device_id < 0) {
            return ext.record_success(&self.pool, device_id, environment).await;
        }
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE devices SET last_success_at = now(), environment = $2 WHERE id = $1",
                &[&device_id, &environment.as_str()],
            )
            .await?;
        Ok(())
    }

    /// Marks a token invalid. With `unless_registered_after_ms` (APNs' 410
    /// timestamp), a token re-registered after that moment stays live. Returns
    /// whether the token was invalidated.
    pub async fn invalidate(
        &self,
        device_id: i64,
        reason: &str,
        unless_registered_after_ms: Option<i64>,
    ) -> Result<bool, StoreError> {
        if let (Some(ext), true) = (&self.external, device_id < 0) {
            return ext.invalidate(&self.pool, device_id, reason).await;
        }
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE devices SET invalidated_at = now(), invalid_reason = $2
                 WHERE id = $1 AND invalidated_at IS NULL
                   AND ($3::bigint IS NULL OR updated_at <= to_timestamp($3::bigint / 1000.0))",
                &[&device_id, &reason, &unless_registered_after_ms],
            )
            .await?;
        Ok(n == 1)
    }
}
/// A user's live devices for one app (see `live_devices_of`).
static LIVE_DEVICES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT id, voip_token, environment, (extract(epoch FROM updated_at) * 1000)::bigint,
                last_success_at IS NOT NULL, user_id, bundle_id,
                {SUCCESS_IS_RECENT}
         FROM devices d
         WHERE user_id = ANY($1) AND bundle_id = ANY($2) AND invalidated_at IS NULL
         ORDER BY id"
    )
});

/// The live devices of many (user, bundle) pairs in one statement.
async fn live_devices_of(
    pool: Pool,
    keys: super::batch::Requests<(String, String)>,
) -> Result<Vec<Vec<Device>>, StoreError> {
    let mut users: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let mut bundles: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    for v in [&mut users, &mut bundles] {
        v.sort_unstable();
        v.dedup();
    }
    let client = pool.get().await?;
    // `= ANY` on both columns keeps to the (user_id, bundle_id) index; pairs
    // nobody asked for (another user's app) are dropped below.
    let stmt = client.prepare_cached(&LIVE_DEVICES).await?;
    let rows = client.query(&stmt, &[&users, &bundles]).await?;
    let mut found: std::collections::HashMap<(&str, &str), Vec<Device>> =
        std::collections::HashMap::new();
    for r in &rows {
        found.entry((r.get(5), r.get(6))).or_default().push(Device {
            id: r.get(0),
            token: r.get(1),
            environment: Environment::parse(r.get::<_, &str>(2)),
            updated_at_ms: r.get(3),
            proven: r.get(4),
            success_is_recent: r.get(7),
        });
    }
    Ok(keys
        .iter()
        .map(|(u, b)| {
            found
                .get(&(u.as_str(), b.as_str()))
                .cloned()
                .unwrap_or_default()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_normalised_and_checked() {
        assert_eq!(normalize_token(" ABCDEF01 ").unwrap(), "abcdef01");
        assert!(normalize_token("").is_err());
        assert!(normalize_token("abc").is_err());
        assert!(normalize_token("zz").is_err());
        assert!(normalize_token(&"a".repeat(202)).is_err());
        assert!(normalize_token(&"a".repeat(200)).is_ok());
    }
}
