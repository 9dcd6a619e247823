//! The HTTP API for existing backends (CONTRACT §9), on the metrics listener:
//! call ingestion, device registration, Twilio access tokens.
//!
//! Three groups, each off (404) until its secret is configured: the service group
//! (`http.service_token`: `/v1/*`, `/api/internal/*`), the user group
//! (`http.user_jwt_secret` or `http.user_jwt_public_key_file`:
//! `/api/v1/me/devices`) and the Twilio group (`twilio.*`: `/twilio/token`,
//! `/users/{identity}/voip-token`).

pub mod auth;
pub mod call_status;
pub mod calls;
pub mod client_addr;
pub mod device_events;
pub mod devices;
pub mod jwt;
pub mod ratelimit;
pub mod twilio;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use crate::amqp::Publisher;
use crate::config::{Config, ConfigError};
use crate::store::{Store, StoreError};

use self::auth::Auth;
use self::client_addr::TrustedProxies;
use self::jwt::Verifier;
use self::ratelimit::RateLimiter;
use self::twilio::TwilioSigner;

/// An error answer: `{"error": code, "message": ...}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 404 for an endpoint whose group is not configured.
    fn group_off(setting: &str) -> Self {
        Self::not_found(&format!("not enabled here (set {setting})"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.code, "message": self.message});
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::BadToken(why) => {
                ApiError::bad_request("bad_token", format!("invalid device token: {why}"))
            }
            other if !other.is_retryable() => {
                warn!(error = %other, "the database refuses an API request's values");
                ApiError::bad_request(
                    "bad_field",
                    format!("the database refuses a value: {other}"),
                )
            }
            other => {
                warn!(error = %other, "database unavailable for an API request");
                ApiError::unavailable("database unavailable; nothing was stored")
            }
        }
    }
}

pub type ApiResult = Result<Response, ApiError>;

/// Everything the API handlers need.
#[derive(Clone)]
pub struct ApiState {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub publisher: Arc<Publisher>,
    pub auth: Arc<Auth>,
    pub twilio: Option<Arc<TwilioSigner>>,
    limiter: Arc<RateLimiter>,
    proxies: Arc<TrustedProxies>,
    /// Status reads and long polls, on their own connections.
    pub status: call_status::StatusReads,
    pub metrics: crate::metrics::Metrics,
}

fn set(v: &Option<String>) -> Option<String> {
    v.as_ref().filter(|s| !s.is_empty()).cloned()
}

impl ApiState {
    /// Reads the user JWT public key file, if configured (an unreadable key is a
    /// configuration error at start, not a 401 at every request).
    pub fn new(
        cfg: Arc<Config>,
        store: Store,
        publisher: Arc<Publisher>,
        metrics: crate::metrics::Metrics,
    ) -> Result<Self, ConfigError> {
        let users = match (
            set(&cfg.http.user_jwt_secret),
            &cfg.http.user_jwt_public_key_file,
        ) {
            (Some(secret), _) => Some(Verifier::hs256(secret.as_bytes())),
            (None, Some(path)) => {
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::Invalid(format!(
                        "http.user_jwt_public_key_file {}: {e}",
                        path.display()
                    ))
                })?;
                Some(Verifier::from_pem(&pem).map_err(|e| {
                    ConfigError::Invalid(format!(
                        "http.user_jwt_public_key_file {}: {e}",
                        path.display()
                    ))
                })?)
            }
            (None, None) => None,
        };
        let rules = jwt::Rules {
            issuer: set(&cfg.http.user_jwt_issuer),
            audience: set(&cfg.http.user_jwt_audience),
            max_lifetime_secs: Some(cfg.http.user_jwt_max_lifetime_secs as i64),
        };
        let auth = Auth::new(set(&cfg.http.service_token), users.map(|v| (v, rules)));
        let twilio = TwilioSigner::from_config(&cfg.twilio).map(Arc::new);
        let limiter = RateLimiter::new(cfg.http.rate_limit_per_minute, cfg.http.rate_limit_burst);
        let proxies = TrustedProxies::parse(&cfg.http.trusted_proxies)
            .map_err(|why| ConfigError::Invalid(format!("http.trusted_proxies {why}")))?;
        let status = call_status::StatusReads::connect(&cfg, metrics.clone())
            .map_err(|e| ConfigError::Invalid(format!("postgres: {e}")))?;
        Ok(Self {
            cfg,
            store,
            publisher,
            auth: Arc::new(auth),
            twilio,
            limiter: Arc::new(limiter),
            proxies: Arc::new(proxies),
            status,
            metrics,
        })
    }

    /// One log line per group saying whether it is on (never a secret).
    pub fn log_groups(&self) {
        let on = |b: bool| if b { "on" } else { "off" };
        info!(
            service = on(self.auth.service_on()),
            user_jwt = on(self.auth.users_on()),
            twilio = on(self.twilio.is_some()),
            "HTTP API groups"
        );
        if self.twilio.is_none() && twilio::partly_configured(&self.cfg.twilio) {
            warn!("some twilio.* settings are set but not all: the Twilio group stays off");
        }
        if self.twilio.is_some() && !self.auth.service_on() && !self.auth.users_on() {
            warn!("the Twilio group is on but neither http.service_token nor a user JWT key is set: every request will be 401");
        }
    }

    /// The backends' group is on and the caller presents the service token.
    fn require_service(&self, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
        if !self.auth.service_on() {
            return Err(ApiError::group_off("http.service_token"));
        }
        self.auth.service(headers)
    }

    /// The app a registration without `bundleId` belongs to, and a check that a
    /// given one is configured (a token of an unknown app would never ring).
    pub fn bundle_id(&self, given: Option<&str>) -> Result<String, ApiError> {
        let apps = self.cfg.apps();
        match given {
            Some(b) if apps.iter().any(|a| a.bundle_id == b) => Ok(b.to_string()),
            Some(b) => Err(ApiError::bad_request(
                "unknown_bundle",
                format!("bundleId {b:?} is not a configured app"),
            )),
            None => apps
                .first()
                .map(|a| a.bundle_id.clone())
                .ok_or_else(|| ApiError::bad_request("unknown_bundle", "no app is configured")),
        }
    }
}

/// The API routes, to be merged into the listener's router.
pub fn router(state: ApiState) -> Router {
    let registration = Router::new()
        .route("/v1/devices", put(devices::put_device))
        .route("/v1/devices/{token}", delete(devices::delete_device))
        .route("/api/v1/me/devices", put(devices::put_my_device))
        .route(
            "/users/{identity}/voip-token",
            post(devices::post_voip_token),
        )
        .route("/twilio/token", post(twilio::post_token))
        .route_layer(middleware::from_fn_with_state(state.clone(), rate_limit));
    Router::new()
        .route("/v1/calls", post(calls::post_call))
        .route("/v1/calls/{call_id}", get(call_status::get_call))
        .route("/v1/calls/{call_id}/cancel", post(call_status::post_cancel))
        .route("/api/internal/push/call", post(calls::post_internal_call))
        .merge(registration)
        .route_layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(state.cfg.http.max_body_bytes))
        .with_state(state)
}

/// Counts and times every request by its route's template.
async fn observe(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    s.metrics
        .api_request_duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    s.metrics
        .api_requests
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    response
}

async fn rate_limit(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let client = s.proxies.client(peer, req.headers());
    if !s.limiter.allow(client) {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many registration requests from this address; retry later",
        )
        .into_response();
    }
    next.run(req).await
}

/// The request body as a JSON object; 413 over the limit, 400 otherwise.
pub fn json_object(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body is too large",
            )
        } else {
            ApiError::bad_request("bad_body", format!("could not read the body: {e}"))
        }
    })?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::bad_request(
            "bad_body",
            "body is not a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(
            "bad_body",
            format!("body is not JSON: {e}"),
        )),
    }
}

/// A text field (camelCase or snake_case name); numbers are accepted as text.
/// The longest text field the API takes (user ids, tokens, bundle ids).
const MAX_TEXT_FIELD_BYTES: usize = 256;

pub fn text_field(obj: &Map<String, Value>, names: &[&str]) -> Result<Option<String>, ApiError> {
    for name in names {
        match obj.get(*name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
            Some(Value::String(s)) => {
                // The same rule as call events: every value may become a Postgres
                // `text`, a log field or a header.
                crate::event::check_text(name, s.trim(), MAX_TEXT_FIELD_BYTES)
                    .map_err(|m| ApiError::bad_request("bad_field", m))?;
                return Ok(Some(s.trim().to_string()));
            }
            Some(Value::Number(n)) => return Ok(Some(n.to_string())),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "bad_field",
                    format!("{name} must be a string"),
                ))
            }
        }
    }
    Ok(None)
}
