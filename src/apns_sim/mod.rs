//! The APNs simulator: production and sandbox as two TLS + HTTP/2 listeners with
//! separate token registries, Apple's validation rules, scripted answers, a record
//! of every request, and a plain-HTTP control API. Used in-process by tests and
//! `demo`, and standalone by `voip-push-worker apns-sim`.

pub mod faults;
pub mod tls;
pub mod validate;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::apns::token::{unix_now, KeyError, SigningKey};
use crate::config::AppConfig;
use crate::event::{now_ms, token_suffix, Environment};

/// An app whose provider tokens the simulator accepts.
#[derive(Clone, Debug)]
pub struct SimApp {
    pub bundle_id: String,
    pub team_id: String,
    pub key_id: String,
    /// Uncompressed P-256 point of the team key.
    pub public_key: Vec<u8>,
}

impl SimApp {
    /// The apps of a worker configuration, with the public halves of their keys.
    pub fn from_config(apps: &[AppConfig]) -> Result<Vec<SimApp>, KeyError> {
        apps.iter()
            .map(|a| {
                let key = SigningKey::from_p8_file(&a.key_file, &a.team_id, &a.key_id)?;
                Ok(SimApp {
                    bundle_id: a.bundle_id.clone(),
                    team_id: a.team_id.clone(),
                    key_id: a.key_id.clone(),
                    public_key: key.public_key(),
                })
            })
            .collect()
    }
}

/// One request as the simulator saw it. The provider token is kept as a short
/// fingerprint only, enough to count distinct tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedRequest {
    pub environment: Environment,
    pub token: String,
    pub headers: BTreeMap<String, String>,
    pub provider_token_id: Option<String>,
    /// The JSON payload, or the raw text when it was not JSON.
    pub payload: serde_json::Value,
    pub status: u16,
    pub reason: Option<String>,
    pub apns_id: Option<String>,
    pub at_ms: i64,
    /// Which connection carried it (numbered as accepted, both environments).
    pub connection: u64,
}

/// A scripted answer for one token, used instead of the normal verdict once the
/// request passed validation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Scripted {
    pub status: u16,
    pub reason: Option<String>,
    /// For 410: when the token stopped being valid (ms since epoch).
    pub timestamp_ms: Option<i64>,
    /// Wait this long before answering (a slow or stalled APNs).
    pub delay_ms: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRegistration {
    pub token: String,
    pub environment: Environment,
    pub bundle_id: String,
}

#[derive(Default)]
struct SimState {
    apps: Vec<SimApp>,
    /// (environment, token) → bundle id.
    tokens: Mutex<HashMap<(Environment, String), String>>,
    scripts: Mutex<HashMap<String, VecDeque<Scripted>>>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Added to the wall clock when checking `iat` (tests of token expiry).
    clock_offset_secs: AtomicI64,
    stalls: Arc<faults::StallControl>,
    /// Tells every open connection to send GOAWAY and close.
    goaway: tokio::sync::watch::Sender<u64>,
}

impl SimState {
    fn now(&self) -> u64 {
        (unix_now() as i64 + self.clock_offset_secs.load(Ordering::Relaxed)).max(0) as u64
    }
}

/// APNs refuses a new provider token on a connection within 20 minutes of the
/// previous one.
const TOKEN_UPDATE_MIN_SECS: u64 = 20 * 60;

/// Per-connection state: APNs binds a connection to the key of its first push,
/// and limits how often its provider token may change.
#[derive(Default)]
struct ConnState {
    key: Option<(String, String)>,
    /// The provider token in use and when (simulator clock) it was first seen.
    token: Option<(String, u64)>,
    number: u64,
    /// One stream at a time: until the connection's first accepted push, and again
    /// after a rejected one until the next success (as APNs is observed to do).
    restricted: bool,
    gate: Arc<tokio::sync::Mutex<()>>,
}

pub struct SimOptions {
    pub production_listen: String,
    pub sandbox_listen: String,
    pub control_listen: Option<String>,
    pub apps: Vec<SimApp>,
}

impl SimOptions {
    /// Ephemeral loopback ports, no control listener: what tests and `demo` use.
    pub fn local(apps: Vec<SimApp>) -> Self {
        Self {
            production_listen: "127.0.0.1:0".into(),
            sandbox_listen: "127.0.0.1:0".into(),
            control_listen: None,
            apps,
        }
    }
}

pub struct ApnsSim {
    pub production_addr: SocketAddr,
    pub sandbox_addr: SocketAddr,
    pub control_addr: Option<SocketAddr>,
    /// The CA that signed the simulator's certificate, for `VPW__APNS__CA_FILE`.
    pub ca_pem: String,
    state: Arc<SimState>,
    shutdown: CancellationToken,
}

impl Drop for ApnsSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn bind(addr: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

impl ApnsSim {
    pub async fn start(opts: SimOptions) -> Result<Self, String> {
        let tls = tls::generate()?;
        let state = Arc::new(SimState {
            apps: opts.apps,
            ..Default::default()
        });
        let shutdown = CancellationToken::new();
        let production = bind(&opts.production_listen).await?;
        let sandbox = bind(&opts.sandbox_listen).await?;
        let production_addr = production.local_addr().map_err(|e| e.to_string())?;
        let sandbox_addr = sandbox.local_addr().map_err(|e| e.to_string())?;
        for (listener, env) in [
            (production, Environment::Production),
            (sandbox, Environment::Sandbox),
        ] {
            let acceptor = TlsAcceptor::from(tls.server.clone());
            tokio::spawn(serve_apns(
                listener,
                acceptor,
                env,
                state.clone(),
                shutdown.clone(),
            ));
        }
        let control_addr = match &opts.control_listen {
            Some(addr) => {
                let listener = bind(addr).await?;
                let local = listener.local_addr().map_err(|e| e.to_string())?;
                let router = control_router(state.clone());
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(listener, router)
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await;
                });
                Some(local)
            }
            None => None,
        };
        info!(%production_addr, %sandbox_addr, control = ?control_addr, "APNs simulator listening");
        Ok(Self {
            production_addr,
            sandbox_addr,
            control_addr,
            ca_pem: tls.ca_pem,
            state,
            shutdown,
        })
    }

    pub fn production_url(&self) -> String {
        format!("https://{}", self.production_addr)
    }

    pub fn sandbox_url(&self) -> String {
        format!("https://{}", self.sandbox_addr)
    }

    /// Makes `token` a valid device token of `bundle_id` in `env` (only there).
    pub fn register_token(&self, env: Environment, token: &str, bundle_id: &str) {
        self.state
            .tokens
            .lock()
            .expect("sim lock")
            .insert((env, token.to_ascii_lowercase()), bundle_id.to_string());
    }

    /// Queues scripted answers for `token`, used one per valid request.
    pub fn script(&self, token: &str, answers: impl IntoIterator<Item = Scripted>) {
        self.state
            .scripts
            .lock()
            .expect("sim lock")
            .entry(token.to_ascii_lowercase())
            .or_default()
            .extend(answers);
    }

    /// Makes every connection open now go silent: no answers, no PING replies,
    /// as if the network black-holed it. New connections work.
    pub fn stall_existing_connections(&self) {
        self.state.stalls.stall_existing();
    }

    /// Closes every connection open now, abruptly (a TCP reset, no GOAWAY).
    pub fn drop_existing_connections(&self) {
        self.state.stalls.drop_existing();
    }

    /// Sends GOAWAY on every open connection.
    pub fn goaway(&self) {
        self.state.goaway.send_modify(|n| *n += 1);
    }

    /// Connections accepted so far, both environments.
    pub fn connections_accepted(&self) -> u64 {
        self.state.stalls.accepted()
    }

    /// Shifts the simulator's clock (provider-token age checks).
    pub fn set_clock_offset(&self, secs: i64) {
        self.state.clock_offset_secs.store(secs, Ordering::Relaxed);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().expect("sim lock").clone()
    }

    /// Forgets tokens, scripts and recorded requests.
    pub fn reset(&self) {
        reset_state(&self.state);
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

fn reset_state(state: &SimState) {
    state.tokens.lock().expect("sim lock").clear();
    state.scripts.lock().expect("sim lock").clear();
    state.requests.lock().expect("sim lock").clear();
}

async fn serve_apns(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    env: Environment,
    state: Arc<SimState>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => { debug!(error = %e, "accept failed"); continue; }
            },
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        let number = state.stalls.next_connection();
        let stallable = faults::Stallable::new(tcp, number, state.stalls.clone());
        let mut goaway = state.goaway.subscribe();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stallable).await else {
                debug!(%peer, "TLS handshake failed");
                return;
            };
            let conn_state = Arc::new(Mutex::new(ConnState {
                number,
                restricted: true,
                ..ConnState::default()
            }));
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let conn_state = conn_state.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(handle(req, env, &state, &conn_state).await)
                }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    // GOAWAY: in-flight streams finish, new ones go to a new connection.
                    changed = goaway.changed() => {
                        if changed.is_ok() {
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(%peer, error = %e, "simulator connection ended");
                        }
                        return;
                    }
                }
            }
        });
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    env: Environment,
    state: &SimState,
    conn: &Mutex<ConnState>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // Far above the 5120-byte limit, so an oversized payload is read and refused
    // with Apple's 413 rather than cut off.
    let body = match Limited::new(body, 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return answer(env, 413, Some("PayloadTooLarge"), None, None),
    };
    let token = parts
        .uri
        .path()
        .strip_prefix("/3/device/")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let (gate, number) = {
        let c = conn.lock().expect("conn lock");
        (c.restricted.then(|| c.gate.clone()), c.number)
    };
    // While restricted, requests on this connection are answered one at a time.
    let _one_stream = match gate {
        Some(g) => Some(g.lock_owned().await),
        None => None,
    };
    let verdict = decide(&parts, &body, &token, env, state, conn);
    let (status, reason, timestamp_ms, delay_ms) = match &verdict {
        Ok(Some(s)) => (s.status, s.reason.clone(), s.timestamp_ms, s.delay_ms),
        Ok(None) => (200, None, None, 0),
        Err((status, reason)) => (*status, Some(reason.to_string()), None, 0),
    };
    let apns_id = parts
        .headers
        .get("apns-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|_| status != 400 || reason.as_deref() != Some("BadMessageId"))
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| {
            let v = v.to_str().unwrap_or("<binary>");
            let shown = if k == "authorization" {
                format!("bearer …{}", token_suffix(v))
            } else {
                v.to_string()
            };
            (k.as_str().to_string(), shown)
        })
        .collect();
    let provider_token_id = parts.headers.get("authorization").map(|v| {
        let digest = ring::digest::digest(&ring::digest::SHA256, v.as_bytes());
        digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    });
    let payload = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()));
    state
        .requests
        .lock()
        .expect("sim lock")
        .push(RecordedRequest {
            environment: env,
            token,
            headers,
            provider_token_id,
            payload,
            status,
            reason: reason.clone(),
            apns_id: Some(apns_id.clone()),
            at_ms: now_ms(),
            connection: number,
        });
    if delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
    match status {
        200 => conn.lock().expect("conn lock").restricted = false,
        400 | 410 => conn.lock().expect("conn lock").restricted = true,
        _ => {}
    }
    answer(env, status, reason.as_deref(), timestamp_ms, Some(apns_id))
}

/// The verdict for one request: `Err` for a refusal by the rules, `Ok(Some)` for a
/// scripted answer, `Ok(None)` for success.
fn decide(
    parts: &hyper::http::request::Parts,
    body: &[u8],
    token: &str,
    env: Environment,
    state: &SimState,
    conn: &Mutex<ConnState>,
) -> Result<Option<Scripted>, validate::Refusal> {
    let (_, topic) = validate::check_request(parts, body)?;
    let identity = validate::check_provider_token(parts, &state.apps, state.now())?;
    {
        let mut conn = conn.lock().expect("conn lock");
        let key = (identity.team_id.clone(), identity.key_id.clone());
        match &conn.key {
            Some(bound) if *bound != key => return Err((403, "UnrelatedKeyIdInToken")),
            Some(_) => {}
            None => conn.key = Some(key),
        }
        let jwt = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let now = state.now();
        match &conn.token {
            Some((current, _)) if current == jwt => {}
            Some((_, since)) if now.saturating_sub(*since) < TOKEN_UPDATE_MIN_SECS => {
                return Err((429, "TooManyProviderTokenUpdates"));
            }
            _ => conn.token = Some((jwt.to_string(), now)),
        }
    }
    let bundle = validate::check_topic(topic, &identity, &state.apps)?;
    if !token.bytes().all(|b| b.is_ascii_hexdigit()) || token.len() % 2 != 0 {
        return Err((400, "BadDeviceToken"));
    }
    if let Some(s) = state
        .scripts
        .lock()
        .expect("sim lock")
        .get_mut(token)
        .and_then(VecDeque::pop_front)
    {
        return Ok(Some(s));
    }
    match state
        .tokens
        .lock()
        .expect("sim lock")
        .get(&(env, token.to_string()))
    {
        None => Err((400, "BadDeviceToken")),
        Some(b) if *b != bundle => Err((400, "DeviceTokenNotForTopic")),
        Some(_) => Ok(None),
    }
}

fn answer(
    env: Environment,
    status: u16,
    reason: Option<&str>,
    timestamp_ms: Option<i64>,
    apns_id: Option<String>,
) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(status);
    if let Some(id) = &apns_id {
        builder = builder.header("apns-id", id.as_str());
    }
    let body = if status == 200 {
        if env == Environment::Sandbox {
            builder = builder.header("apns-unique-id", uuid::Uuid::new_v4().to_string());
        }
        Bytes::new()
    } else {
        builder = builder.header("content-type", "application/json");
        let mut b = serde_json::json!({ "reason": reason.unwrap_or("InternalServerError") });
        if status == 410 {
            b["timestamp"] = serde_json::json!(timestamp_ms.unwrap_or_else(now_ms));
        }
        Bytes::from(b.to_string())
    };
    builder.body(Full::new(body)).expect("valid response")
}

fn control_router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/tokens", post(control_tokens))
        .route("/requests", get(control_requests))
        .route("/reset", post(control_reset))
        .route("/script", post(control_script))
        .with_state(state)
}

async fn control_tokens(
    State(s): State<Arc<SimState>>,
    Json(regs): Json<Vec<TokenRegistration>>,
) -> Json<serde_json::Value> {
    let mut tokens = s.tokens.lock().expect("sim lock");
    for r in &regs {
        tokens.insert(
            (r.environment, r.token.to_ascii_lowercase()),
            r.bundle_id.clone(),
        );
    }
    Json(serde_json::json!({ "registered": regs.len() }))
}

async fn control_requests(State(s): State<Arc<SimState>>) -> Json<Vec<RecordedRequest>> {
    Json(s.requests.lock().expect("sim lock").clone())
}

async fn control_reset(State(s): State<Arc<SimState>>) -> Json<serde_json::Value> {
    reset_state(&s);
    Json(serde_json::json!({ "reset": true }))
}

#[derive(Deserialize)]
struct ScriptBody {
    token: String,
    responses: Vec<Scripted>,
}

async fn control_script(
    State(s): State<Arc<SimState>>,
    Json(b): Json<ScriptBody>,
) -> Json<serde_json::Value> {
    let n = b.responses.len();
    s.scripts
        .lock()
        .expect("sim lock")
        .entry(b.token.to_ascii_lowercase())
        .or_default()
        .extend(b.responses);
    Json(serde_json::json!({ "scripted": n }))
}
