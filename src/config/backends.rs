//! Configuration of the listener and of what existing backends plug into: the
//! HTTP API's secrets and limits, Twilio, device-registration events and a team's
//! own token tables.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct HttpConfig {
    pub listen: String,
    /// The backends' shared secret for `/v1/*` and `/api/internal/*`; unset: those
    /// endpoints answer 404.
    pub service_token: Option<String>,
    /// HS256 secret of the app users' bearer JWTs (`PUT /api/v1/me/devices`, ...).
    pub user_jwt_secret: Option<String>,
    /// Instead of the secret: a PEM public key (RS256 or ES256).
    pub user_jwt_public_key_file: Option<PathBuf>,
    /// API request bodies above this are refused with 413. A call event or a
    /// registration is a few hundred bytes; 16 KiB is the event limit of the queue.
    pub max_body_bytes: usize,
    /// Registration requests per client address: a token bucket refilled at this
    /// rate and holding at most `rate_limit_burst`. 0 turns the limit off.
    pub rate_limit_per_minute: u32,
    pub rate_limit_burst: u32,
    /// Peers whose `X-Forwarded-For` names the client (IPs or CIDRs, a list or
    /// one comma-separated string). Empty: the socket peer is the client.
    #[serde(deserialize_with = "one_or_many")]
    pub trusted_proxies: Vec<String>,
    /// Time a client has to send a request's head — and, on a kept-alive
    /// connection, to start its next request; then the connection is closed.
    pub header_read_timeout_ms: u64,
    /// Time a client has to send a request's body once its head arrived; then
    /// the answer is 408 and the connection is closed.
    pub body_read_timeout_ms: u64,
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Postgres connections of the call status reads (`GET /v1/calls/{id}`),
    /// apart from the ring pipeline's.
    pub long_poll_pool_size: usize,
    /// Long polls (`?waitMs=`) waiting at once; one more is a 503 with Retry-After.
    pub max_long_polls: usize,
    /// When set, a user JWT's `iss` must be this.
    pub user_jwt_issuer: Option<String>,
    /// When set, a user JWT's `aud` (a string or a list) must hold this.
    pub user_jwt_audience: Option<String>,
    /// The longest a user JWT may be good for: `exp` − `iat` (or − now, when
    /// `iat` is absent or in the future).
    pub user_jwt_max_lifetime_secs: u64,
}

/// A list in the TOML file, or one comma-separated string (an environment variable).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s.split(',').map(str::to_string).collect(),
        OneOrMany::Many(v) => v,
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".into(),
            service_token: None,
            user_jwt_secret: None,
            user_jwt_public_key_file: None,
            max_body_bytes: crate::event::MAX_EVENT_BYTES,
            // An app registers its token at launch and when PushKit rotates it:
            // a few times a day. 60/min with a burst of 20 leaves room for NAT'd
            // offices while stopping token-guessing floods.
            rate_limit_per_minute: 60,
            rate_limit_burst: 20,
            trusted_proxies: Vec::new(),
            // A request head is a few hundred bytes: 10 s is generous for a slow
            // phone link and short enough that trickled heads (slowloris) cannot
            // hold connections for long. It also closes idle keep-alive
            // connections (hyper starts the clock when it waits for a head).
            header_read_timeout_ms: 10_000,
            // Bodies are at most `max_body_bytes` (16 KiB): 10 s is ~13 kbit/s.
            body_read_timeout_ms: 10_000,
            // Far above what backends and apps need (they reuse connections),
            // far below the file descriptors a container gets.
            max_connections: 512,
            // A replica stays within 8 Postgres connections: status reads get one,
            // and a long poll takes it only for one short query every poll step.
            long_poll_pool_size: 1,
            max_long_polls: 32,
            user_jwt_issuer: None,
            user_jwt_audience: None,
            // A day: an app refreshes its session token far more often; a leaked
            // token of a longer-lived kind must not register devices for weeks.
            user_jwt_max_lifetime_secs: 86_400,
        }
    }
}

impl HttpConfig {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    /// The listener's and the API's limits, one line per refusal.
    pub(super) fn validate_limits(&self) -> Result<(), String> {
        for (name, ms) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
        ] {
            if !(1..=3_600_000).contains(&ms) {
                return Err(format!("http.{name} must be between 1 and 3600000"));
            }
        }
        // The listener waits for every connection slot at shutdown (u32 permits).
        if !(1..=65_536).contains(&self.max_connections) {
            return Err("http.max_connections must be between 1 and 65536".into());
        }
        if self.long_poll_pool_size == 0 {
            return Err("http.long_poll_pool_size must be at least 1".into());
        }
        if !(1..=365 * 86_400).contains(&self.user_jwt_max_lifetime_secs) {
            return Err("http.user_jwt_max_lifetime_secs must be between 1 and 31536000".into());
        }
        crate::api::client_addr::TrustedProxies::parse(&self.trusted_proxies)
            .map_err(|why| format!("http.trusted_proxies {why}"))?;
        Ok(())
    }
}

/// Shows whether a secret is set, never the secret.
fn redacted(secret: &Option<String>) -> &'static str {
    match secret {
        Some(s) if !s.is_empty() => "<redacted>",
        _ => "<unset>",
    }
}

impl fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("service_token", &redacted(&self.service_token))
            .field("user_jwt_secret", &redacted(&self.user_jwt_secret))
            .field("user_jwt_public_key_file", &self.user_jwt_public_key_file)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("rate_limit_per_minute", &self.rate_limit_per_minute)
            .field("rate_limit_burst", &self.rate_limit_burst)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("header_read_timeout_ms", &self.header_read_timeout_ms)
            .field("body_read_timeout_ms", &self.body_read_timeout_ms)
            .field("max_connections", &self.max_connections)
            .field("long_poll_pool_size", &self.long_poll_pool_size)
            .field("max_long_polls", &self.max_long_polls)
            .field("user_jwt_issuer", &self.user_jwt_issuer)
            .field("user_jwt_audience", &self.user_jwt_audience)
            .field(
                "user_jwt_max_lifetime_secs",
                &self.user_jwt_max_lifetime_secs,
            )
            .finish()
    }
}

/// Twilio Voice access tokens (`POST /twilio/token`); off unless every id and the
/// secret are set.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct TwilioConfig {
    pub account_sid: Option<String>,
    pub api_key_sid: Option<String>,
    pub api_key_secret: Option<String>,
    pub twiml_app_sid: Option<String>,
    pub push_credential_sid: Option<String>,
    /// Lifetime of an access token; Twilio accepts at most 24 h.
    pub token_ttl_secs: u64,
}

impl Default for TwilioConfig {
    fn default() -> Self {
        Self {
            account_sid: None,
            api_key_sid: None,
            api_key_secret: None,
            twiml_app_sid: None,
            push_credential_sid: None,
            token_ttl_secs: 3600,
        }
    }
}

impl fmt::Debug for TwilioConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwilioConfig")
            .field("account_sid", &self.account_sid)
            .field("api_key_sid", &self.api_key_sid)
            .field("api_key_secret", &redacted(&self.api_key_secret))
            .field("twiml_app_sid", &self.twiml_app_sid)
            .field("push_credential_sid", &self.push_credential_sid)
            .field("token_ttl_secs", &self.token_ttl_secs)
            .finish()
    }
}

/// Device registration events on RabbitMQ (`device.register`, `device.unregister`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct DevicesConfig {
    /// Topic exchange the backends publish registrations to.
    pub exchange: String,
    /// Quorum queue the worker consumes them from; empty turns the consumer off.
    pub queue: String,
    /// Where a registration event that cannot be applied goes, with its reason
    /// in `x-vpw-reason` (fanout exchange and its quorum queue).
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self {
            exchange: "voip.devices".into(),
            queue: "voip-push.devices".into(),
            dead_letter_exchange: "voip.devices.dlx".into(),
            dead_letter_queue: "voip-push.devices.dead".into(),
        }
    }
}

/// Where device tokens come from when a team keeps them in its own tables.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct StoreConfig {
    /// SQL returning a user's tokens instead of our `devices` table: `$1` is the
    /// user id (as text, or converted when the query wants an integer); columns
    /// `token`, optional `environment` and `bundle_id`.
    pub token_query: Option<String>,
    /// SQL run when such a token is invalidated: `$1` token, `$2` reason. Unset:
    /// the invalidation is recorded in our `devices` table.
    pub invalidate_query: Option<String>,
}
