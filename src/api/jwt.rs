//! Just enough JWT (RFC 7519) for our two uses, on `ring` like the provider tokens:
//! verifying app users' bearer tokens (HS256, or RS256/ES256 with a PEM public key)
//! and signing Twilio access tokens (HS256).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::{hmac, signature};
use serde_json::{Map, Value};

/// Clock difference tolerated between the issuer and us for `exp` and `nbf`.
pub const LEEWAY_SECS: i64 = 60;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("not a JWT")]
    Malformed,
    #[error("algorithm {0:?} is not the one configured")]
    WrongAlgorithm(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    /// A token without `exp` would be valid for ever once leaked.
    #[error("token has no exp claim")]
    NoExpiry,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token has no subject")]
    NoSubject,
    #[error("token is not from the configured issuer")]
    WrongIssuer,
    #[error("token is not for the configured audience")]
    WrongAudience,
    /// A long-lived token is a standing credential if it leaks.
    #[error("token is good for {0} s, longer than the {1} s allowed")]
    TooLong(i64, i64),
}

/// What a user token must say besides its signature and times: the issuer
/// and audience when configured, and a bounded lifetime.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// `None`: any lifetime (the Twilio tokens we sign ourselves, tests).
    pub max_lifetime_secs: Option<i64>,
}

impl Rules {
    /// Checks `claims` at `now` (unix seconds).
    pub fn check(&self, claims: &Map<String, Value>, now: i64) -> Result<(), JwtError> {
        if let Some(iss) = &self.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(iss.as_str()) {
                return Err(JwtError::WrongIssuer);
            }
        }
        if let Some(aud) = &self.audience {
            // RFC 7519 §4.1.3: one string, or a list of them.
            let holds = match claims.get("aud") {
                Some(Value::String(a)) => a == aud,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(aud)),
                _ => false,
            };
            if !holds {
                return Err(JwtError::WrongAudience);
            }
        }
        if let Some(max) = self.max_lifetime_secs {
            let exp = time_claim(claims, "exp").ok_or(JwtError::NoExpiry)?;
            // An `iat` in the future must not stretch the window.
            let from = time_claim(claims, "iat").map_or(now, |iat| iat.min(now));
            let lifetime = exp.saturating_sub(from);
            if lifetime > max.saturating_add(LEEWAY_SECS) {
                return Err(JwtError::TooLong(lifetime, max));
            }
        }
        Ok(())
    }
}

fn time_claim(claims: &Map<String, Value>, name: &str) -> Option<i64> {
    claims.get(name).and_then(Value::as_f64).map(|t| t as i64)
}

#[derive(Debug, thiserror::Error)]
#[error("JWT public key: {0}")]
pub struct KeyError(&'static str);

/// What verifies users' tokens.
pub enum Verifier {
    Hs256(hmac::Key),
    Rs256(Vec<u8>),
    Es256(Vec<u8>),
}

impl Verifier {
    pub fn hs256(secret: &[u8]) -> Self {
        Verifier::Hs256(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// An RSA or P-256 public key, PEM: `PUBLIC KEY` (SPKI) or `RSA PUBLIC KEY`.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let (label, der) = pem_decode(pem).ok_or(KeyError("not a PEM public key"))?;
        match label.as_str() {
            "RSA PUBLIC KEY" => Ok(Verifier::Rs256(der)),
            "PUBLIC KEY" => {
                let (alg, key) = spki(&der).ok_or(KeyError("not a SubjectPublicKeyInfo"))?;
                match alg {
                    SpkiAlg::Rsa => Ok(Verifier::Rs256(key)),
                    SpkiAlg::P256 => Ok(Verifier::Es256(key)),
                }
            }
            _ => Err(KeyError("PEM label must be PUBLIC KEY or RSA PUBLIC KEY")),
        }
    }

    fn alg(&self) -> &'static str {
        match self {
            Verifier::Hs256(_) => "HS256",
            Verifier::Rs256(_) => "RS256",
            Verifier::Es256(_) => "ES256",
        }
    }

    /// Verifies signature, `exp` (required) and `nbf` (at `now`, unix seconds) and
    /// returns the claims. `alg` must be the configured one: a token never picks its verifier.
    pub fn verify(&self, jwt: &str, now: i64) -> Result<Map<String, Value>, JwtError> {
        let mut parts = jwt.trim().split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let decode = |p: &str| URL_SAFE_NO_PAD.decode(p.trim_end_matches('='));
        let header: Value = decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
        if alg != self.alg() {
            return Err(JwtError::WrongAlgorithm(alg.chars().take(16).collect()));
        }
        let sig = decode(s).map_err(|_| JwtError::Malformed)?;
        let signed = &jwt.trim().as_bytes()[..h.len() + 1 + c.len()];
        let ok = match self {
            Verifier::Hs256(key) => hmac::verify(key, signed, &sig).is_ok(),
            Verifier::Rs256(der) => {
                signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, der)
                    .verify(signed, &sig)
                    .is_ok()
            }
            Verifier::Es256(point) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(signed, &sig)
                    .is_ok()
            }
        };
        if !ok {
            return Err(JwtError::BadSignature);
        }
        let claims: Map<String, Value> = decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        let time = |name: &str| time_claim(&claims, name);
        match time("exp") {
            None => return Err(JwtError::NoExpiry),
            Some(exp) if now > exp.saturating_add(LEEWAY_SECS) => return Err(JwtError::Expired),
            Some(_) => {}
        }
        if time("nbf").is_some_and(|nbf| now.saturating_add(LEEWAY_SECS) < nbf) {
            return Err(JwtError::NotYetValid);
        }
        Ok(claims)
    }
}

/// The `sub` claim as text (some issuers put a number there). It becomes a user
/// id, so it follows the rule of every id: no control character, at most 256 bytes.
pub fn subject(claims: &Map<String, Value>) -> Result<String, JwtError> {
    match claims.get("sub") {
        Some(Value::String(s))
            if !s.is_empty()
                && crate::event::check_text("sub", s, crate::event::MAX_USER_ID_BYTES).is_ok() =>
        {
            Ok(s.clone())
        }
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(JwtError::NoSubject),
    }
}

/// Signs `claims` with HS256 under `header` (which must say `"alg":"HS256"`).
pub fn sign_hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let signed = format!("{}.{}", enc(header), enc(claims));
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fn pem_decode(pem: &str) -> Option<(String, Vec<u8>)> {
    let begin = pem.find("-----BEGIN ")?;
    let rest = &pem[begin + 11..];
    let label_end = rest.find("-----")?;
    let label = rest[..label_end].to_string();
    let body = &rest[label_end + 5..];
    let end = body.find("-----END ")?;
    let b64: String = body[..end].chars().filter(|c| !c.is_whitespace()).collect();
    Some((label, STANDARD.decode(b64).ok()?))
}

enum SpkiAlg {
    Rsa,
    P256,
}

/// One DER element: (tag, contents, the rest after it).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 3 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

// Object identifiers, DER contents: rsaEncryption, id-ecPublicKey, prime256v1.
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// SubjectPublicKeyInfo ::= SEQUENCE { algorithm SEQUENCE { OID, params }, BIT STRING }.
/// Returns the key bits: RSAPublicKey DER for RSA, the uncompressed point for P-256.
fn spki(input: &[u8]) -> Option<(SpkiAlg, Vec<u8>)> {
    let (0x30, spki, _) = der(input)? else {
        return None;
    };
    let (0x30, alg_id, rest) = der(spki)? else {
        return None;
    };
    let (0x03, bits, _) = der(rest)? else {
        return None;
    };
    let (0x06, oid, params) = der(alg_id)? else {
        return None;
    };
    // The first byte of a BIT STRING counts unused bits; keys use whole bytes.
    let (0, key) = bits.split_first()? else {
        return None;
    };
    let alg = if oid == OID_RSA {
        SpkiAlg::Rsa
    } else if oid == OID_EC {
        match der(params)? {
            (0x06, curve, _) if curve == OID_P256 => SpkiAlg::P256,
            _ => return None,
        }
    } else {
        return None;
    };
    Some((alg, key.to_vec()))
}

#[cfg(test)]
mod tests;
