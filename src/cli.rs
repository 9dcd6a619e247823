//! The commands of CONTRACT §1 (besides argument parsing, which is `main.rs`'s).

use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::amqp::{connect, declare_topology, Publisher};
use crate::apns::token::unix_now;
use crate::config::Config;
use crate::event::{token_suffix, Environment};
use crate::store::{ensure_database, Store};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Bad usage or invalid configuration: exit code 2.
    #[error("{0}")]
    Usage(String),
    /// The command ran and failed: exit code 1.
    #[error("{0}")]
    Failed(String),
}

mod demo;
mod sim;
pub use demo::demo;
pub use sim::{apns_sim, SimArgs};

fn failed(e: impl std::fmt::Display) -> CommandError {
    CommandError::Failed(e.to_string())
}

#[derive(clap::Args)]
pub struct DeviceArgs {
    #[arg(long)]
    pub user: String,
    /// The PushKit VoIP token, hex.
    #[arg(long)]
    pub token: String,
    /// Default: the only/first configured app.
    #[arg(long)]
    pub bundle_id: Option<String>,
    /// sandbox or production; unknown when not given (learned on first push).
    #[arg(long)]
    pub environment: Option<String>,
    /// The app's alert (User Notifications) token, hex: where missed-call notices
    /// go (`worker.cancel_push = alert`).
    #[arg(long)]
    pub alert_token: Option<String>,
}

#[derive(clap::Args)]
pub struct PublishArgs {
    #[arg(long)]
    pub to: String,
    #[arg(long)]
    pub call_id: String,
    #[arg(long)]
    pub from: Option<String>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub video: bool,
}

pub(crate) async fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            #[cfg(unix)]
            {
                if let Ok(mut s) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                {
                    s.recv().await;
                    return;
                }
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        info!("shutdown signal received; draining");
        t.cancel();
    });
    token
}

pub async fn run(config: Config) -> Result<(), CommandError> {
    let shutdown = shutdown_on_signal().await;
    crate::run(config, shutdown).await.map_err(|e| match e {
        crate::StartError::Config(c) => CommandError::Usage(c.to_string()),
        // A certificate for another app, expired, or unreadable: configuration.
        crate::StartError::Apns(e @ crate::apns::SetupError::Cert(_)) => {
            CommandError::Usage(e.to_string())
        }
        other => failed(other),
    })
}

pub async fn migrate(config: &Config) -> Result<(), CommandError> {
    if ensure_database(&config.postgres).await.map_err(failed)? {
        println!("created database");
    }
    let store = Store::connect(&config.postgres).map_err(failed)?;
    let applied = store.migrate().await.map_err(failed)?;
    if applied.is_empty() {
        println!("migrations: up to date");
    } else {
        println!("migrations: applied {applied:?}");
    }
    Ok(())
}

fn bundle_for(config: &Config, bundle: Option<String>) -> Result<String, CommandError> {
    match bundle {
        Some(b) => Ok(b),
        None => config
            .apps()
            .first()
            .map(|a| a.bundle_id.clone())
            .ok_or_else(|| {
                CommandError::Usage("no --bundle-id given and no app configured".into())
            }),
    }
}

pub async fn register_device(config: &Config, a: DeviceArgs) -> Result<(), CommandError> {
    let bundle = bundle_for(config, a.bundle_id)?;
    let env = match a.environment.as_deref() {
        None | Some("unknown") => None,
        Some(e) => Some(Environment::parse(e).ok_or_else(|| {
            CommandError::Usage(format!("--environment {e:?} is not sandbox or production"))
        })?),
    };
    let store = Store::connect(&config.postgres).map_err(failed)?;
    let usage_or_failed = |e: crate::store::StoreError| match e {
        crate::store::StoreError::BadToken(_) => CommandError::Usage(e.to_string()),
        other => failed(other),
    };
    if let Some(alert) = &a.alert_token {
        crate::store::normalize_token(alert).map_err(usage_or_failed)?;
    }
    let reg = store
        .register_device(&a.user, &bundle, &a.token, env)
        .await
        .map_err(usage_or_failed)?;
    if let Some(alert) = &a.alert_token {
        store
            .set_alert_token(reg.id, alert)
            .await
            .map_err(usage_or_failed)?;
    }
    let moved = reg
        .moved_from
        .map(|from| format!(" (moved from user {from})"))
        .unwrap_or_default();
    println!(
        "device {} registered: user {} bundle {bundle} token …{} environment {}{moved}",
        reg.id,
        a.user,
        token_suffix(&a.token.to_ascii_lowercase()),
        env.map(Environment::as_str).unwrap_or("unknown")
    );
    Ok(())
}

/// The event a producer would publish, stamped with `sentAt`.
pub fn call_event_json(a: &PublishArgs) -> serde_json::Value {
    let mut e = serde_json::json!({
        "type": "call.incoming",
        "callId": a.call_id,
        "toUserId": a.to,
        "hasVideo": a.video,
        "sentAt": crate::event::now_rfc3339(),
    });
    if let Some(f) = &a.from {
        e["fromUserId"] = f.clone().into();
    }
    if let Some(n) = &a.name {
        e["fromDisplayName"] = n.clone().into();
    }
    e
}

pub async fn publish_call(config: &Config, a: PublishArgs) -> Result<(), CommandError> {
    // Declare first, so an event published before any worker ever ran is queued.
    let conn = connect(&config.amqp, "publish-call")
        .await
        .map_err(failed)?;
    let ch = conn.create_channel().await.map_err(failed)?;
    declare_topology(&ch, &config.amqp).await.map_err(failed)?;
    let _ = conn.close(200, "done".into()).await;

    let publisher = Publisher::new(config.amqp.clone(), "publish-call");
    let message_id = uuid::Uuid::new_v4().to_string();
    let body = call_event_json(&a).to_string();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(message_id.as_str().into())
        .with_timestamp(unix_now());
    publisher
        .publish(
            &config.amqp.call_exchange,
            "call.initiate",
            body.as_bytes(),
            props,
        )
        .await
        .map_err(failed)?;
    publisher.close().await;
    println!(
        "published call {} to user {} (message id {message_id})",
        a.call_id, a.to
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// Print the report as JSON (stable; see the README).
    #[arg(long)]
    pub json: bool,
    /// Also ask a running worker's /readyz, e.g. http://127.0.0.1:9464.
    #[arg(long)]
    pub url: Option<String>,
}

/// Every check, printed; `Failed` (exit 1) when any check failed. Loads the
/// configuration itself, so an invalid one is reported, not fatal.
pub async fn doctor(file: Option<&std::path::Path>, a: DoctorArgs) -> Result<(), CommandError> {
    let opts = crate::doctor::Options {
        worker_url: a.url,
        ..Default::default()
    };
    let report = crate::doctor::run_from_file(file, &opts).await;
    print_out(&if a.json {
        crate::doctor::render_json(&report) + "\n"
    } else {
        crate::doctor::render_human(&report)
    });
    if report.ok {
        Ok(())
    } else {
        Err(failed(format!(
            "doctor: {} check(s) failed",
            report.count(crate::doctor::Status::Fail)
        )))
    }
}

#[derive(clap::Args)]
pub struct ListDevicesArgs {
    #[arg(long)]
    pub user: String,
    /// Print JSON: {"userId", "devices": [...]}.
    #[arg(long)]
    pub json: bool,
}

pub async fn list_devices(config: &Config, a: ListDevicesArgs) -> Result<(), CommandError> {
    let (mut pg, tls) = crate::tls::postgres::connect_config(&config.postgres)
        .map_err(|e| CommandError::Usage(format!("VPW__POSTGRES__URL: {e}")))?;
    pg.connect_timeout(crate::doctor::STEP_TIMEOUT);
    let (client, conn) = pg.connect(tls).await.map_err(|e| {
        failed(format!(
            "postgres at {}: {}",
            crate::config::redact_url(&config.postgres.url),
            crate::tls::error_chain(&e)
        ))
    })?;
    tokio::spawn(conn);
    let devices = crate::doctor::devices::list(&client, &a.user)
        .await
        .map_err(|e| failed(format!("postgres: {e} (run `voip-push-worker migrate`?)")))?;
    print_out(&if a.json {
        crate::doctor::devices::render_json(&a.user, &devices) + "\n"
    } else {
        crate::doctor::devices::render_human(&a.user, &devices)
    });
    Ok(())
}

/// Writes a report to stdout; a reader that went away (`| head`) is not an error.
fn print_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
