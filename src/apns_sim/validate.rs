//! Apple's request rules (APNS.md), checked in the order APNs applies them:
//! method and path, headers, provider token, topic, then payload and token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hyper::http::request::Parts;
use hyper::Method;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

use super::SimApp;

/// VoIP payloads may be larger than others.
pub const MAX_VOIP_PAYLOAD: usize = 5120;
pub const MAX_PAYLOAD: usize = 4096;
/// Apple refuses provider tokens older than an hour.
pub const PROVIDER_TOKEN_MAX_AGE_SECS: u64 = 3600;

const PUSH_TYPES: &[&str] = &[
    "alert",
    "background",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "liveactivity",
    "location",
    "pushtotalk",
    "widgets",
];

/// A refusal: status and Apple's reason string.
pub type Refusal = (u16, &'static str);

/// The verified identity of a provider token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenIdentity {
    pub team_id: String,
    pub key_id: String,
    pub iat: u64,
}

/// Everything about a request that does not depend on the simulator's state of
/// tokens: returns the device token and the push's topic.
pub fn check_request<'a>(parts: &'a Parts, body: &[u8]) -> Result<(&'a str, &'a str), Refusal> {
    if parts.method != Method::POST {
        return Err((405, "MethodNotAllowed"));
    }
    let token = parts
        .uri
        .path()
        .strip_prefix("/3/device/")
        .ok_or((404, "BadPath"))?;
    if token.is_empty() {
        return Err((400, "MissingDeviceToken"));
    }
    if token.contains('/') {
        return Err((404, "BadPath"));
    }
    for name in [
        "authorization",
        "apns-push-type",
        "apns-topic",
        "apns-priority",
        "apns-expiration",
        "apns-collapse-id",
        "apns-id",
    ] {
        if parts.headers.get_all(name).iter().count() > 1 {
            return Err((400, "DuplicateHeaders"));
        }
    }
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(id) = header("apns-id") {
        let canonical = uuid::Uuid::parse_str(id)
            .map(|u| u.hyphenated().to_string() == id)
            .unwrap_or(false);
        if !canonical {
            return Err((400, "BadMessageId"));
        }
    }
    let push_type = header("apns-push-type").unwrap_or("");
    if !PUSH_TYPES.contains(&push_type) {
        return Err((400, "InvalidPushType"));
    }
    let topic = header("apns-topic").ok_or((400, "MissingTopic"))?;
    if topic.is_empty() {
        return Err((400, "MissingTopic"));
    }
    // APNs answers a VoIP push to the app's plain topic as it answers a token of
    // another app: the token is not for that topic.
    if push_type == "voip" && !topic.ends_with(".voip") {
        return Err((400, "DeviceTokenNotForTopic"));
    }
    if let Some(p) = header("apns-priority") {
        if !matches!(p, "10" | "5" | "1") {
            return Err((400, "BadPriority"));
        }
    }
    if let Some(e) = header("apns-expiration") {
        if e.parse::<u64>().is_err() {
            return Err((400, "BadExpirationDate"));
        }
    }
    if let Some(c) = header("apns-collapse-id") {
        if c.len() > 64 {
            return Err((400, "BadCollapseId"));
        }
    }
    if body.is_empty() {
        return Err((400, "PayloadEmpty"));
    }
    let limit = if push_type == "voip" {
        MAX_VOIP_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    if body.len() > limit {
        return Err((413, "PayloadTooLarge"));
    }
    Ok((token, topic))
}

/// The provider token of `authorization: bearer <JWT>`.
pub fn bearer(parts: &Parts) -> Result<&str, Refusal> {
    let Some(value) = parts.headers.get("authorization") else {
        return Err((403, "MissingProviderToken"));
    };
    let value = value.to_str().map_err(|_| INVALID_TOKEN)?;
    value
        .strip_prefix("bearer ")
        .or_else(|| value.strip_prefix("Bearer "))
        .ok_or(INVALID_TOKEN)
}

const INVALID_TOKEN: Refusal = (403, "InvalidProviderToken");

/// Verifies an ES256 provider token's signature against the known apps' keys:
/// who signed it, and when. Its age is [`check_token_age`]'s, against a clock
/// that moves on while the verified identity may be reused.
pub fn verify_provider_token(jwt: &str, apps: &[SimApp]) -> Result<TokenIdentity, Refusal> {
    let invalid = INVALID_TOKEN;
    let mut parts_iter = jwt.split('.');
    let (Some(h), Some(c), Some(s), None) = (
        parts_iter.next(),
        parts_iter.next(),
        parts_iter.next(),
        parts_iter.next(),
    ) else {
        return Err(invalid);
    };
    let decode = |p: &str| -> Result<serde_json::Value, Refusal> {
        let bytes = URL_SAFE_NO_PAD.decode(p).map_err(|_| invalid)?;
        serde_json::from_slice(&bytes).map_err(|_| invalid)
    };
    let header = decode(h)?;
    let claims = decode(c)?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("ES256") {
        return Err(invalid);
    }
    let kid = header.get("kid").and_then(|k| k.as_str()).ok_or(invalid)?;
    let iss = claims.get("iss").and_then(|k| k.as_str()).ok_or(invalid)?;
    let iat = claims.get("iat").and_then(|k| k.as_u64()).ok_or(invalid)?;
    let app = apps
        .iter()
        .find(|a| a.team_id == iss && a.key_id == kid)
        .ok_or(invalid)?;
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| invalid)?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &app.public_key)
        .verify(format!("{h}.{c}").as_bytes(), &sig)
        .map_err(|_| invalid)?;
    Ok(TokenIdentity {
        team_id: iss.to_string(),
        key_id: kid.to_string(),
        iat,
    })
}

/// A verified token issued in the future (beyond clock skew) is as invalid as a
/// forged one; one older than an hour has expired.
pub fn check_token_age(identity: &TokenIdentity, now: u64) -> Result<(), Refusal> {
    if identity.iat > now + 60 {
        return Err(INVALID_TOKEN);
    }
    if now.saturating_sub(identity.iat) > PROVIDER_TOKEN_MAX_AGE_SECS {
        return Err((403, "ExpiredProviderToken"));
    }
    Ok(())
}

/// The topic must be `<bundle>.voip` (or the bundle itself for other push types)
/// of an app of the token's team.
pub fn check_topic(
    topic: &str,
    identity: &TokenIdentity,
    apps: &[SimApp],
) -> Result<String, Refusal> {
    let bundle = topic.strip_suffix(".voip").unwrap_or(topic);
    apps.iter()
        .find(|a| a.team_id == identity.team_id && a.bundle_id == bundle)
        .map(|a| a.bundle_id.clone())
        .ok_or((400, "TopicDisallowed"))
}
