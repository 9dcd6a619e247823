//! The APNs simulator: production and sandbox as two TLS + HTTP/2 listeners with
//! separate token registries, Apple's validation rules, scripted answers, a record
//! of every request, and a plain-HTTP control API. Used in-process by tests and
//! `demo`, and standalone by `voip-push-worker apns-sim`.

pub mod certs;
mod control;
pub mod faults;
mod server;
pub mod tls;
pub mod validate;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::apns::token::{unix_now, KeyError, SigningKey};
use crate::config::AppConfig;
use crate::event::Environment;

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
    /// Certificate apps need no entry: the simulator's CA vouches for them.
    pub fn from_config(apps: &[AppConfig]) -> Result<Vec<SimApp>, KeyError> {
        apps.iter()
            .filter(|a| !a.uses_certificate())
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
    /// The subject (`UID=…, CN=…`) of the client certificate its connection
    /// presented, if any.
    #[serde(default)]
    pub client_certificate: Option<String>,
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
    /// A PushKit token (the default) or the app's alert token.
    #[serde(default)]
    pub kind: TokenKind,
}

/// A device has two tokens: PushKit's takes VoIP pushes only, the app's alert
/// token every other push type; each refuses the other's with
/// `DeviceTokenNotForTopic`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    #[default]
    Voip,
    Alert,
}

#[derive(Default)]
struct SimState {
    apps: Vec<SimApp>,
    /// (environment, token) → bundle id and kind.
    tokens: Mutex<HashMap<(Environment, String), (String, TokenKind)>>,
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
    /// The CA that signed the simulator's certificate, for `VPW__APNS__CA_FILE`;
    /// it also issues the client certificates the simulator accepts.
    pub ca_pem: String,
    issuer: Arc<rcgen::Issuer<'static, rcgen::KeyPair>>,
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
            tokio::spawn(server::serve_apns(
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
                let router = control::control_router(state.clone());
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
            issuer: tls.issuer,
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

    /// A client certificate from the simulator's CA, which it accepts as APNs
    /// accepts Apple's (see [`certs::CertSpec::voip`]).
    pub fn issue_client_cert(&self, spec: &certs::CertSpec) -> Result<certs::IssuedCert, String> {
        certs::issue(&self.issuer, spec)
    }

    /// Makes `token` a valid device token of `bundle_id` in `env` (only there).
    pub fn register_token(&self, env: Environment, token: &str, bundle_id: &str) {
        self.register_token_of_kind(env, token, bundle_id, TokenKind::Voip);
    }

    /// Makes `token` a valid `kind` token of `bundle_id` in `env`.
    pub fn register_token_of_kind(
        &self,
        env: Environment,
        token: &str,
        bundle_id: &str,
        kind: TokenKind,
    ) {
        self.state.tokens.lock().expect("sim lock").insert(
            (env, token.to_ascii_lowercase()),
            (bundle_id.to_string(), kind),
        );
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
