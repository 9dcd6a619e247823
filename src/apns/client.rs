//! A small HTTP/2 client for APNs: a base URL per environment (so a simulator or
//! staging host can stand in for Apple), extra trusted roots, a pool of a few
//! long-lived connections per environment ([`connection`] watches each), and
//! every answer returned as a value — a rejected push is data, not an error.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::connection::{self, Conn, PingSettings};
use super::outcome::{code_label, reason_label};
use super::request::{build_request, parse_base_url, parse_error_body};
pub use super::request::{ApnsResponse, PushRequest, SendError};
use crate::event::Environment;
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub production_url: String,
    pub sandbox_url: String,
    pub extra_roots_pem: Option<Vec<u8>>,
    pub connections_per_environment: usize,
    pub request_timeout: Duration,
    /// PINGs of idle connections, and of those leaving a push unanswered
    /// ([`connection`]).
    pub pings: PingSettings,
}

struct Endpoint {
    environment: Environment,
    /// `https://host:port` as configured, used to build request URIs.
    base: String,
    host: String,
    port: u16,
    /// `trusted` connections first, then the probation ones.
    slots: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
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

    /// A live connection of `ep`, round robin over its slots, opening one if the
    /// slot is empty or its connection has closed. Returns (slot, connection).
    async fn conn(&self, ep: &Endpoint, lane: Lane) -> Result<(usize, Arc<Conn>), SendError> {
        let idx = match lane {
            Lane::Trusted => ep.next.fetch_add(1, Ordering::Relaxed) % ep.trusted,
            Lane::Probation => {
                let probation = ep.slots.len() - ep.trusted;
                ep.trusted + ep.next_probation.fetch_add(1, Ordering::Relaxed) % probation
            }
        };
        let mut slot = ep.slots[idx].lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_closed() {
                return Ok((idx, c.clone()));
            }
        }
        let id = self.conn_ids.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(
            connection::open(
                &self.tls,
                (ep.environment.as_str(), &ep.host, ep.port),
                id,
                self.settings.pings,
                &self.metrics,
            )
            .await?,
        );
        *slot = Some(conn.clone());
        Ok((idx, conn))
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
            let (idx, conn) = self.conn(ep, lane).await?;
            *in_use.lock().expect("in_use lock") = Some((idx, conn.id));
            let answer = conn.exchange(request, req.payload.clone()).await;
            if answer.is_err() {
                self.discard(ep, idx, conn.id).await;
            }
            answer
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
            Ok(connection::Answer {
                status,
                apns_id,
                date,
                body,
            }) => {
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
