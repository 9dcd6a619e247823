//! The commands of CONTRACT §1 (besides argument parsing, which is `main.rs`'s).

use std::path::PathBuf;
use std::time::Duration;

use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::amqp::watch::ResultWatch;
use crate::amqp::{connect, declare_topology, Publisher};
use crate::apns::token::{generate_p8_pem, unix_now};
use crate::apns_sim::{ApnsSim, SimApp, SimOptions};
use crate::config::{AppConfig, Config};
use crate::event::{token_suffix, Environment, Status};
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

fn failed(e: impl std::fmt::Display) -> CommandError {
    CommandError::Failed(e.to_string())
}

#[derive(clap::Args)]
pub struct SimArgs {
    #[arg(long, default_value = "127.0.0.1:2197")]
    pub production_listen: String,
    #[arg(long, default_value = "127.0.0.1:2198")]
    pub sandbox_listen: String,
    #[arg(long, default_value = "127.0.0.1:2199")]
    pub control_listen: String,
    /// Write the CA that signed the simulator's certificate here.
    #[arg(long)]
    pub ca_out: Option<PathBuf>,
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

async fn shutdown_on_signal() -> CancellationToken {
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

pub async fn apns_sim(config: &Config, a: SimArgs) -> Result<(), CommandError> {
    let apps =
        SimApp::from_config(&config.apps()).map_err(|e| CommandError::Usage(e.to_string()))?;
    if apps.is_empty() {
        eprintln!("note: no app configured; every provider token will be refused (set VPW__APNS__* as for the worker)");
    }
    let sim = ApnsSim::start(SimOptions {
        production_listen: a.production_listen,
        sandbox_listen: a.sandbox_listen,
        control_listen: Some(a.control_listen),
        apps,
    })
    .await
    .map_err(failed)?;
    if let Some(path) = &a.ca_out {
        std::fs::write(path, &sim.ca_pem)
            .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
        println!("CA written to {}", path.display());
    }
    println!(
        "APNs simulator: production {} sandbox {} control http://{}",
        sim.production_url(),
        sim.sandbox_url(),
        sim.control_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    shutdown_on_signal().await.cancelled().await;
    sim.stop();
    Ok(())
}

/// The tour: migrate, simulator, a device registered with an unknown environment
/// that only the sandbox knows (so the worker shows its fallback), a call, its
/// result and the metrics.
pub async fn demo(mut config: Config) -> Result<(), CommandError> {
    let dir = std::env::temp_dir().join(format!("voip-push-worker-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(failed)?;
    let key_file = dir.join("AuthKey_DEMOKEY001.p8");
    std::fs::write(&key_file, generate_p8_pem()).map_err(failed)?;
    let app = AppConfig {
        bundle_id: "com.example.voipdemo".into(),
        team_id: "DEMOTEAM01".into(),
        key_id: "DEMOKEY001".into(),
        key_file,
    };

    println!(
        "== 1. migrate {}",
        crate::config::redact_url(&config.postgres.url)
    );
    migrate(&config).await?;

    println!("== 2. start the built-in APNs simulator (TLS + HTTP/2)");
    let sim = ApnsSim::start(SimOptions::local(
        SimApp::from_config(std::slice::from_ref(&app)).map_err(failed)?,
    ))
    .await
    .map_err(failed)?;
    let ca_file = dir.join("apns-sim-ca.pem");
    std::fs::write(&ca_file, &sim.ca_pem).map_err(failed)?;
    println!(
        "   production {}  sandbox {}",
        sim.production_url(),
        sim.sandbox_url()
    );
    config.apns.production_url = sim.production_url();
    config.apns.sandbox_url = sim.sandbox_url();
    config.apns.ca_file = Some(ca_file);
    config.apns.apps = vec![app.clone()];
    config.apns.bundle_id.clear();
    config.http.listen = "127.0.0.1:0".into();

    println!("== 3. register a device (a debug build: its token is a sandbox token)");
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let user = format!("demo-user-{}", std::process::id());
    sim.register_token(Environment::Sandbox, &token, &app.bundle_id);
    let store = Store::connect(&config.postgres).map_err(failed)?;
    store
        .register_device(&user, &app.bundle_id, &token, None)
        .await
        .map_err(failed)?;
    println!(
        "   user {user}, token …{}, environment unknown",
        token_suffix(&token)
    );

    println!("== 4. start the worker");
    let shutdown = CancellationToken::new();
    let worker = crate::start(config.clone(), shutdown.clone())
        .await
        .map_err(failed)?;
    let ready_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !worker
        .health
        .consuming
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        if tokio::time::Instant::now() > ready_deadline {
            return Err(failed(
                "the worker did not start consuming within 30 s (is RabbitMQ running?)",
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "   consuming {}; metrics on http://{}/metrics",
        config.amqp.work_queue, worker.http_addr
    );

    let mut watch = ResultWatch::open(&config.amqp).await.map_err(failed)?;
    let call_id = format!("demo-{}", uuid::Uuid::new_v4().simple());
    println!("== 5. publish call {call_id}");
    publish_call(
        &config,
        PublishArgs {
            to: user.clone(),
            call_id: call_id.clone(),
            from: Some("demo-caller".into()),
            name: Some("Demo Caller".into()),
            video: true,
        },
    )
    .await?;

    let (results, found) = watch
        .until(Duration::from_secs(60), |r| {
            r.call_id.as_deref() == Some(call_id.as_str())
        })
        .await;
    watch.close().await;
    let result = results
        .into_iter()
        .rev()
        .find(|r| r.call_id.as_deref() == Some(call_id.as_str()));
    println!("== 6. result");
    let Some(result) = result.filter(|_| found) else {
        worker.stop().await;
        return Err(failed("no result within 60 s"));
    };
    println!("{}", serde_json::to_string_pretty(&result).map_err(failed)?);
    println!("   APNs requests the simulator saw:");
    for r in sim.requests() {
        println!(
            "     {:<10} …{}  {} {}  topic {}  push-type {}",
            r.environment.as_str(),
            token_suffix(&r.token),
            r.status,
            r.reason.as_deref().unwrap_or(""),
            r.headers
                .get("apns-topic")
                .map(String::as_str)
                .unwrap_or(""),
            r.headers
                .get("apns-push-type")
                .map(String::as_str)
                .unwrap_or(""),
        );
    }
    // Counters move as the event is settled, just after its results go out.
    let settle_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while worker.metrics.in_flight.get() > 0 && tokio::time::Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("== 7. key metrics");
    for line in worker.metrics.render().lines() {
        // Series still at zero (every known label is exported from the start) are
        // left out: the tour shows what moved.
        if line.starts_with("voip_push_")
            && !line.contains("_bucket{")
            && !line.ends_with(" 0")
            && (line.starts_with("voip_push_events_total")
                || line.starts_with("voip_push_deliveries_total")
                || line.starts_with("voip_push_apns_requests_total")
                || line.starts_with("voip_push_environment_fallbacks_total")
                || line.starts_with("voip_push_end_to_end_seconds")
                || line.starts_with("voip_push_provider_tokens_signed_total"))
        {
            println!("   {line}");
        }
    }
    worker.stop().await;
    sim.stop();
    let _ = std::fs::remove_dir_all(&dir);
    if result.status == Status::Delivered {
        println!(
            "== the phone rang: delivered via {} after a fallback",
            result.environment.map(Environment::as_str).unwrap_or("?")
        );
        Ok(())
    } else {
        Err(failed(format!(
            "the call was not delivered: {}",
            result.status.as_str()
        )))
    }
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
