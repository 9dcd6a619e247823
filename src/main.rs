//! `voip-push-worker`: CLI parsing, configuration, logging; the commands live in
//! `cli.rs`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use voip_push_worker::cli::{
    self, CommandError, DeviceArgs, DoctorArgs, ListDevicesArgs, PublishArgs, SimArgs,
};
use voip_push_worker::config::Config;

#[derive(Parser)]
#[command(
    name = "voip-push-worker",
    version,
    about = "Rings iPhones: call events from RabbitMQ to APNs VoIP pushes"
)]
struct Cli {
    /// TOML configuration file (also VPW_CONFIG); VPW__SECTION__KEY variables override it.
    #[arg(long, global = true, env = "VPW_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines (also VPW_LOG_JSON=1 or true).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume call events, push, publish results, serve HTTP.
    Run,
    /// Apply the SQL migrations (creating the database if needed) and exit.
    Migrate,
    /// One-shot tour on this machine with the built-in APNs simulator.
    Demo,
    /// Run the APNs simulator as a standalone server.
    ApnsSim(SimArgs),
    /// Manage device tokens.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Publish one call event the way a producer would.
    PublishCall(PublishArgs),
    /// Check configuration, keys, APNs, Postgres and RabbitMQ; print the fix for each failure.
    Doctor(DoctorArgs),
    /// Every delivery and attempt of one call: why it rang, or why not.
    Trace(voip_push_worker::trace::TraceArgs),
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Register (or refresh) a device token.
    Register(DeviceArgs),
    /// A user's devices: token suffix, environment, last success, invalidation.
    List(ListDevicesArgs),
}

fn init_logging(json: bool, default_filter: &str) {
    let filter =
        EnvFilter::try_from_env("VPW_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// A boolean environment variable: `1`, `true`, `yes` (any case) mean on.
fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

fn main() -> ExitCode {
    let args = Cli::parse();
    // The doctor reports what goes wrong itself; log lines would only interleave.
    let doctor = matches!(args.command, Command::Doctor(_));
    init_logging(
        args.log_json || env_flag("VPW_LOG_JSON"),
        if doctor {
            "off"
        } else {
            "info,lapin=warn,h2=warn,hyper=warn"
        },
    );
    let config_file = args.config.clone();
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        // The doctor loads the configuration itself and reports what is wrong with it.
        Err(_) if doctor => Config::default(),
        Err(e) => {
            eprintln!("voip-push-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("voip-push-worker: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match args.command {
            Command::Run => cli::run(config).await,
            Command::Migrate => cli::migrate(&config).await,
            Command::Demo => cli::demo(config).await,
            Command::ApnsSim(a) => cli::apns_sim(&config, a).await,
            Command::Devices {
                command: DevicesCommand::Register(a),
            } => cli::register_device(&config, a).await,
            Command::PublishCall(a) => cli::publish_call(&config, a).await,
            Command::Devices {
                command: DevicesCommand::List(a),
            } => cli::list_devices(&config, a).await,
            Command::Doctor(a) => cli::doctor(config_file.as_deref(), a).await,
            Command::Trace(a) => voip_push_worker::trace::trace(&config, a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CommandError::Usage(m)) => {
            eprintln!("voip-push-worker: {m}");
            ExitCode::from(2)
        }
        Err(CommandError::Failed(m)) => {
            eprintln!("voip-push-worker: {m}");
            ExitCode::from(1)
        }
    }
}
