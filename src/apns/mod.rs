//! APNs delivery: the HTTP/2 client, provider tokens, the response table, and the
//! attempt loop for one device (environment fallback, retries within the ring).

mod attempts;
pub mod cert;
pub mod client;
mod connection;
pub mod guard;
pub mod outcome;
pub mod request;
mod sender;
pub mod token;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use attempts::{AttemptHooks, DeliveryOutcome, DevicePush, FinalAction, NoHooks};
pub use client::{ApnsClient, ApnsResponse, ClientSettings, Lane, PushRequest, SendError};
pub use connection::PingSettings;
pub use outcome::{classify, Action};
pub use request::PushType;
pub use sender::ApnsSender;
pub use token::{ProviderToken, SigningKey};

use crate::config::{AppConfig, Config};
use crate::event::Environment;
use crate::metrics::Metrics;
pub use crate::store::calls::AttemptRecord;

pub use crate::retry_policy::RetryPolicy;

/// A configured app with the provider token and connections of its signing key.
pub struct App {
    pub config: AppConfig,
    pub topic: String,
    pub tokens: Arc<ProviderToken>,
    /// APNs binds a connection to the key of its first push
    /// (`UnrelatedKeyIdInToken` otherwise), so each key has connections of its own,
    /// shared by the apps it signs for. A certificate app has a client of its
    /// own; unit tests put a scripted sender here.
    pub client: Arc<dyn ApnsSender>,
    /// Whether this app's token-level refusals may invalidate tokens yet.
    pub guard: guard::AppGuard,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Key(#[from] token::KeyError),
    #[error(transparent)]
    Cert(#[from] cert::CertError),
    #[error("APNs client: {0}")]
    Client(String),
    #[error("cannot read APNs CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
}

/// Everything needed to push: each app's provider token and connections.
pub struct Apns {
    apps: Vec<App>,
    pub default_environment: Environment,
    pub retry: RetryPolicy,
}

impl Apns {
    pub fn from_config(cfg: &Config, metrics: Metrics) -> Result<Self, SetupError> {
        let extra_roots_pem = match &cfg.apns.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|source| SetupError::CaFile {
                path: path.display().to_string(),
                source,
            })?),
            None => None,
        };
        let settings = ClientSettings {
            production_url: cfg.apns.production_url.clone(),
            sandbox_url: cfg.apns.sandbox_url.clone(),
            extra_roots_pem,
            connections_per_environment: cfg.apns.connections_per_environment,
            request_timeout: Duration::from_millis(cfg.apns.request_timeout_ms),
            pings: cfg.apns.ping_settings(),
        };
        // One provider token and one set of connections per signing key, shared by
        // every app signed with it.
        type KeyParts = (Arc<ProviderToken>, Arc<ApnsClient>);
        let mut by_key: HashMap<(String, String), KeyParts> = HashMap::new();
        let mut apps = Vec::new();
        for app in cfg.apps() {
            for reason in ["BadDeviceToken", "DeviceTokenNotForTopic"] {
                metrics
                    .apns_suspect_refusals
                    .with_label_values(&[&app.bundle_id, reason]);
            }
            let id = (app.team_id.clone(), app.key_id.clone());
            let (tokens, client) = if app.uses_certificate() {
                cert::app_parts(&app, &settings, &metrics)?
            } else {
                match by_key.get(&id) {
                    Some(parts) => parts.clone(),
                    None => {
                        let key =
                            SigningKey::from_p8_file(&app.key_file, &app.team_id, &app.key_id)?;
                        let parts = (
                            Arc::new(ProviderToken::new(key, metrics.clone())),
                            Arc::new(
                                ApnsClient::new(settings.clone(), metrics.clone())
                                    .map_err(SetupError::Client)?,
                            ),
                        );
                        by_key.insert(id, parts.clone());
                        parts
                    }
                }
            };
            let guard = guard::AppGuard::new(cfg.apns.misconfigured_after_devices).exported_in(
                metrics
                    .apns_app_misconfigured
                    .with_label_values(&[&app.bundle_id]),
            );
            apps.push(App {
                topic: app.voip_topic(),
                config: app,
                tokens,
                client,
                guard,
            });
        }
        let retry = RetryPolicy::doubling(
            Duration::from_millis(cfg.worker.retry_min_delay_ms),
            Duration::from_millis(cfg.worker.retry_max_delay_ms),
        )
        .jittered();
        Ok(Self::with_apps(apps, cfg.apns.default_environment, retry))
    }

    /// Pushes for `apps` as they are (the pipeline's unit tests give theirs
    /// scripted senders).
    pub fn with_apps(apps: Vec<App>, default_environment: Environment, retry: RetryPolicy) -> Self {
        Self {
            apps,
            default_environment,
            retry,
        }
    }

    /// The app an event names, or the first configured one.
    pub fn app(&self, bundle_id: Option<&str>) -> Option<&App> {
        match bundle_id {
            Some(b) => self.apps.iter().find(|a| a.config.bundle_id == b),
            None => self.apps.first(),
        }
    }

    pub fn apps(&self) -> &[App] {
        &self.apps
    }
}
