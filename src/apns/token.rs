//! Provider tokens: ES256 JWTs signed with a team's `.p8` key.
//!
//! APNs refuses a token older than an hour (`ExpiredProviderToken`) and one that
//! changes more often than every 20 minutes (`TooManyProviderTokenUpdates`), so one
//! token per key is minted and shared by every connection until it is 50 minutes
//! old: ten minutes of margin on each side.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;

use crate::metrics::Metrics;

/// Refresh age: Apple allows 20–60 minutes; 50 keeps clear of both ends.
pub const REFRESH_AFTER: Duration = Duration::from_secs(50 * 60);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read signing key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "signing key {path} is not a PEM PKCS#8 private key (a .p8 file from Apple): {detail}"
    )]
    NotPem { path: String, detail: String },
    #[error("signing key {path} is not a P-256 (ES256) key: {detail}")]
    NotP256 { path: String, detail: String },
}

/// A team's signing key. `Debug` shows ids only, never key material.
pub struct SigningKey {
    team_id: String,
    key_id: String,
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("team_id", &self.team_id)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn from_p8_file(path: &Path, team_id: &str, key_id: &str) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_p8_pem(&pem, team_id, key_id).map_err(|e| match e {
            KeyError::NotPem { detail, .. } => KeyError::NotPem {
                path: shown.clone(),
                detail,
            },
            KeyError::NotP256 { detail, .. } => KeyError::NotP256 {
                path: shown.clone(),
                detail,
            },
            other => other,
        })
    }

    pub fn from_p8_pem(pem: &[u8], team_id: &str, key_id: &str) -> Result<Self, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| KeyError::NotPem {
            path: "<memory>".into(),
            detail: e.to_string(),
        })?;
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            der.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| KeyError::NotP256 {
            path: "<memory>".into(),
            detail: e.to_string(),
        })?;
        Ok(Self {
            team_id: team_id.to_string(),
            key_id: key_id.to_string(),
            pair,
            rng,
        })
    }

    pub fn team_id(&self) -> &str {
        &self.team_id
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public half as an uncompressed SEC1 point, what a verifier needs.
    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// Signs a provider token issued at `iat` (UNIX seconds).
    pub fn sign(&self, iat: u64) -> String {
        let header =
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"ES256","kid":"{}"}}"#, self.key_id));
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"iss":"{}","iat":{iat}}}"#, self.team_id));
        let signing_input = format!("{header}.{claims}");
        let sig = self
            .pair
            .sign(&self.rng, signing_input.as_bytes())
            .expect("ECDSA signing with a valid key does not fail");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

/// Generates a fresh P-256 key as `.p8` PEM text, the format Apple hands out (demo,
/// tests and the simulator's laptop mode use it).
pub fn generate_p8_pem() -> String {
    let rng = SystemRandom::new();
    let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .expect("key generation");
    let body = STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    pem
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The shared, cached provider token of one key. A certificate app has none:
/// it authenticates in the TLS handshake, and its token is empty (the request
/// then carries no `authorization` header).
pub struct ProviderToken {
    key: Option<SigningKey>,
    cached: Mutex<Option<(Arc<str>, u64)>>,
    metrics: Metrics,
}

impl ProviderToken {
    pub fn new(key: SigningKey, metrics: Metrics) -> Self {
        Self {
            key: Some(key),
            cached: Mutex::new(None),
            metrics,
        }
    }

    /// The "token" of a certificate app: always empty, never minted.
    pub fn none(metrics: Metrics) -> Self {
        Self {
            key: None,
            cached: Mutex::new(None),
            metrics,
        }
    }

    pub fn key(&self) -> Option<&SigningKey> {
        self.key.as_ref()
    }

    /// The current token, minted only when none exists or it reached [`REFRESH_AFTER`].
    pub fn current(&self) -> Arc<str> {
        let Some(key) = &self.key else {
            return Arc::from("");
        };
        let now = unix_now();
        let mut cached = self.cached.lock().expect("token cache lock");
        if let Some((token, iat)) = cached.as_ref() {
            if now.saturating_sub(*iat) < REFRESH_AFTER.as_secs() {
                return token.clone();
            }
        }
        let token: Arc<str> = key.sign(now).into();
        self.metrics.provider_tokens_signed.inc();
        *cached = Some((token.clone(), now));
        token
    }

    /// Drops `stale` if it is still the cached token (APNs said it expired), so the
    /// next [`ProviderToken::current`] mints a new one. A token another request
    /// already replaced is left alone: one refresh, however many requests saw it fail.
    pub fn refresh_if_current(&self, stale: &str) {
        let mut cached = self.cached.lock().expect("token cache lock");
        if cached.as_ref().is_some_and(|(t, _)| &**t == stale) {
            *cached = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    #[test]
    fn signed_token_verifies_and_carries_kid_and_iss() {
        let key = SigningKey::from_p8_pem(generate_p8_pem().as_bytes(), "TEAM123456", "KEY1234567")
            .unwrap();
        let jwt = key.sign(1_700_000_000);
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            header,
            serde_json::json!({"alg":"ES256","kid":"KEY1234567"})
        );
        assert_eq!(
            claims,
            serde_json::json!({"iss":"TEAM123456","iat":1_700_000_000})
        );
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        assert_eq!(sig.len(), 64, "JWT ES256 signatures are raw r||s");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_key())
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
    }

    #[test]
    fn token_is_cached_and_refreshed_once_after_rejection() {
        let metrics = Metrics::new();
        let key = SigningKey::from_p8_pem(generate_p8_pem().as_bytes(), "T", "K").unwrap();
        let tokens = ProviderToken::new(key, metrics.clone());
        let a = tokens.current();
        for _ in 0..100 {
            assert_eq!(tokens.current(), a);
        }
        assert_eq!(metrics.provider_tokens_signed.get(), 1);
        tokens.refresh_if_current(&a);
        let b = tokens.current();
        tokens.refresh_if_current(&a); // a late report about the old token changes nothing
        assert_eq!(tokens.current(), b);
        assert_eq!(metrics.provider_tokens_signed.get(), 2);
    }

    #[test]
    fn a_certificate_app_has_an_empty_token_and_signs_nothing() {
        let metrics = Metrics::new();
        let tokens = ProviderToken::none(metrics.clone());
        assert_eq!(&*tokens.current(), "");
        tokens.refresh_if_current("");
        assert_eq!(&*tokens.current(), "");
        assert_eq!(metrics.provider_tokens_signed.get(), 0);
    }

    #[test]
    fn garbage_key_is_a_clear_error() {
        let err = SigningKey::from_p8_pem(b"not a key", "T", "K").unwrap_err();
        assert!(err.to_string().contains("PKCS#8"), "{err}");
    }
}
