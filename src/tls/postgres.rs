//! Postgres over TLS: a `MakeTlsConnect` for tokio-postgres on tokio-rustls,
//! configured from libpq's `sslmode`/`sslrootcert`/`sslcert`/`sslkey` and
//! `postgres.ca_file`. Every Postgres connection of the binary is made through
//! [`connect_config`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use super::pg_url::{split, RootCert, SslMode, SslParams};
use super::verify::Weaker;
use crate::config::PostgresConfig;

/// How much of the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// No TLS at all (`sslmode=disable`).
    Off,
    /// Encrypted if the server offers it, certificate not checked.
    None,
    /// The chain up to a trusted CA, not the host name.
    Chain,
    /// Chain and host name.
    Full,
}

impl Verification {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Off => "not encrypted",
            Self::None => "encrypted, certificate not verified",
            Self::Chain => "encrypted, certificate chain verified (not the host name)",
            Self::Full => "encrypted, certificate and host name verified",
        }
    }
}

/// The TLS side of a Postgres connection: cheap to clone, one per pool.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<rustls::ClientConfig>,
    pub mode: SslMode,
    pub verification: Verification,
}

/// The connection string (without our parameters, `sslmode` set for
/// tokio-postgres) and the TLS connector for `cfg`.
pub fn connect_config(cfg: &PostgresConfig) -> Result<(tokio_postgres::Config, PgTls), String> {
    let (rest, params) = split(&cfg.url)?;
    let mut pg: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| e.to_string())?;
    // tokio-postgres negotiates TLS (prefer falls back to plaintext when the
    // server says no; require never does); rustls below decides what to trust.
    pg.ssl_mode(match params.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    let tls = PgTls::new(&params, cfg.ca_file.as_deref())?;
    Ok((pg, tls))
}

impl PgTls {
    fn new(p: &SslParams, ca_file: Option<&std::path::Path>) -> Result<Self, String> {
        let files: Vec<&std::path::Path> = match &p.root_cert {
            Some(RootCert::File(f)) => vec![f.as_path()],
            _ => ca_file.into_iter().collect(),
        };
        let have_root = p.root_cert.is_some() || ca_file.is_some();
        // libpq: `require` (and `prefer`) verify the chain when a root
        // certificate is given, and only encrypt otherwise.
        let verification = match p.mode {
            SslMode::Disable => Verification::Off,
            SslMode::Prefer | SslMode::Require if !have_root => Verification::None,
            SslMode::Prefer | SslMode::Require | SslMode::VerifyCa => Verification::Chain,
            SslMode::VerifyFull => Verification::Full,
        };
        let provider = super::provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let roots = || super::roots(&files).map_err(|e| format!("root certificate {e}"));
        let builder = match verification {
            Verification::Off | Verification::None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Weaker::encrypt_only(provider))),
            Verification::Chain => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Weaker::chain_only(
                    roots()?,
                    provider,
                )?)),
            Verification::Full => builder.with_root_certificates(roots()?),
        };
        let mut config = match (&p.cert, &p.key) {
            (Some(cert), Some(key)) => {
                let (chain, key) = super::client_identity(cert, key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client certificate: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        // Postgres 17 checks the protocol when a client names one (and needs it
        // for sslnegotiation=direct); older servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            mode: p.mode,
            verification,
        })
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, Self::Error> {
        Ok(PgTlsConnect {
            config: self.config.clone(),
            name: ServerName::try_from(domain.to_string())?,
        })
    }
}

pub struct PgTlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

type Handshake<S> = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Handshake<S>;

    fn connect(self, stream: S) -> Handshake<S> {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let host = self.name.to_str().into_owned();
            match connector.connect(self.name, stream).await {
                Ok(s) => Ok(PgTlsStream(s)),
                // The fix travels with the error: `migrate` and the worker's log
                // say what to change, not only rustls' word for it.
                Err(e) => Err(match super::TlsFailure::of(&e.to_string()) {
                    Some(f) => io::Error::new(
                        e.kind(),
                        format!("{e}; {}", f.fix("sslrootcert (or postgres.ca_file)", &host)),
                    ),
                    None => e,
                }),
            }
        })
    }
}

pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, conn) = self.0.get_ref();
        match conn.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => super::channel_binding::server_end_point(cert)
                .map(ChannelBinding::tls_server_end_point)
                .unwrap_or_else(ChannelBinding::none),
            None => ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verification(
        query: &str,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Verification, String> {
        let cfg = PostgresConfig {
            url: format!("postgres://u@db.example.com/d{query}"),
            ca_file: ca_file.map(Into::into),
            ..Default::default()
        };
        connect_config(&cfg).map(|(_, tls)| tls.verification)
    }

    /// libpq's table: what each sslmode checks, with and without a root certificate.
    #[test]
    fn each_mode_checks_what_libpq_checks() {
        let dir = std::env::temp_dir().join(format!("vpw-pg-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let root = format!("sslrootcert={}", ca.display());
        use Verification as V;
        for (query, ca_file, want) in [
            ("", None, V::None),
            ("?sslmode=disable", None, V::Off),
            ("?sslmode=prefer", None, V::None),
            ("?sslmode=require", None, V::None),
            (&format!("?sslmode=require&{root}") as &str, None, V::Chain),
            ("?sslmode=prefer", Some(ca.as_path()), V::Chain),
            ("?sslmode=verify-ca", None, V::Chain),
            ("?sslmode=verify-full", None, V::Full),
            (&format!("?sslmode=verify-full&{root}"), None, V::Full),
            ("?sslrootcert=system", None, V::Full),
        ] {
            assert_eq!(
                verification(query, ca_file),
                Ok(want),
                "{query} {ca_file:?}"
            );
        }
        let err =
            verification("?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", None).unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
