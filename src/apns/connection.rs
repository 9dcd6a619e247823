//! One HTTP/2 connection to APNs and the task that watches it.
//!
//! A network path can die silently: bytes vanish, nothing is closed, and a push
//! waits for its whole request timeout. So the connection is probed with an
//! HTTP/2 PING as soon as a push has gone unanswered for a short while
//! (`probe_after`); a PING unanswered within `probe_timeout` retires the
//! connection, which fails every push still on it at once, to be resent on a
//! fresh one. An idle connection is PINGed every `ping_interval` as Apple asks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, PingPong};
use hyper::Request;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::request::{SendError, MAX_RESPONSE_BODY};
use crate::metrics::Metrics;

/// When and how long to wait for PING answers.
#[derive(Clone, Copy, Debug)]
pub struct PingSettings {
    /// An idle connection is PINGed this often.
    pub interval: Duration,
    /// An idle PING unanswered this long retires the connection.
    pub timeout: Duration,
    /// A push unanswered this long has its connection PINGed; zero: never.
    pub probe_after: Duration,
    /// That PING unanswered this long retires the connection.
    pub probe_timeout: Duration,
}

/// What a connection's requests and its watcher share.
struct Shared {
    environment: &'static str,
    /// Set by the watcher when it retires the connection for an unanswered PING.
    retired: AtomicBool,
    /// Set when the connection ended, for any reason.
    closed: AtomicBool,
    /// A push asks for a probe.
    probe: Notify,
    /// When the last PING that was answered had been sent: everything written
    /// before it reached APNs, so pushes sent earlier need no probe of their own.
    acked_ping_sent_at: Mutex<Instant>,
}

/// A live connection; `id` tells a replaced connection from its successor.
pub(super) struct Conn {
    pub id: u64,
    sender: SendRequest<Bytes>,
    shared: Arc<Shared>,
    probe_after: Duration,
}

/// What came back for one request.
pub(super) struct Answer {
    pub status: u16,
    pub apns_id: Option<String>,
    /// The `date` header: APNs' clock, which `doctor` compares with ours.
    pub date: Option<String>,
    pub body: Bytes,
}

/// Opens a TLS + HTTP/2 connection, checks that `h2` was negotiated, and starts
/// the task that drives and watches it.
pub(super) async fn open(
    tls: &TlsConnector,
    (environment, host, port): (&'static str, &str, u16),
    id: u64,
    pings: PingSettings,
    metrics: &Metrics,
) -> Result<Conn, SendError> {
    let fail = |detail: String| SendError::Connect {
        environment,
        detail,
    };
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| fail(format!("{host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let server_name = ServerName::try_from(host.to_string()).map_err(|e| fail(e.to_string()))?;
    let tls = tls
        .connect(server_name, tcp)
        .await
        .map_err(|e| fail(format!("TLS: {e}")))?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2".as_slice()) {
        return Err(fail("the server did not negotiate HTTP/2 (ALPN h2)".into()));
    }
    let (sender, mut connection) = h2::client::Builder::new()
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| fail(format!("HTTP/2 handshake: {e}")))?;
    let ping_pong = connection
        .ping_pong()
        .ok_or_else(|| fail("HTTP/2 PINGs unavailable".into()))?;
    let shared = Arc::new(Shared {
        environment,
        retired: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        probe: Notify::new(),
        acked_ping_sent_at: Mutex::new(Instant::now()),
    });
    tokio::spawn(watch(
        connection,
        ping_pong,
        shared.clone(),
        pings,
        metrics.clone(),
    ));
    metrics
        .apns_connections_opened
        .with_label_values(&[environment])
        .inc();
    debug!(environment, host, port, "APNs connection opened");
    Ok(Conn {
        id,
        sender,
        shared,
        probe_after: pings.probe_after,
    })
}

#[derive(Clone, Copy)]
enum PingKind {
    Idle,
    Probe,
}

impl PingKind {
    fn as_str(self) -> &'static str {
        match self {
            PingKind::Idle => "idle",
            PingKind::Probe => "probe",
        }
    }
}

/// Drives the connection until it ends or a PING goes unanswered; then drops it,
/// which fails every stream still open on it.
async fn watch<T>(
    connection: h2::client::Connection<T, Bytes>,
    mut ping_pong: PingPong,
    shared: Arc<Shared>,
    pings: PingSettings,
    metrics: Metrics,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let environment = shared.environment;
    tokio::pin!(connection);
    loop {
        let kind = tokio::select! {
            r = &mut connection => {
                if let Err(e) = r {
                    debug!(environment, error = %e, "APNs connection closed");
                }
                break;
            }
            _ = shared.probe.notified() => PingKind::Probe,
            _ = tokio::time::sleep(pings.interval) => PingKind::Idle,
        };
        let timeout = match kind {
            PingKind::Idle => pings.timeout,
            PingKind::Probe => pings.probe_timeout,
        };
        metrics
            .apns_pings
            .with_label_values(&[environment, kind.as_str()])
            .inc();
        let sent_at = Instant::now();
        // The connection must be driven for the PING to go out and its answer to
        // be read.
        let answered = tokio::select! {
            r = &mut connection => {
                if let Err(e) = r {
                    debug!(environment, error = %e, "APNs connection closed");
                }
                break;
            }
            r = tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())) => r,
        };
        match answered {
            Ok(Ok(_)) => *shared.acked_ping_sent_at.lock().expect("ping lock") = sent_at,
            Ok(Err(e)) => {
                debug!(environment, error = %e, "APNs connection failed a PING");
                break;
            }
            Err(_) => {
                shared.retired.store(true, Ordering::SeqCst);
                metrics
                    .apns_connections_retired
                    .with_label_values(&[environment, kind.as_str()])
                    .inc();
                warn!(
                    environment,
                    kind = kind.as_str(),
                    timeout_ms = timeout.as_millis() as u64,
                    "APNs connection did not answer a PING; retiring it and resending its pushes"
                );
                break;
            }
        }
    }
    shared.closed.store(true, Ordering::SeqCst);
    // Dropping the connection here fails its open streams with an error.
}

impl Conn {
    /// Whether the connection has ended (new requests need another).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Sends one request with its body and waits for the answer, asking for a
    /// probe of the connection whenever the answer is `probe_after` late.
    pub async fn exchange(&self, request: Request<()>, body: Bytes) -> Result<Answer, SendError> {
        let environment = self.shared.environment;
        let unsent = |e: h2::Error| SendError::Transport {
            environment,
            detail: e.to_string(),
            sent: false,
        };
        let mut sender = self.sender.clone().ready().await.map_err(unsent)?;
        let (response, mut stream) = sender.send_request(request, false).map_err(unsent)?;
        stream.send_data(body, true).map_err(unsent)?;
        // Above APNs' stream limit the stream waits here, unsent, for its turn.
        sender.ready().await.map_err(unsent)?;
        let sent_at = Instant::now();
        let lost = |e: h2::Error| self.lost(e, sent_at);
        tokio::pin!(response);
        let response = loop {
            if self.probe_after.is_zero() {
                break response.await.map_err(lost)?;
            }
            tokio::select! {
                r = &mut response => break r.map_err(lost)?,
                _ = tokio::time::sleep(self.probe_after) => {
                    let acked = *self.shared.acked_ping_sent_at.lock().expect("ping lock");
                    // A PING sent after the push and answered proves the push
                    // reached APNs, which is just slow; otherwise probe.
                    if acked < sent_at {
                        self.shared.probe.notify_one();
                    }
                }
            }
        };
        let status = response.status().as_u16();
        let header = |name: hyper::header::HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (apns_id, date) = (header(super::request::APNS_ID), header(hyper::header::DATE));
        let mut body = response.into_body();
        let mut collected = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(lost)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if collected.len() + chunk.len() > MAX_RESPONSE_BODY {
                break;
            }
            collected.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            apns_id,
            date,
            body: collected.into(),
        })
    }

    /// The error of a request that had gone out when its stream failed.
    fn lost(&self, e: h2::Error, sent_at: Instant) -> SendError {
        let environment = self.shared.environment;
        if self.shared.retired.load(Ordering::SeqCst) {
            SendError::Unanswered {
                environment,
                waited_ms: sent_at.elapsed().as_millis(),
            }
        } else if e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM) {
            // APNs refused the stream before processing it: certainly not sent on.
            SendError::Transport {
                environment,
                detail: e.to_string(),
                sent: false,
            }
        } else {
            SendError::Transport {
                environment,
                detail: e.to_string(),
                sent: true,
            }
        }
    }
}
