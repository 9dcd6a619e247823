//! Where the worker's services are: RabbitMQ and Postgres, with their TLS
//! settings. Connection strings carry passwords, so `Debug` redacts them.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::redact_url;

#[derive(Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AmqpConfig {
    pub url: String,
    pub call_exchange: String,
    pub work_queue: String,
    /// The cancel lane: `call.cancel` events, consumed apart from the rings.
    pub cancel_queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub results_exchange: String,
    /// Extra trusted roots (PEM) for `amqps://`, e.g. a private broker CA.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) and its key, for brokers that ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            call_exchange: "voip.calls".into(),
            work_queue: "voip-push.calls".into(),
            cancel_queue: "voip-push.cancels".into(),
            dead_letter_exchange: "voip.calls.dlx".into(),
            dead_letter_queue: "voip-push.calls.dead".into(),
            results_exchange: "voip.push.results".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl AmqpConfig {
    /// Names every queue and exchange of the call lanes `{prefix}.<what>`: a
    /// supervisor's own set (the tests', the benchmark's), apart from the
    /// default names and from each other.
    pub fn name_objects(&mut self, prefix: &str) {
        self.call_exchange = format!("{prefix}.calls");
        self.work_queue = format!("{prefix}.work");
        self.cancel_queue = format!("{prefix}.cancels");
        self.dead_letter_exchange = format!("{prefix}.dlx");
        self.dead_letter_queue = format!("{prefix}.dead");
        self.results_exchange = format!("{prefix}.results");
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact_url(&self.url))
            .field("call_exchange", &self.call_exchange)
            .field("work_queue", &self.work_queue)
            .field("cancel_queue", &self.cancel_queue)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("results_exchange", &self.results_exchange)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct PostgresConfig {
    pub url: String,
    pub pool_size: usize,
    /// How long a query waits for a pooled connection before the event is retried.
    pub pool_timeout_ms: u64,
    /// Wait for the WAL flush of every write. Off by default: claims, attempts
    /// and results are many small writes, and only a Postgres crash (not a clean
    /// restart) could lose the last fraction of a second of them. Cancels are
    /// always flushed.
    pub synchronous_commit: bool,
    /// Trusted roots (PEM) for TLS when the URL names no `sslrootcert`.
    pub ca_file: Option<PathBuf>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/voip_push".into(),
            // Rings use the batches' own connections (3) and hold none across a
            // push; this pool serves cancels, the API and upkeep. With the
            // liveness session and the call status reads' own connection
            // (`http.long_poll_pool_size`), a replica opens at most 8.
            pool_size: 3,
            pool_timeout_ms: 5_000,
            synchronous_commit: false,
            ca_file: None,
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("pool_timeout_ms", &self.pool_timeout_ms)
            .field("synchronous_commit", &self.synchronous_commit)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}
