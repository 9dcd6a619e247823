//! Serving the listener ourselves rather than with `axum::serve`, for the limits
//! a public API needs and `axum::serve` does not offer: a cap on open
//! connections, a deadline for each request's head (hyper's
//! `header_read_timeout`, which also closes idle keep-alive connections) and
//! one for its body (`read_body_in_time`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::api::ApiError;
use crate::config::HttpConfig;
use crate::metrics::{Held, Metrics};

/// After an accept error (out of file descriptors, say), pause rather than spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

pub struct Listener {
    pub listener: TcpListener,
    pub router: Router,
    pub metrics: Metrics,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long shutdown waits for open connections (requests under way, long
    /// polls) before it returns anyway.
    pub drain: Duration,
}

impl Listener {
    /// Accepts until `shutdown`, then lets the open connections finish their
    /// request (for at most `drain`).
    pub async fn serve(self, shutdown: CancellationToken) {
        let max = self.max_connections;
        let slots = Arc::new(Semaphore::new(max));
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "the HTTP listener could not accept a connection");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Closed before a byte is read: the client sees the connection
                // end at once instead of waiting in a queue.
                self.metrics.http_connections_refused.inc();
                drop(stream);
                continue;
            };
            let open = Held::new(&self.metrics.http_connections);
            let conn = Connection {
                http: http.clone(),
                router: self.router.clone(),
                metrics: self.metrics.clone(),
                peer,
            };
            let stop = shutdown.clone();
            tokio::spawn(async move {
                conn.run(stream, stop).await;
                drop((open, slot));
            });
        }
        // Every slot back means every connection has ended.
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        if tokio::time::timeout(self.drain, slots.acquire_many(all))
            .await
            .is_err()
        {
            warn!(
                "HTTP connections still open after {:?}; leaving them",
                self.drain
            );
        }
    }
}

struct Connection {
    http: http1::Builder,
    router: Router,
    metrics: Metrics,
    peer: SocketAddr,
}

impl Connection {
    async fn run(self, stream: TcpStream, shutdown: CancellationToken) {
        let _ = stream.set_nodelay(true);
        let (router, peer) = (self.router, self.peer);
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            // What `into_make_service_with_connect_info` would add: the rate
            // limit reads it.
            req.extensions_mut().insert(ConnectInfo(peer));
            tower_service::Service::call(&mut router.clone(), req)
        });
        let conn = self.http.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let done = tokio::select! {
            done = conn.as_mut() => done,
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        match done {
            Err(e) if e.is_timeout() => {
                self.metrics
                    .http_read_timeouts
                    .with_label_values(&["header"])
                    .inc();
                debug!(%peer, "HTTP client too slow to send a request head: closed");
            }
            Err(e) => debug!(%peer, error = %e, "HTTP connection ended with an error"),
            Ok(()) => {}
        }
    }
}

/// The body deadline and size limit every request is read under.
#[derive(Clone)]
pub struct BodyLimits {
    pub timeout: Duration,
    pub max_bytes: usize,
    pub metrics: Metrics,
}

impl BodyLimits {
    pub fn new(cfg: &HttpConfig, metrics: Metrics) -> Self {
        Self {
            timeout: cfg.body_read_timeout(),
            max_bytes: cfg.max_body_bytes,
            metrics,
        }
    }
}

/// Reads the whole body before the handler runs, within the body deadline and
/// the size limit: a client that sends a head and then trickles (or never
/// finishes) its body gets a 408 and its connection closed, instead of holding a
/// task and a connection for as long as it likes. Bodies are small here (16 KiB
/// at most), so buffering them first costs nothing a handler would not spend.
pub async fn read_body_in_time(
    State(limits): State<BodyLimits>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    if hyper::body::Body::is_end_stream(&body) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let read = Limited::new(body, limits.max_bytes).collect();
    match tokio::time::timeout(limits.timeout, read).await {
        Ok(Ok(collected)) => {
            let body = Body::from(collected.to_bytes());
            next.run(Request::from_parts(parts, body)).await
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => closing(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "request body is too large",
        )),
        Ok(Err(e)) => closing(ApiError::bad_request(
            "bad_body",
            format!("could not read the body: {e}"),
        )),
        Err(_) => {
            limits
                .metrics
                .http_read_timeouts
                .with_label_values(&["body"])
                .inc();
            closing(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {:?}",
                    limits.timeout
                ),
            ))
        }
    }
}

/// An answer after which the connection is closed: the rest of the body is
/// unread, so the connection cannot carry another request.
fn closing(e: ApiError) -> Response {
    let mut r = e.into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}
