//! `voip-push-worker apns-sim`: the simulator as a server, with its CA written out
//! for the worker to trust and, for certificate apps, client certificates issued
//! from the same CA.

use std::path::PathBuf;

use super::{failed, shutdown_on_signal, CommandError};
use crate::apns_sim::certs::CertSpec;
use crate::apns_sim::{ApnsSim, SimApp, SimOptions};
use crate::config::Config;

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
    /// `BUNDLE=FILE`: write a VoIP Services certificate for BUNDLE, with its key
    /// (PEM), that this simulator accepts; for `VPW__APNS__CERT_FILE`. Repeatable.
    #[arg(long, value_name = "BUNDLE=FILE")]
    pub client_cert: Vec<String>,
}

pub async fn apns_sim(config: &Config, a: SimArgs) -> Result<(), CommandError> {
    let apps =
        SimApp::from_config(&config.apps()).map_err(|e| CommandError::Usage(e.to_string()))?;
    let client_certs = a
        .client_cert
        .iter()
        .map(|arg| {
            arg.split_once('=')
                .filter(|(b, f)| !b.is_empty() && !f.is_empty())
                .ok_or_else(|| {
                    CommandError::Usage(format!("--client-cert {arg:?} is not BUNDLE=FILE"))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if apps.is_empty() && client_certs.is_empty() {
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
    let write = |path: &std::path::Path, text: &str| {
        std::fs::write(path, text)
            .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
    };
    if let Some(path) = &a.ca_out {
        write(path, &sim.ca_pem)?;
        println!("CA written to {}", path.display());
    }
    for (bundle, file) in client_certs {
        let cert = sim
            .issue_client_cert(&CertSpec::voip(bundle))
            .map_err(failed)?;
        write(std::path::Path::new(file), &cert.pem())?;
        println!("client certificate for {bundle} written to {file} (VPW__APNS__CERT_FILE)");
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
