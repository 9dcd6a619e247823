//! Device tokens kept in a team's own tables (`store.token_query`), so adopting the
//! worker needs no migration of `users.voip_device_token` or similar.
//!
//! Such rows have no id of ours, yet delivery claims and results need a stable
//! device id: it is synthesised from a hash of (bundle id, token) and is always
//! negative, so it never collides with our `devices.id` (a positive bigserial) and
//! is the same on every replica. Our `devices` table still remembers what we learn
//! about those tokens (the environment that accepted them, and, without
//! `store.invalidate_query`, their invalidation).

use std::collections::HashMap;
use std::sync::Mutex;

use deadpool_postgres::Pool;
use tokio_postgres::types::{ToSql, Type};
use tracing::warn;

use super::{normalize_token, Device, StoreError};
use crate::config::StoreConfig;
use crate::event::{token_suffix, Environment};

/// Tokens seen by `live_devices`, so that `record_success`/`invalidate` (which get
/// only the device id) can find them again. Cleared when it grows past this: the
/// pipeline always resolves devices just before it records their outcome.
const MAX_REMEMBERED: usize = 50_000;

#[derive(Clone, Debug)]
struct Known {
    user_id: String,
    bundle_id: String,
    /// Lower-cased, checked.
    token: String,
    /// As stored in the team's table (given to `invalidate_query`).
    raw_token: String,
}

pub struct ExternalTokens {
    token_query: String,
    invalidate_query: Option<String>,
    known: Mutex<HashMap<i64, Known>>,
}

/// The device id of a token from the team's table: negative, stable, from
/// SHA-256 of bundle id and token.
pub fn synthetic_id(bundle_id: &str, token: &str) -> i64 {
    let mut input = Vec::with_capacity(bundle_id.len() + token.len() + 1);
    input.extend_from_slice(bundle_id.as_bytes());
    input.push(0);
    input.extend_from_slice(token.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    // 62 bits keep the negation far from i64::MIN; -1 - n is never 0 or positive.
    -1 - (u64::from_be_bytes(first) >> 2) as i64
}

impl ExternalTokens {
    /// `None` unless a token query is configured.
    pub fn from_config(cfg: &StoreConfig) -> Option<Self> {
        let set = |q: &Option<String>| q.as_ref().filter(|q| !q.trim().is_empty()).cloned();
        Some(Self {
            token_query: set(&cfg.token_query)?,
            invalidate_query: set(&cfg.invalidate_query),
            known: Mutex::new(HashMap::new()),
        })
    }

    pub async fn live_devices(
        &self,
        pool: &Pool,
        user_id: &str,
        bundle_id: &str,
    ) -> Result<Vec<Device>, StoreError> {
        let client = pool.get().await?;
        let stmt = client.prepare_cached(&self.token_query).await?;
        // `$1` is the user id as text, unless the query compares it with an integer
        // column: then a user id that is not a number has no tokens.
        let rows = match stmt.params().first() {
            Some(&Type::INT8) => match user_id.parse::<i64>() {
                Ok(id) => client.query(&stmt, &[&id]).await?,
                Err(_) => Vec::new(),
            },
            Some(&Type::INT4) => match user_id.parse::<i32>() {
                Ok(id) => client.query(&stmt, &[&id]).await?,
                Err(_) => Vec::new(),
            },
            Some(_) => client.query(&stmt, &[&user_id]).await?,
            None => client.query(&stmt, &[]).await?,
        };
        let has = |name: &str| stmt.columns().iter().any(|c| c.name() == name);
        let (has_env, has_bundle) = (has("environment"), has("bundle_id"));

        let mut found: Vec<(Known, Option<Environment>)> = Vec::new();
        for row in &rows {
            let Some(raw) = row.try_get::<_, Option<String>>("token")? else {
                continue;
            };
            if raw.trim().is_empty() {
                continue;
            }
            if has_bundle {
                let row_bundle: Option<String> = row.try_get("bundle_id")?;
                if row_bundle.is_some_and(|b| !b.is_empty() && b != bundle_id) {
                    continue;
                }
            }
            let Ok(token) = normalize_token(&raw) else {
                warn!(token_suffix = %token_suffix(raw.trim()), "token_query returned a token that is not hex; skipped");
                continue;
            };
            let env = if has_env {
                row.try_get::<_, Option<String>>("environment")?
                    .as_deref()
                    .and_then(Environment::parse)
            } else {
                None
            };
            if found.iter().any(|(k, _)| k.token == token) {
                continue;
            }
            found.push((
                Known {
                    user_id: user_id.to_string(),
                    bundle_id: bundle_id.to_string(),
                    token,
                    raw_token: raw,
                },
                env,
            ));
        }
        if found.is_empty() {
            return Ok(Vec::new());
        }

        // What we learned about these tokens earlier: environment, invalidation.
        let tokens: Vec<&str> = found.iter().map(|(k, _)| k.token.as_str()).collect();
        let learned = client
            .query(
                "SELECT voip_token, environment, invalidated_at IS NOT NULL
                 FROM devices WHERE bundle_id = $1 AND voip_token = ANY($2)",
                &[&bundle_id, &tokens],
            )
            .await?;
        let learned: HashMap<String, (Option<Environment>, bool)> = learned
            .iter()
            .map(|r| {
                let env = Environment::parse(r.get::<_, &str>(1));
                (r.get::<_, String>(0), (env, r.get::<_, bool>(2)))
            })
            .collect();

        let mut known = self.known.lock().expect("known tokens lock");
        if known.len() > MAX_REMEMBERED {
            known.clear();
        }
        let mut devices = Vec::new();
        for (k, env) in found {
            let (learned_env, invalidated) = learned.get(&k.token).cloned().unwrap_or_default();
            if invalidated {
                continue;
            }
            let id = synthetic_id(bundle_id, &k.token);
            devices.push(Device {
                id,
                token: k.token.clone(),
                environment: env.or(learned_env),
                // Unknown: the team's table does not say when it was registered.
                updated_at_ms: 0,
                // An environment learned from a success proves the token.
                proven: learned_env.is_some(),
                // Its successes are recorded apart (`record_success`).
                success_is_recent: false,
            });
            known.insert(id, k);
        }
        Ok(devices)
    }

    fn known(&self, device_id: i64) -> Option<Known> {
        let known = self.known.lock().expect("known tokens lock");
        known.get(&device_id).cloned()
    }

    /// Remembers the environment that accepted the token.
    pub async fn record_success(
        &self,
        pool: &Pool,
        device_id: i64,
        environment: Environment,
    ) -> Result<(), StoreError> {
        let Some(k) = self.known(device_id) else {
            return Ok(());
        };
        let client = pool.get().await?;
        client
            .execute(
                "INSERT INTO devices (user_id, bundle_id, voip_token, environment, last_success_at)
                 VALUES ($1, $2, $3, $4, now())
                 ON CONFLICT (bundle_id, voip_token) DO UPDATE SET
                     environment = EXCLUDED.environment, last_success_at = now()",
                &[&k.user_id, &k.bundle_id, &k.token, &environment.as_str()],
            )
            .await?;
        Ok(())
    }

    /// Runs `invalidate_query`, or records the invalidation in our table (which
    /// `live_devices` then honours).
    pub async fn invalidate(
        &self,
        pool: &Pool,
        device_id: i64,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let Some(k) = self.known(device_id) else {
            warn!(device_id, "token to invalidate is no longer known; skipped");
            return Ok(false);
        };
        let client = pool.get().await?;
        if let Some(q) = &self.invalidate_query {
            // The query may use only `$1`: pass as many parameters as it declares.
            let stmt = client.prepare_cached(q).await?;
            let params: [&(dyn ToSql + Sync); 2] = [&k.raw_token, &reason];
            let n = stmt.params().len().min(2);
            client.execute(&stmt, &params[..n]).await?;
        } else {
            client
                .execute(
                    "INSERT INTO devices (user_id, bundle_id, voip_token, invalidated_at, invalid_reason)
                     VALUES ($1, $2, $3, now(), $4)
                     ON CONFLICT (bundle_id, voip_token) DO UPDATE SET
                         invalidated_at = now(), invalid_reason = EXCLUDED.invalid_reason",
                    &[&k.user_id, &k.bundle_id, &k.token, &reason],
                )
                .await?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_ids_are_negative_stable_and_distinct() {
        let a = synthetic_id("com.example.chat", "abcd");
        assert!(a < 0);
        assert_eq!(a, synthetic_id("com.example.chat", "abcd"));
        assert_ne!(a, synthetic_id("com.example.work", "abcd"));
        assert_ne!(a, synthetic_id("com.example.chat", "abce"));
    }
}
