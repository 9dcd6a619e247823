//! `amqps://`: lapin's rustls connector (on `ring`) always verifies the chain and
//! the host name against Mozilla's roots; we add `amqp.ca_file` to them and,
//! when configured, a client certificate (`amqp.cert_file`/`amqp.key_file`).

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};

use crate::config::AmqpConfig;

/// The TLS settings of every AMQP connection (ignored by `amqp://`).
pub fn tls_config(cfg: &AmqpConfig) -> Result<OwnedTLSConfig, String> {
    let cert_chain = match &cfg.ca_file {
        Some(f) => {
            let pem = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
            // Checked here so a wrong file is named at start, not as a handshake failure.
            super::add_pem_roots(&mut rustls::RootCertStore::empty(), &pem)
                .map_err(|e| format!("{}: {e}", f.display()))?;
            Some(String::from_utf8(pem).map_err(|_| format!("{}: not PEM", f.display()))?)
        }
        None => None,
    };
    let identity = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            // Parsed once for the error message; lapin parses the PEM again itself.
            super::client_identity(cert, key)?;
            let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| e.to_string());
            Some(OwnedIdentity::PKCS8 {
                pem: read(cert)?,
                key: read(key)?,
            })
        }
        (None, None) => None,
        _ => return Err("amqp.cert_file and amqp.key_file go together".into()),
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// The rustls settings of our own AMQP connections (`amqp::wire`): the same
/// trust and identity as [`tls_config`] gives lapin.
pub fn rustls_config(cfg: &AmqpConfig) -> Result<rustls::ClientConfig, String> {
    let ca: Vec<&std::path::Path> = cfg.ca_file.as_deref().into_iter().collect();
    let builder = rustls::ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(super::roots(&ca)?);
    match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let (chain, key) = super::client_identity(cert, key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err("amqp.cert_file and amqp.key_file go together".into()),
    }
}

/// `amqps://` (TLS) or not, from the URL's scheme.
pub fn is_tls(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("amqps://"))
}

/// The host of an AMQP URL (what the certificate must name).
pub fn host(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    match host_port.rsplit_once(':') {
        Some((h, port)) if !h.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host_port,
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_and_host() {
        assert!(is_tls("amqps://u:p@mq.example.com:5671/%2f"));
        assert!(is_tls("AMQPS://h"));
        assert!(!is_tls("amqp://guest:guest@127.0.0.1:5672/%2f"));
        assert_eq!(
            host("amqps://u:p@mq.example.com:5671/%2f"),
            "mq.example.com"
        );
        assert_eq!(host("amqp://localhost"), "localhost");
        assert_eq!(host("amqps://u:p:w@[::1]:5671/v"), "[::1]");
    }

    #[test]
    fn half_an_identity_or_a_missing_ca_is_named() {
        let cfg = AmqpConfig {
            cert_file: Some("/nonexistent/c.pem".into()),
            ..Default::default()
        };
        assert!(tls_config(&cfg).unwrap_err().contains("go together"));
        let cfg = AmqpConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert!(tls_config(&cfg)
            .unwrap_err()
            .contains("/nonexistent/ca.pem"));
        assert_eq!(
            tls_config(&AmqpConfig::default()).unwrap(),
            OwnedTLSConfig::default()
        );
    }
}
