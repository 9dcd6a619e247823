//! The APNs settings: endpoints, connections, PINGs and probes, and the apps that
//! can receive calls with the key or certificate each authenticates with.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::Environment;

/// One app that can receive calls: its bundle id and how it authenticates — the
/// team key that signs provider tokens, or a VoIP Services certificate.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct AppConfig {
    pub bundle_id: String,
    pub team_id: String,
    pub key_id: String,
    /// Path of the `.p8` (PKCS#8 P-256) signing key. Its contents never enter logs.
    pub key_file: PathBuf,
    /// Instead of a key: the VoIP Services certificate with its private key, PEM
    /// or PKCS#12 (`.p12`), for TLS client authentication.
    pub cert_file: Option<PathBuf>,
    /// The PKCS#12 file's password (the file's contents without a trailing
    /// newline); none: the empty password. Never logged.
    pub cert_password_file: Option<PathBuf>,
}

impl AppConfig {
    /// The APNs topic for VoIP pushes of this app.
    pub fn voip_topic(&self) -> String {
        format!("{}.voip", self.bundle_id)
    }

    /// Authenticates with a certificate rather than provider tokens.
    pub fn uses_certificate(&self) -> bool {
        self.cert_file.is_some()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct ApnsConfig {
    pub production_url: String,
    pub sandbox_url: String,
    pub ca_file: Option<PathBuf>,
    /// Shorthand for a single app; merged into `apps` by [`Config::apps`](super::Config::apps).
    pub team_id: String,
    pub key_id: String,
    pub key_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub cert_password_file: Option<PathBuf>,
    pub bundle_id: String,
    pub apps: Vec<AppConfig>,
    pub default_environment: Environment,
    /// Upper bound of one APNs request (connect + answer). Apple usually answers in
    /// well under a second; 10 s leaves room for a congested link without letting a
    /// dead connection eat a whole 45 s ring.
    pub request_timeout_ms: u64,
    /// HTTP/2 connections kept per environment, spread over round robin.
    pub connections_per_environment: usize,
    /// HTTP/2 PING period of an idle connection and its answer timeout: a
    /// connection whose peer vanished silently is dropped within interval +
    /// timeout, not at the next TCP timeout.
    pub ping_interval_secs: u64,
    pub ping_timeout_secs: u64,
    /// Distinct devices whose tokens (or whose app's key or topic) APNs refused
    /// with no success in between that mark an app misconfigured: its refused
    /// deliveries end `app_misconfigured` and the alert fires until a success.
    /// 10: a handful of dead tokens in a row is normal for a user with old
    /// phones; ten distinct devices and not one success is a configuration.
    pub misconfigured_after_devices: usize,
    /// A push unanswered this long has its connection PINGed (0: never). APNs
    /// answers in tens of milliseconds; a second without a word on a path that
    /// may have died is when a ring starts to be late.
    pub probe_after_ms: u64,
    /// That PING unanswered this long retires the connection and resends its
    /// pushes: a PING answer is one round trip, well under a second to Apple
    /// from anywhere, so a second more is a dead path, not a slow one.
    pub probe_timeout_ms: u64,
}

impl ApnsConfig {
    /// The PING settings (zeros, which validation refuses but `doctor` may
    /// read, become the shortest sensible value).
    pub fn ping_settings(&self) -> crate::apns::PingSettings {
        crate::apns::PingSettings {
            interval: Duration::from_secs(self.ping_interval_secs.max(1)),
            timeout: Duration::from_secs(self.ping_timeout_secs.max(1)),
            probe_after: Duration::from_millis(self.probe_after_ms),
            probe_timeout: Duration::from_millis(self.probe_timeout_ms.max(1)),
        }
    }
}

impl Default for ApnsConfig {
    fn default() -> Self {
        Self {
            production_url: "https://api.push.apple.com".into(),
            sandbox_url: "https://api.sandbox.push.apple.com".into(),
            ca_file: None,
            team_id: String::new(),
            key_id: String::new(),
            key_file: None,
            cert_file: None,
            cert_password_file: None,
            bundle_id: String::new(),
            apps: Vec::new(),
            default_environment: Environment::Production,
            request_timeout_ms: 10_000,
            connections_per_environment: 2,
            ping_interval_secs: 15,
            ping_timeout_secs: 5,
            misconfigured_after_devices: 10,
            probe_after_ms: 1_000,
            probe_timeout_ms: 1_000,
        }
    }
}
