//! Who is calling: the backends' shared service token (`Authorization: Bearer` or
//! `X-Admin-Token`), or an app user's bearer JWT. 401 means no or bad credentials,
//! 403 valid credentials that may not do this.

use axum::http::{header, HeaderMap};

use super::jwt::{self, Rules, Verifier};
use super::ApiError;

/// The backends' seed signal server sends its shared secret in this header.
pub const ADMIN_TOKEN_HEADER: &str = "x-admin-token";

/// Compares two secrets in time independent of where they differ and of their
/// lengths: both sides are hashed first, then every byte of the digests is compared.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    let da = ring::digest::digest(&ring::digest::SHA256, a);
    let db = ring::digest::digest(&ring::digest::SHA256, b);
    let diff = da
        .as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A verified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Service,
    /// An app user; the `sub` claim of their JWT.
    User(String),
}

pub struct Auth {
    service_token: Option<String>,
    users: Option<(Verifier, Rules)>,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl Auth {
    pub fn new(service_token: Option<String>, users: Option<(Verifier, Rules)>) -> Self {
        Self {
            service_token: service_token.filter(|t| !t.is_empty()),
            users,
        }
    }

    pub fn service_on(&self) -> bool {
        self.service_token.is_some()
    }

    pub fn users_on(&self) -> bool {
        self.users.is_some()
    }

    fn is_service_token(&self, presented: &str) -> bool {
        self.service_token
            .as_deref()
            .is_some_and(|t| secrets_equal(t.as_bytes(), presented.as_bytes()))
    }

    fn user(&self, token: &str) -> Result<String, ApiError> {
        let Some((verifier, rules)) = &self.users else {
            return Err(ApiError::unauthorized("the bearer token is not accepted"));
        };
        let now = crate::apns::token::unix_now() as i64;
        verifier
            .verify(token, now)
            .and_then(|claims| rules.check(&claims, now).map(|()| claims))
            .and_then(|claims| jwt::subject(&claims))
            .map_err(|e| ApiError::unauthorized(&format!("bearer token refused: {e}")))
    }

    /// Service token or user JWT, from `Authorization: Bearer` (or the service
    /// token in `X-Admin-Token`).
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if let Some(admin) = headers
            .get(ADMIN_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            return if self.is_service_token(admin.trim()) {
                Ok(Caller::Service)
            } else {
                Err(ApiError::unauthorized(
                    "X-Admin-Token is not the service token",
                ))
            };
        }
        let Some(token) = bearer(headers) else {
            return Err(ApiError::unauthorized(
                "missing credentials: send Authorization: Bearer <token>",
            ));
        };
        if self.is_service_token(token) {
            return Ok(Caller::Service);
        }
        self.user(token).map(Caller::User)
    }

    /// Only the service token; a valid user JWT is 403 here.
    pub fn service(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self.caller(headers)? {
            Caller::Service => Ok(()),
            Caller::User(_) => Err(ApiError::forbidden(
                "this endpoint is for backends (service token), not app users",
            )),
        }
    }

    /// The service token, or a user JWT whose subject is `identity`.
    pub fn service_or_user(&self, headers: &HeaderMap, identity: &str) -> Result<(), ApiError> {
        match self.caller(headers)? {
            Caller::Service => Ok(()),
            Caller::User(sub) if sub == identity => Ok(()),
            Caller::User(_) => Err(ApiError::forbidden(
                "the bearer token belongs to another user",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole_values() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"abcd"));
        assert!(!secrets_equal(b"", b"a"));
    }

    #[test]
    fn bearer_is_case_insensitive_and_trimmed() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer  t0k ".parse().unwrap());
        assert_eq!(bearer(&h), Some("t0k"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
