//! Twilio Voice access tokens (`POST /twilio/token`), for backends whose app calls
//! through Twilio: an HS256 JWT signed with the API key secret, carrying the
//! identity and a Voice grant (incoming allowed, the TwiML app for outgoing, and
//! the push credential Twilio uses to ring the app through APNs).

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};
use tracing::info;

use super::auth::Caller;
use super::devices::register_from_twilio;
use super::{json_object, jwt, text_field, ApiError, ApiResult, ApiState};
use crate::config::TwilioConfig;

/// Twilio refuses identities longer than this.
const MAX_IDENTITY_CHARS: usize = 121;

pub struct TwilioSigner {
    account_sid: String,
    api_key_sid: String,
    api_key_secret: String,
    twiml_app_sid: String,
    push_credential_sid: String,
    ttl_secs: u64,
}

fn fields(cfg: &TwilioConfig) -> [&Option<String>; 5] {
    [
        &cfg.account_sid,
        &cfg.api_key_sid,
        &cfg.api_key_secret,
        &cfg.twiml_app_sid,
        &cfg.push_credential_sid,
    ]
}

fn value(v: &Option<String>) -> Option<String> {
    v.as_ref().filter(|s| !s.trim().is_empty()).cloned()
}

/// Some but not all settings: worth a warning at start.
pub fn partly_configured(cfg: &TwilioConfig) -> bool {
    fields(cfg).iter().any(|v| value(v).is_some())
}

impl TwilioSigner {
    /// `None` unless every setting is present.
    pub fn from_config(cfg: &TwilioConfig) -> Option<Self> {
        Some(Self {
            account_sid: value(&cfg.account_sid)?,
            api_key_sid: value(&cfg.api_key_sid)?,
            api_key_secret: value(&cfg.api_key_secret)?,
            twiml_app_sid: value(&cfg.twiml_app_sid)?,
            push_credential_sid: value(&cfg.push_credential_sid)?,
            ttl_secs: cfg.token_ttl_secs,
        })
    }

    /// An access token for `identity`, issued at `now` (unix seconds).
    pub fn token(&self, identity: &str, now: u64) -> String {
        let header = json!({"typ": "JWT", "alg": "HS256", "cty": "twilio-fpa;v=1"});
        let claims = json!({
            "jti": format!("{}-{now}", self.api_key_sid),
            "iss": self.api_key_sid,
            "sub": self.account_sid,
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl_secs,
            "grants": {
                "identity": identity,
                "voice": {
                    "incoming": {"allow": true},
                    "outgoing": {"application_sid": self.twiml_app_sid},
                    "push_credential_sid": self.push_credential_sid,
                },
            },
        });
        jwt::sign_hs256(&header, &claims, self.api_key_secret.as_bytes())
    }
}

/// `POST /twilio/token` (user JWT with `sub` = identity, or service):
/// `{"identity","platform"?,"deviceToken"?}` → `200 {"token"}`; an iOS device
/// token in the request is registered for the identity.
pub async fn post_token(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Some(signer) = s.twilio.clone() else {
        return Err(ApiError::group_off("every twilio.* setting"));
    };
    let caller = s.auth.caller(&headers)?;
    let obj = json_object(body)?;
    let identity = text_field(&obj, &["identity"])?
        .ok_or_else(|| ApiError::bad_request("missing_field", "identity is required"))?;
    if identity.chars().count() > MAX_IDENTITY_CHARS {
        return Err(ApiError::bad_request(
            "bad_field",
            format!("identity is longer than {MAX_IDENTITY_CHARS} characters"),
        ));
    }
    if let Caller::User(sub) = &caller {
        if *sub != identity {
            return Err(ApiError::forbidden(
                "the bearer token belongs to another user",
            ));
        }
    }
    register_from_twilio(&s, &identity, &obj).await?;
    let token = signer.token(&identity, crate::apns::token::unix_now());
    info!(%identity, "Twilio access token issued");
    Ok((StatusCode::OK, Json(json!({"token": Value::from(token)}))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TwilioConfig {
        TwilioConfig {
            account_sid: Some("ACxx".into()),
            api_key_sid: Some("SKxx".into()),
            api_key_secret: Some("secret".into()),
            twiml_app_sid: Some("APxx".into()),
            push_credential_sid: Some("CRxx".into()),
            token_ttl_secs: 3600,
        }
    }

    #[test]
    fn off_unless_every_setting_is_present() {
        assert!(TwilioSigner::from_config(&cfg()).is_some());
        let mut partial = cfg();
        partial.twiml_app_sid = None;
        assert!(TwilioSigner::from_config(&partial).is_none());
        assert!(partly_configured(&partial));
        assert!(!partly_configured(&TwilioConfig::default()));
    }

    #[test]
    fn token_carries_the_grants_and_verifies_with_the_secret() {
        let signer = TwilioSigner::from_config(&cfg()).unwrap();
        let token = signer.token("alice", 1_800_000_000);
        let claims = jwt::Verifier::hs256(b"secret")
            .verify(&token, 1_800_000_000)
            .unwrap();
        assert_eq!(claims["jti"], "SKxx-1800000000");
        assert_eq!(claims["iss"], "SKxx");
        assert_eq!(claims["sub"], "ACxx");
        assert_eq!(claims["exp"], 1_800_003_600u64);
        assert_eq!(claims["grants"]["identity"], "alice");
        assert_eq!(claims["grants"]["voice"]["push_credential_sid"], "CRxx");
        assert_eq!(
            claims["grants"]["voice"]["outgoing"]["application_sid"],
            "APxx"
        );
        assert_eq!(claims["grants"]["voice"]["incoming"]["allow"], true);
    }
}
