//! The two APNs listeners: TLS + HTTP/2 connections, Apple's verdict for each
//! request, and the per-connection behaviour APNs shows (key binding, provider
//! token updates, one stream at a time when restricted).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{certs, faults, validate, RecordedRequest, Scripted, SimState, TokenKind};
use crate::apns::cert::CertInfo;
use crate::event::{now_ms, token_suffix, Environment};

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
    /// The last provider token whose signature verified, and its identity: a
    /// connection sends one token for up to an hour, and checking its ES256
    /// signature on every push was most of the bench's own CPU.
    verified: Option<(String, validate::TokenIdentity)>,
    number: u64,
    /// One stream at a time: until the connection's first accepted push, and again
    /// after a rejected one until the next success (as APNs is observed to do).
    restricted: bool,
    gate: Arc<tokio::sync::Mutex<()>>,
    /// The client certificate of the handshake: the connection's app, instead of
    /// provider tokens.
    client_cert: Option<CertInfo>,
}

pub(super) async fn serve_apns(
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
            let client_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| CertInfo::from_der(leaf).ok());
            let conn_state = Arc::new(Mutex::new(ConnState {
                number,
                restricted: true,
                client_cert,
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
        Err(_) => return dated(state, answer(env, 413, Some("PayloadTooLarge"), None, None)),
    };
    let token = parts
        .uri
        .path()
        .strip_prefix("/3/device/")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let (gate, number, client_certificate) = {
        let c = conn.lock().expect("conn lock");
        (
            c.restricted.then(|| c.gate.clone()),
            c.number,
            c.client_cert.as_ref().map(CertInfo::subject),
        )
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
            client_certificate,
        });
    if delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
    match status {
        200 => conn.lock().expect("conn lock").restricted = false,
        400 | 410 => conn.lock().expect("conn lock").restricted = true,
        _ => {}
    }
    dated(
        state,
        answer(env, status, reason.as_deref(), timestamp_ms, Some(apns_id)),
    )
}

/// Stamps `date` from the simulator's clock (shifted by
/// [`super::ApnsSim::set_clock_offset`]), so a skewed clock can be staged.
fn dated(state: &SimState, mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    if let Ok(v) =
        hyper::header::HeaderValue::from_str(&crate::event::http_date(state.now() as i64))
    {
        response.headers_mut().insert(hyper::header::DATE, v);
    }
    response
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
    let push_type = parts
        .headers
        .get("apns-push-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let client_cert = conn.lock().expect("conn lock").client_cert.clone();
    let bundle = match client_cert {
        Some(cert) => certs::check_topic(topic, &cert, env)?,
        None => token_bundle(parts, topic, state, conn)?,
    };
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
        Some((b, _)) if *b != bundle => Err((400, "DeviceTokenNotForTopic")),
        Some((_, kind)) if (*kind == TokenKind::Voip) != (push_type == "voip") => {
            Err((400, "DeviceTokenNotForTopic"))
        }
        Some(_) => Ok(None),
    }
}

/// The app of a connection without a client certificate: its provider token's
/// team and key (binding the connection to the key of its first push, and
/// limiting token changes, as APNs does), and the topic's bundle of that team.
fn token_bundle(
    parts: &hyper::http::request::Parts,
    topic: &str,
    state: &SimState,
    conn: &Mutex<ConnState>,
) -> Result<String, validate::Refusal> {
    let jwt = validate::bearer(parts)?;
    let known = conn
        .lock()
        .expect("conn lock")
        .verified
        .as_ref()
        .filter(|(verified, _)| verified == jwt)
        .map(|(_, identity)| identity.clone());
    let identity = match known {
        Some(identity) => identity,
        None => {
            let identity = validate::verify_provider_token(jwt, &state.apps)?;
            conn.lock().expect("conn lock").verified = Some((jwt.to_string(), identity.clone()));
            identity
        }
    };
    validate::check_token_age(&identity, state.now())?;
    {
        let mut conn = conn.lock().expect("conn lock");
        let key = (identity.team_id.clone(), identity.key_id.clone());
        match &conn.key {
            Some(bound) if *bound != key => return Err((403, "UnrelatedKeyIdInToken")),
            Some(_) => {}
            None => conn.key = Some(key),
        }
        let now = state.now();
        match &conn.token {
            Some((current, _)) if current == jwt => {}
            Some((_, since)) if now.saturating_sub(*since) < TOKEN_UPDATE_MIN_SECS => {
                return Err((429, "TooManyProviderTokenUpdates"));
            }
            _ => conn.token = Some((jwt.to_string(), now)),
        }
    }
    validate::check_topic(topic, &identity, &state.apps)
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
