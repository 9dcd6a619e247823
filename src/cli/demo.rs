//! `voip-push-worker demo`: the one-shot tour on this machine.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{failed, migrate, publish_call, CommandError, PublishArgs};
use crate::amqp::watch::ResultWatch;
use crate::apns::token::generate_p8_pem;
use crate::apns_sim::{ApnsSim, SimApp, SimOptions};
use crate::config::{AppConfig, Config};
use crate::event::{token_suffix, Environment, Status};
use crate::store::Store;

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
        ..Default::default()
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
