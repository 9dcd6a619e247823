//! `voip-push-worker doctor`: answers "why did the phone not ring?" without reading
//! code. Each check is a value (✓ pass, ! warning, ✗ fail, - skipped) with the exact
//! fix for a failure; a failing check never stops the others, so one run shows
//! everything that is wrong. [`run`] does the work, [`render`] prints it.
//!
//! Order: configuration and each app → signing keys → APNs per app and environment
//! → Postgres → RabbitMQ → the worker's `/readyz` (with `--url`). Network steps run
//! concurrently, each under its own timeout, so a healthy local setup answers in
//! well under a second and a black-holed service costs one timeout, not a hang.

pub mod apns;
pub mod certs;
pub mod config;
pub mod devices;
pub mod postgres;
pub mod render;
pub mod services;
pub mod trust;
pub mod worker;

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::event::Environment;

pub use render::{render_human, render_json};

/// Each network step gets this long: APNs, Postgres and RabbitMQ answer a healthy
/// client in milliseconds, and 3 s keeps a whole run that hits one dead service
/// short enough to run by hand.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Worth knowing, but not why a phone would not ring; does not fail the run.
    Warn,
    Fail,
    /// Not run because an earlier check it needs failed.
    Skip,
}

impl Status {
    pub fn symbol(self) -> &'static str {
        match self {
            Status::Pass => "✓",
            Status::Warn => "!",
            Status::Fail => "✗",
            Status::Skip => "-",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    Configuration,
    Keys,
    Apns,
    Postgres,
    Rabbitmq,
    Worker,
}

impl Section {
    pub fn heading(self) -> &'static str {
        match self {
            Section::Configuration => "Configuration",
            Section::Keys => "Signing keys",
            Section::Apns => "APNs",
            Section::Postgres => "Postgres",
            Section::Rabbitmq => "RabbitMQ",
            Section::Worker => "Worker",
        }
    }
}

/// One check's verdict. The JSON form (README, "doctor --json") is stable: every
/// field is always present, `null` when it does not apply.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// What was checked, from a fixed set (`config.load`, `apns.accept`, …).
    pub id: &'static str,
    pub section: Section,
    /// The bundle id, for per-app checks.
    pub app: Option<String>,
    pub environment: Option<Environment>,
    pub status: Status,
    pub title: String,
    pub detail: String,
    /// What to change, for `fail` and `warn`.
    pub fix: Option<String>,
    /// Figures behind the verdict (queue depths, token counts), for scripts.
    pub data: serde_json::Value,
    /// Extra lines for people (a table of counts); the same facts are in `data`.
    #[serde(skip)]
    pub notes: Vec<String>,
}

impl Check {
    pub fn new(id: &'static str, section: Section, title: impl Into<String>) -> Self {
        Self {
            id,
            section,
            app: None,
            environment: None,
            status: Status::Pass,
            title: title.into(),
            detail: String::new(),
            fix: None,
            data: serde_json::Value::Null,
            notes: Vec::new(),
        }
    }

    pub fn app(mut self, bundle_id: &str) -> Self {
        self.app = Some(bundle_id.to_string());
        self
    }

    pub fn environment(mut self, env: Environment) -> Self {
        self.environment = Some(env);
        self
    }

    pub fn pass(mut self, detail: impl Into<String>) -> Self {
        self.status = Status::Pass;
        self.detail = detail.into();
        self
    }

    pub fn fail(mut self, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        self.status = Status::Fail;
        self.detail = detail.into();
        self.fix = Some(fix.into());
        self
    }

    pub fn warn(mut self, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        self.status = Status::Warn;
        self.detail = detail.into();
        self.fix = Some(fix.into());
        self
    }

    pub fn skip(mut self, detail: impl Into<String>) -> Self {
        self.status = Status::Skip;
        self.detail = detail.into();
        self
    }

    pub fn with_data(mut self, data: serde_json::Value) -> Self {
        self.data = data;
        self
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// True when no check failed (warnings allowed): the exit code is 0.
    pub ok: bool,
    pub checks: Vec<Check>,
    pub duration_ms: u64,
}

impl Report {
    fn new(checks: Vec<Check>, started: Instant) -> Self {
        Self {
            ok: !checks.iter().any(|c| c.status == Status::Fail),
            checks,
            duration_ms: started.elapsed().as_millis() as u64,
        }
    }

    pub fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// The checks with this id (tests and scripts).
    pub fn find(&self, id: &str) -> Vec<&Check> {
        self.checks.iter().filter(|c| c.id == id).collect()
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    /// A running worker's base URL (`http://host:port`) whose `/readyz` to ask.
    pub worker_url: Option<String>,
    pub step_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            worker_url: None,
            step_timeout: STEP_TIMEOUT,
        }
    }
}

/// Runs every check against `config`.
pub async fn run(cfg: &Config, opts: &Options) -> Report {
    let started = Instant::now();
    let mut checks = config::check(cfg);
    let keys = config::keys(cfg);
    checks.extend(keys.iter().map(|k| k.check.clone()));
    checks.extend(certs::expiries(&keys));
    let (apns, postgres, rabbitmq, worker) = tokio::join!(
        apns::check(cfg, &keys, opts.step_timeout),
        postgres::postgres(cfg, opts.step_timeout),
        services::rabbitmq(&cfg.amqp, opts.step_timeout),
        async {
            match &opts.worker_url {
                Some(url) => {
                    let authority = url.strip_prefix("http://").unwrap_or(url);
                    let authority = authority.trim_end_matches('/');
                    let (ready, apps) = tokio::join!(
                        services::readyz(url, opts.step_timeout),
                        worker::apps_check(cfg, authority, opts.step_timeout),
                    );
                    vec![ready, apps]
                }
                None => Vec::new(),
            }
        },
    );
    checks.extend(apns);
    checks.extend(postgres);
    checks.extend(rabbitmq);
    checks.extend(worker);
    Report::new(checks, started)
}

/// Loads the configuration the way every command does, then runs the checks. A
/// configuration that is read but invalid is still checked (the failure is the
/// first check); one that cannot be read at all is the only check.
pub async fn run_from_file(file: Option<&Path>, opts: &Options) -> Report {
    let started = Instant::now();
    match Config::load(file) {
        Ok(cfg) => run(&cfg, opts).await,
        Err(ConfigError::Invalid(_)) => match config::load_unvalidated(file) {
            Ok(cfg) => run(&cfg, opts).await,
            Err(e) => Report::new(vec![config::unreadable(&e)], started),
        },
        Err(e) => Report::new(vec![config::unreadable(&e)], started),
    }
}
