//! A small HTTP/2 client for APNs: a base URL per environment (so a simulator or
//! staging host can stand in for Apple), extra trusted roots, a few long-lived
//! connections per environment with PING keep-alive, and every answer returned as
//! a value — a rejected push is data, not an error.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::outcome::{code_label, reason_label};
use crate::event::Environment;
use crate::metrics::Metrics;

/// Apple's error bodies are a few dozen bytes; anything larger is not APNs.
const MAX_RESPONSE_BODY: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to APNs {environment}: {detail}")]
    Connect {
        environment: &'static str,
        detail: String,
    },
    #[error("APNs {environment} did not answer within {timeout_ms} ms")]
    Timeout {
        environment: &'static str,
        timeout_ms: u128,
    },
    #[error("APNs {environment} connection failed mid-request: {detail}")]
    Transport {
        environment: &'static str,
        detail: String,
    },
    /// The request could not be built (a part is not a valid header value): no
    /// retry can change that.
    #[error("APNs request cannot be built: {detail}")]
    Request { detail: String },
}

impl SendError {
    /// Every transport failure is worth a retry on a fresh connection, within the
    /// call's ring deadline; a request that cannot be built is not.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SendError::Request { .. })
    }

    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SendError::Connect { .. } => "connect",
            SendError::Timeout { .. } => "timeout",
            SendError::Transport { .. } => "transport",
            SendError::Request { .. } => "bad_request",
        }
    }
}

/// One push request, ready to send.
#[derive(Clone, Debug)]
pub struct PushRequest {
    pub token: String,
    pub topic: String,
    pub provider_token: Arc<str>,
    pub apns_id: uuid::Uuid,
    /// UNIX seconds; 0 = deliver now or never.
    pub expiration: u64,
    pub priority: u8,
    pub collapse_id: String,
    pub payload: Bytes,
}

/// APNs' answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApnsResponse {
    pub status: u16,
    pub reason: Option<String>,
    pub apns_id: Option<String>,
    /// On 410: when APNs learned the token was no longer valid (ms since epoch).
    pub timestamp_ms: Option<i64>,
    pub latency: Duration,
    /// The `date` header: APNs' clock, which `doctor` compares with ours.
    pub date: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub production_url: String,
    pub sandbox_url: String,
    pub extra_roots_pem: Option<Vec<u8>>,
    pub connections_per_environment: usize,
    pub request_timeout: Duration,
    /// PING interval and answer timeout: a connection whose peer vanished is found
    /// and dropped within interval + timeout instead of at the next TCP timeout.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

struct Endpoint {
    environment: Environment,
    /// `https://host:port` as configured, used to build request URIs.
    base: String,
    host: String,
    port: u16,
    /// `trusted` connections first, then the probation ones.
    slots: Vec<tokio::sync::Mutex<Option<Conn>>>,
    trusted: usize,
    next: AtomicUsize,
    next_probation: AtomicUsize,
}

/// Which connections a request travels on. APNs may cut a connection to one
/// stream after a rejected push until its next success (observed), so a burst of
/// dead or unproven tokens would stall the rings queued behind it. Pushes to
/// tokens APNs has accepted before keep connections of their own; unproven
/// tokens and environment fallbacks go on probation connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Trusted,
    Probation,
}

/// Probation connections per environment.
const PROBATION_CONNECTIONS: usize = 1;

/// A connection in a slot; `id` tells a replaced connection from its successor.
struct Conn {
    id: u64,
    sender: SendRequest<Full<Bytes>>,
}

pub struct ApnsClient {
    endpoints: [Endpoint; 2],
    conn_ids: AtomicU64,
    tls: TlsConnector,
    settings: ClientSettings,
    metrics: Metrics,
}

/// What APNs connections trust: the public roots (Mozilla's list, compiled in)
/// plus `extra_pem` (`apns.ca_file`).
pub fn trusted_roots(extra_pem: Option<&[u8]>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_pem {
        crate::tls::add_pem_roots(&mut roots, pem)?;
    }
    Ok(roots)
}

/// Splits `https://host[:port][/]` into host and port.
fn parse_base_url(url: &str) -> Result<(String, String, u16), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?} is not an https:// URL"))?;
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') {
        return Err(format!("{url:?} must be a bare origin without a path"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed ["))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or(""))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), ""),
        }
    };
    let port = if port.is_empty() {
        443
    } else {
        port.parse().map_err(|_| format!("{url:?}: bad port"))?
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((format!("https://{authority}"), host, port))
}

impl ApnsClient {
    pub fn new(settings: ClientSettings, metrics: Metrics) -> Result<Self, String> {
        Self::with_identity(settings, metrics, None)
    }

    /// A client whose connections authenticate with `identity`, a VoIP Services
    /// certificate, in the TLS handshake (one certificate per client, so per
    /// connection pool); `None`: provider tokens only.
    pub fn with_identity(
        settings: ClientSettings,
        metrics: Metrics,
        identity: Option<&super::cert::ClientIdentity>,
    ) -> Result<Self, String> {
        let roots = trusted_roots(settings.extra_roots_pem.as_deref())?;
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut tls = match identity {
            Some(id) => tls
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(|e| format!("certificate {}: {e}", id.path.display()))?,
            None => tls.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"h2".to_vec()];

        let endpoint = |environment, url: &str| -> Result<Endpoint, String> {
            let (base, host, port) = parse_base_url(url)?;
            Ok(Endpoint {
                environment,
                base,
                host,
                port,
                slots: (0..settings.connections_per_environment.max(1) + PROBATION_CONNECTIONS)
                    .map(|_| tokio::sync::Mutex::new(None))
                    .collect(),
                trusted: settings.connections_per_environment.max(1),
                next: AtomicUsize::new(0),
                next_probation: AtomicUsize::new(0),
            })
        };
        Ok(Self {
            endpoints: [
                endpoint(Environment::Production, &settings.production_url)?,
                endpoint(Environment::Sandbox, &settings.sandbox_url)?,
            ],
            conn_ids: AtomicU64::new(0),
            tls: TlsConnector::from(Arc::new(tls)),
            settings,
            metrics,
        })
    }

    fn endpoint(&self, env: Environment) -> &Endpoint {
        match env {
            Environment::Production => &self.endpoints[0],
            Environment::Sandbox => &self.endpoints[1],
        }
    }

    /// Opens a TLS + HTTP/2 connection and checks that `h2` was negotiated.
    async fn connect(&self, ep: &Endpoint) -> Result<SendRequest<Full<Bytes>>, SendError> {
        let environment = ep.environment.as_str();
        let fail = |detail: String| SendError::Connect {
            environment,
            detail,
        };
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| fail(format!("{}:{}: {e}", ep.host, ep.port)))?;
        let _ = tcp.set_nodelay(true);
        let server_name = ServerName::try_from(ep.host.clone()).map_err(|e| fail(e.to_string()))?;
        let tls = self
            .tls
            .connect(server_name, tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2".as_slice()) {
            return Err(fail("the server did not negotiate HTTP/2 (ALPN h2)".into()));
        }
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.settings.ping_interval)
            .keep_alive_timeout(self.settings.ping_timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fail(format!("HTTP/2 handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(environment, error = %e, "APNs connection closed");
            }
        });
        self.metrics
            .apns_connections_opened
            .with_label_values(&[environment])
            .inc();
        debug!(environment, host = %ep.host, port = ep.port, "APNs connection opened");
        Ok(sender)
    }

    /// A live connection of `ep`, round robin over its slots, opening one if the
    /// slot is empty or its connection has closed. Returns (slot, connection id, sender).
    async fn sender(
        &self,
        ep: &Endpoint,
        lane: Lane,
    ) -> Result<(usize, u64, SendRequest<Full<Bytes>>), SendError> {
        let idx = match lane {
            Lane::Trusted => ep.next.fetch_add(1, Ordering::Relaxed) % ep.trusted,
            Lane::Probation => {
                let probation = ep.slots.len() - ep.trusted;
                ep.trusted + ep.next_probation.fetch_add(1, Ordering::Relaxed) % probation
            }
        };
        let mut slot = ep.slots[idx].lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.sender.is_closed() {
                return Ok((idx, c.id, c.sender.clone()));
            }
        }
        let sender = self.connect(ep).await?;
        let id = self.conn_ids.fetch_add(1, Ordering::Relaxed);
        *slot = Some(Conn {
            id,
            sender: sender.clone(),
        });
        Ok((idx, id, sender))
    }

    /// Forgets connection `id` after it failed or left a request unanswered, unless
    /// it was already replaced. Streams still under way on it finish on their own.
    async fn discard(&self, ep: &Endpoint, idx: usize, id: u64) {
        let mut slot = ep.slots[idx].lock().await;
        if slot.as_ref().is_some_and(|c| c.id == id) {
            *slot = None;
            debug!(
                environment = ep.environment.as_str(),
                "APNs connection discarded"
            );
        }
    }

    /// Drops every connection of `env`, so the next request opens a new one
    /// (after GOAWAY, `Shutdown`, `IdleTimeout`, `UnrelatedKeyIdInToken`).
    pub async fn reset(&self, env: Environment) {
        for slot in &self.endpoint(env).slots {
            *slot.lock().await = None;
        }
    }

    /// Sends one push. `Ok` carries whatever APNs answered; `Err` means there was no
    /// answer (connect failure, timeout, connection lost).
    /// `timeout` is capped at the configured request timeout; callers pass the time
    /// left before the call's ring deadline.
    pub async fn send(
        &self,
        env: Environment,
        req: &PushRequest,
        timeout: Duration,
    ) -> Result<ApnsResponse, SendError> {
        self.send_on(env, Lane::Trusted, req, timeout).await
    }

    /// [`ApnsClient::send`] on the connections of `lane`.
    pub async fn send_on(
        &self,
        env: Environment,
        lane: Lane,
        req: &PushRequest,
        timeout: Duration,
    ) -> Result<ApnsResponse, SendError> {
        let ep = self.endpoint(env);
        let environment = env.as_str();
        let timeout = timeout.min(self.settings.request_timeout);
        let started = Instant::now();
        // The connection in use, so a timeout can discard it: a request unanswered
        // for the whole timeout means the connection is as good as dead.
        let in_use: std::sync::Mutex<Option<(usize, u64)>> = std::sync::Mutex::new(None);
        let attempt = async {
            let request = build_request(&ep.base, req)?;
            let (idx, id, mut sender) = self.sender(ep, lane).await?;
            *in_use.lock().expect("in_use lock") = Some((idx, id));
            let result = async {
                let response = sender.send_request(request).await?;
                let status = response.status().as_u16();
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let (apns_id, date) = (header("apns-id"), header("date"));
                let body = Limited::new(response.into_body(), MAX_RESPONSE_BODY)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                Ok::<_, hyper::Error>((status, apns_id, date, body))
            }
            .await;
            match result {
                Ok(r) => Ok(r),
                Err(e) => {
                    self.discard(ep, idx, id).await;
                    Err(SendError::Transport {
                        environment,
                        detail: e.to_string(),
                    })
                }
            }
        };
        let outcome = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => {
                let used = *in_use.lock().expect("in_use lock");
                if let Some((idx, id)) = used {
                    self.discard(ep, idx, id).await;
                }
                Err(SendError::Timeout {
                    environment,
                    timeout_ms: timeout.as_millis(),
                })
            }
        };
        let latency = started.elapsed();
        self.metrics
            .apns_request_duration
            .with_label_values(&[environment])
            .observe(latency.as_secs_f64());
        match outcome {
            Ok((status, apns_id, date, body)) => {
                let (reason, timestamp_ms) = parse_error_body(&body);
                self.metrics
                    .apns_requests
                    .with_label_values(&[
                        environment,
                        code_label(status),
                        reason_label(reason.as_deref()),
                    ])
                    .inc();
                Ok(ApnsResponse {
                    status,
                    reason,
                    apns_id,
                    timestamp_ms,
                    latency,
                    date,
                })
            }
            Err(e) => {
                self.metrics
                    .apns_requests
                    .with_label_values(&[environment, "error", e.label()])
                    .inc();
                warn!(environment, error = %e, "APNs request got no answer");
                Err(e)
            }
        }
    }
}

/// The HTTP/2 request of one push. Refuses, rather than panics on, a part that is
/// not a valid header value (event parsing keeps such ids out; this is the last
/// line).
pub fn build_request(base: &str, req: &PushRequest) -> Result<Request<Full<Bytes>>, SendError> {
    let mut builder = Request::post(format!("{base}/3/device/{}", req.token));
    // Empty for a certificate app: the TLS handshake authenticated it.
    if !req.provider_token.is_empty() {
        builder = builder.header("authorization", format!("bearer {}", req.provider_token));
    }
    builder
        .header("apns-push-type", "voip")
        .header("apns-topic", &req.topic)
        .header("apns-priority", req.priority.to_string())
        .header("apns-expiration", req.expiration.to_string())
        .header("apns-collapse-id", &req.collapse_id)
        .header("apns-id", req.apns_id.hyphenated().to_string())
        .header("content-type", "application/json")
        .body(Full::new(req.payload.clone()))
        .map_err(|e| SendError::Request {
            detail: e.to_string(),
        })
}

/// Apple's error body: `{"reason": "...", "timestamp": 1234}`. Anything unparseable
/// yields no reason, and the status code decides.
fn parse_error_body(body: &[u8]) -> (Option<String>, Option<i64>) {
    if body.is_empty() {
        return (None, None);
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None);
    };
    (
        v.get("reason").and_then(|r| r.as_str()).map(str::to_string),
        v.get("timestamp").and_then(|t| t.as_i64()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_parse() {
        assert_eq!(
            parse_base_url("https://api.push.apple.com").unwrap(),
            (
                "https://api.push.apple.com".into(),
                "api.push.apple.com".into(),
                443
            )
        );
        assert_eq!(
            parse_base_url("https://127.0.0.1:2197/").unwrap(),
            ("https://127.0.0.1:2197".into(), "127.0.0.1".into(), 2197)
        );
        assert_eq!(parse_base_url("https://[::1]:2197").unwrap().1, "::1");
        assert!(parse_base_url("http://api.push.apple.com").is_err());
        assert!(parse_base_url("https://host/3/device").is_err());
    }

    #[test]
    fn error_bodies_parse() {
        assert_eq!(
            parse_error_body(br#"{"reason":"Unregistered","timestamp":1700000000000}"#),
            (Some("Unregistered".into()), Some(1_700_000_000_000))
        );
        assert_eq!(parse_error_body(b""), (None, None));
        assert_eq!(parse_error_body(b"<html>"), (None, None));
    }
}
