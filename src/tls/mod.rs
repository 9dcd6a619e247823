//! TLS to the services we depend on: Postgres ([`postgres`], libpq's `sslmode`
//! semantics on rustls) and RabbitMQ ([`amqp`]: `amqps://` for lapin's rustls and for our
//! own connections, `crate::amqp::wire`).
//! One stack everywhere: rustls on `ring`, Mozilla's roots (`webpki-roots`) plus
//! whatever private CA the operator names.

pub mod amqp;
mod channel_binding;
pub mod pg_url;
pub mod postgres;
mod verify;

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider of every TLS client we build.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Adds every certificate of a PEM bundle to `roots`; a bundle without any is an
/// error (a wrong file would otherwise silently trust nothing new).
pub fn add_pem_roots(roots: &mut rustls::RootCertStore, pem: &[u8]) -> Result<(), String> {
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("CA file is not PEM certificates: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA file certificate rejected: {e}"))?;
        added += 1;
    }
    if added == 0 {
        return Err("CA file holds no certificate".into());
    }
    Ok(())
}

/// Mozilla's roots, plus the CA files given.
pub fn roots(ca_files: &[&Path]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for file in ca_files {
        add_pem_roots(&mut roots, &read(file)?).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(roots)
}

fn read(file: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))
}

/// A client certificate (PEM chain) and its private key (PEM: PKCS#8, PKCS#1 or SEC1).
pub fn client_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: holds no certificate", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
    Ok((chain, key_der))
}

/// Why a TLS connection failed, as far as an operator can act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The certificate chain does not end at a CA we trust.
    UnknownCa,
    /// The certificate is valid but names another host.
    HostMismatch,
    /// The certificate has expired or is not valid yet.
    Expired,
    /// The server does not speak TLS (on that port).
    NoTlsOnServer,
    /// The server refuses connections without TLS.
    TlsRequired,
}

impl TlsFailure {
    /// Reads the failure out of an error's text (with its sources): rustls' and
    /// the servers' words are stable enough, and the errors reach us wrapped by
    /// tokio-postgres, lapin and std::io in ways no downcast follows reliably.
    pub fn of(error_text: &str) -> Option<Self> {
        let t = error_text.to_ascii_lowercase();
        let any = |words: &[&str]| words.iter().any(|w| t.contains(w));
        if any(&["unknownissuer", "badsignature"]) {
            Some(Self::UnknownCa)
        } else if any(&["notvalidforname", "not valid for name"]) {
            Some(Self::HostMismatch)
        } else if any(&["expired", "notvalidyet", "not valid before"]) {
            Some(Self::Expired)
        } else if any(&[
            "server does not support tls",
            "invalidcontenttype",
            "corrupt message",
        ]) {
            Some(Self::NoTlsOnServer)
        } else if any(&["no encryption", "ssl off"]) {
            // Postgres: `no pg_hba.conf entry for host ..., no encryption`.
            Some(Self::TlsRequired)
        } else {
            None
        }
    }

    /// What to change; `ca_setting` names where the CA goes for this service.
    pub fn fix(self, ca_setting: &str, host: &str) -> String {
        match self {
            Self::UnknownCa => format!(
                "the server's certificate is not signed by a CA we trust: point {ca_setting} at \
                 your provider's CA bundle (PEM)"
            ),
            Self::HostMismatch => format!(
                "the server's certificate is not for {host:?}: connect by the name on the \
                 certificate (the provider's endpoint name, not an IP address or alias)"
            ),
            Self::Expired => "the server's certificate has expired (or the clocks disagree): \
                              renew it, check this machine's clock"
                .into(),
            Self::NoTlsOnServer => format!(
                "{host:?} does not speak TLS there: turn TLS on at the server, or use the \
                 port of its TLS listener"
            ),
            Self::TlsRequired => "the server accepts only encrypted connections: turn TLS on \
                                  in the URL (sslmode=verify-full, amqps://)"
                .into(),
        }
    }
}

/// `e` and its sources on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let next = inner.to_string();
        if !s.contains(&next) {
            s = format!("{s}: {next}");
        }
        src = inner.source();
    }
    s
}

/// Loopback and Unix sockets: nothing to encrypt against.
pub fn is_local(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.starts_with('/')
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_read_from_rustls_and_server_words() {
        let of = TlsFailure::of;
        assert_eq!(
            of("error performing TLS handshake: invalid peer certificate: UnknownIssuer"),
            Some(TlsFailure::UnknownCa)
        );
        assert_eq!(
            of("invalid peer certificate: NotValidForNameContext { expected: .. }"),
            Some(TlsFailure::HostMismatch)
        );
        assert_eq!(
            of("error performing TLS handshake: server does not support TLS"),
            Some(TlsFailure::NoTlsOnServer)
        );
        assert_eq!(
            of("received corrupt message of type InvalidContentType"),
            Some(TlsFailure::NoTlsOnServer)
        );
        assert_eq!(
            of("no pg_hba.conf entry for host \"127.0.0.1\", user \"x\", database \"y\", no encryption"),
            Some(TlsFailure::TlsRequired)
        );
        assert_eq!(
            of("invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is only valid for DnsName(\"localhost\")"),
            Some(TlsFailure::HostMismatch)
        );
        assert_eq!(of("connection refused"), None);
    }

    #[test]
    fn local_hosts() {
        for h in [
            "localhost",
            "127.0.0.1",
            "::1",
            "[::1]",
            "/var/run/postgresql",
        ] {
            assert!(is_local(h), "{h}");
        }
        for h in ["db.example.com", "10.0.0.5", ""] {
            assert!(!is_local(h), "{h}");
        }
    }
}
