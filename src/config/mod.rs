//! The configuration tree: built-in defaults, then an optional TOML file, then
//! `VPW__SECTION__KEY` environment variables. Validation happens once, here, so a
//! bad deployment fails at start with one clear line instead of at the first call.

mod apns;
mod backends;
mod connections;
pub mod secrets;
mod worker;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use apns::{ApnsConfig, AppConfig};
pub use backends::{DevicesConfig, HttpConfig, StoreConfig, TwilioConfig};
pub use connections::{AmqpConfig, PostgresConfig};
pub use worker::{CancelPush, WorkerConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    pub amqp: AmqpConfig,
    pub postgres: PostgresConfig,
    pub http: HttpConfig,
    pub apns: ApnsConfig,
    pub worker: WorkerConfig,
    pub twilio: TwilioConfig,
    pub store: StoreConfig,
    pub devices: DevicesConfig,
}

impl Config {
    /// Loads defaults, then `file` (if any), then `VPW__*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, None)
    }

    /// Like [`Config::load`] with the environment given explicitly (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: Option<config::Map<String, String>>,
    ) -> Result<Self, ConfigError> {
        let cfg = Self::load_unvalidated_from(file, env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Like [`Config::load_from`] without [`Config::validate`] (`doctor` reports
    /// what is wrong instead of stopping at the first problem).
    pub fn load_unvalidated_from(
        file: Option<&Path>,
        env: Option<config::Map<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        // No try_parsing: a bundle id or team id made of digits must stay a string.
        let env_source = config::Environment::with_prefix("VPW")
            .prefix_separator("__")
            .separator("__")
            .source(env);
        let built = secrets::resolve(builder.add_source(env_source).build()?)?;
        Ok(built.try_deserialize()?)
    }

    /// Every configured app: the `[[apns.apps]]` list plus the single-app shorthand.
    pub fn apps(&self) -> Vec<AppConfig> {
        let mut apps = self.apns.apps.clone();
        if !self.apns.bundle_id.is_empty()
            && !apps.iter().any(|a| a.bundle_id == self.apns.bundle_id)
        {
            apps.insert(
                0,
                AppConfig {
                    bundle_id: self.apns.bundle_id.clone(),
                    team_id: self.apns.team_id.clone(),
                    key_id: self.apns.key_id.clone(),
                    key_file: self.apns.key_file.clone().unwrap_or_default(),
                    cert_file: self.apns.cert_file.clone(),
                    cert_password_file: self.apns.cert_password_file.clone(),
                },
            );
        }
        apps
    }

    /// Checks what can be checked without touching the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.worker.concurrency == 0 {
            return invalid("worker.concurrency must be at least 1".into());
        }
        if self.worker.ring_timeout_secs == 0 {
            return invalid("worker.ring_timeout_secs must be at least 1".into());
        }
        if self.worker.ring_timeout_secs > self.worker.max_ring_timeout_secs {
            return invalid(format!(
                "worker.ring_timeout_secs ({}) is above worker.max_ring_timeout_secs ({})",
                self.worker.ring_timeout_secs, self.worker.max_ring_timeout_secs
            ));
        }
        if self.worker.retry_cap_secs == 0 {
            return invalid("worker.retry_cap_secs must be at least 1".into());
        }
        if self.apns.ping_interval_secs == 0
            || self.apns.ping_timeout_secs == 0
            || self.apns.probe_timeout_ms == 0
        {
            return invalid(
                "apns.ping_interval_secs, ping_timeout_secs and probe_timeout_ms must be at least 1"
                    .into(),
            );
        }
        if self.apns.connections_per_environment == 0 {
            return invalid("apns.connections_per_environment must be at least 1".into());
        }
        if self.apns.misconfigured_after_devices == 0 {
            return invalid("apns.misconfigured_after_devices must be at least 1".into());
        }
        if self.postgres.pool_size == 0 {
            return invalid("postgres.pool_size must be at least 1".into());
        }
        for url in [&self.apns.production_url, &self.apns.sandbox_url] {
            if !url.starts_with("https://") {
                return invalid(format!("APNs URL {url:?} must start with https://"));
            }
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid(format!(
                "http.listen {:?} is not an address like 0.0.0.0:9464",
                self.http.listen
            ));
        }
        if self
            .http
            .user_jwt_secret
            .as_deref()
            .is_some_and(|s| !s.is_empty())
            && self.http.user_jwt_public_key_file.is_some()
        {
            return invalid(
                "set http.user_jwt_secret or http.user_jwt_public_key_file, not both".into(),
            );
        }
        if self.http.max_body_bytes == 0 {
            return invalid("http.max_body_bytes must be at least 1".into());
        }
        self.http.validate_limits().map_err(ConfigError::Invalid)?;
        if !(1..=86_400).contains(&self.twilio.token_ttl_secs) {
            return invalid("twilio.token_ttl_secs must be between 1 and 86400".into());
        }
        for app in self.apps() {
            if app.bundle_id.is_empty() {
                return invalid("an app in apns.apps has no bundle_id".into());
            }
            if app.bundle_id.ends_with(".voip") {
                return invalid(format!(
                    "bundle id {:?} must not end in .voip: the worker adds the suffix to make the VoIP topic",
                    app.bundle_id
                ));
            }
            app_auth(&app).map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    /// Like [`Config::validate`], and additionally requires at least one app: what
    /// `run` needs to push anything at all.
    pub fn validate_for_push(&self) -> Result<(), ConfigError> {
        self.validate()?;
        if self.apps().is_empty() {
            return Err(ConfigError::Invalid(
                "no APNs app configured: set VPW__APNS__BUNDLE_ID, VPW__APNS__TEAM_ID, VPW__APNS__KEY_ID and VPW__APNS__KEY_FILE (or VPW__APNS__CERT_FILE), or [[apns.apps]] in the config file".into(),
            ));
        }
        Ok(())
    }
}

/// An app has a key (team id, key id, key file) or a certificate, not both.
fn app_auth(app: &AppConfig) -> Result<(), String> {
    let bundle = &app.bundle_id;
    if app.uses_certificate() {
        if !app.key_file.as_os_str().is_empty() {
            return Err(format!(
                "app {bundle:?} sets both key_file and cert_file: authenticate with a .p8 key or a certificate, not both"
            ));
        }
        return Ok(());
    }
    if app.cert_password_file.is_some() {
        return Err(format!(
            "app {bundle:?} sets cert_password_file without cert_file"
        ));
    }
    for (name, value) in [("team_id", &app.team_id), ("key_id", &app.key_id)] {
        if value.is_empty() {
            return Err(format!("app {bundle:?} has no {name}"));
        }
    }
    if app.key_file.as_os_str().is_empty() {
        return Err(format!("app {bundle:?} has no key_file (nor a cert_file)"));
    }
    Ok(())
}

impl Config {
    /// Names every queue and exchange the worker declares `{prefix}.<what>`
    /// (the call lanes' and the device events'), see [`AmqpConfig::name_objects`].
    pub fn name_amqp_objects(&mut self, prefix: &str) {
        self.amqp.name_objects(prefix);
        self.devices.exchange = format!("{prefix}.devices");
        self.devices.queue = format!("{prefix}.devices-q");
        self.devices.dead_letter_exchange = format!("{prefix}.devices-dlx");
        self.devices.dead_letter_queue = format!("{prefix}.devices-dead");
    }

    /// The queues and the exchanges the worker declares with this
    /// configuration: what a supervisor deletes after a run.
    pub fn amqp_objects(&self) -> ([&str; 5], [&str; 5]) {
        let (a, d) = (&self.amqp, &self.devices);
        (
            [
                &a.work_queue,
                &a.cancel_queue,
                &a.dead_letter_queue,
                &d.queue,
                &d.dead_letter_queue,
            ],
            [
                &a.call_exchange,
                &a.dead_letter_exchange,
                &a.results_exchange,
                &d.exchange,
                &d.dead_letter_exchange,
            ],
        )
    }

    /// The `VPW__*` variables that give another process this configuration's
    /// connections, AMQP and device-event names, APNs endpoints and first app (the
    /// single-app shorthand). What a supervisor — the benchmark, the tests — sets
    /// when it starts workers as processes.
    pub fn process_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("VPW__AMQP__URL", self.amqp.url.clone()),
            ("VPW__POSTGRES__URL", self.postgres.url.clone()),
            ("VPW__AMQP__CALL_EXCHANGE", self.amqp.call_exchange.clone()),
            ("VPW__AMQP__WORK_QUEUE", self.amqp.work_queue.clone()),
            ("VPW__AMQP__CANCEL_QUEUE", self.amqp.cancel_queue.clone()),
            (
                "VPW__AMQP__DEAD_LETTER_EXCHANGE",
                self.amqp.dead_letter_exchange.clone(),
            ),
            (
                "VPW__AMQP__DEAD_LETTER_QUEUE",
                self.amqp.dead_letter_queue.clone(),
            ),
            (
                "VPW__AMQP__RESULTS_EXCHANGE",
                self.amqp.results_exchange.clone(),
            ),
            ("VPW__DEVICES__EXCHANGE", self.devices.exchange.clone()),
            ("VPW__DEVICES__QUEUE", self.devices.queue.clone()),
            (
                "VPW__DEVICES__DEAD_LETTER_EXCHANGE",
                self.devices.dead_letter_exchange.clone(),
            ),
            (
                "VPW__DEVICES__DEAD_LETTER_QUEUE",
                self.devices.dead_letter_queue.clone(),
            ),
            (
                "VPW__APNS__PRODUCTION_URL",
                self.apns.production_url.clone(),
            ),
            ("VPW__APNS__SANDBOX_URL", self.apns.sandbox_url.clone()),
        ];
        for (var, file) in [
            ("VPW__APNS__CA_FILE", &self.apns.ca_file),
            ("VPW__POSTGRES__CA_FILE", &self.postgres.ca_file),
            ("VPW__AMQP__CA_FILE", &self.amqp.ca_file),
            ("VPW__AMQP__CERT_FILE", &self.amqp.cert_file),
            ("VPW__AMQP__KEY_FILE", &self.amqp.key_file),
        ] {
            if let Some(f) = file {
                env.push((var, f.display().to_string()));
            }
        }
        if let Some(app) = self.apps().first() {
            env.push(("VPW__APNS__BUNDLE_ID", app.bundle_id.clone()));
            env.push(("VPW__APNS__TEAM_ID", app.team_id.clone()));
            env.push(("VPW__APNS__KEY_ID", app.key_id.clone()));
            env.push(("VPW__APNS__KEY_FILE", app.key_file.display().to_string()));
            for (var, file) in [
                ("VPW__APNS__CERT_FILE", &app.cert_file),
                ("VPW__APNS__CERT_PASSWORD_FILE", &app.cert_password_file),
            ] {
                if let Some(f) = file {
                    env.push((var, f.display().to_string()));
                }
            }
        }
        env
    }
}

/// Hides the password of a URL like `amqp://user:secret@host/` (also one in a
/// `password=` query parameter), or of a libpq `key=value` string.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return crate::tls::pg_url::redact_key_values(url);
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let query = query.map(|q| {
        q.split('&')
            .map(|p| match p.split_once('=') {
                Some(("password", _)) => "password=***",
                _ => p,
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    let base = match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://{rest}"),
        },
        None => format!("{scheme}://{rest}"),
    };
    match query {
        Some(q) => format!("{base}?{q}"),
        None => base,
    }
}

#[cfg(test)]
mod tests;
