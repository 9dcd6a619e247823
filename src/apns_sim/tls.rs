//! The simulator's certificates: a CA generated at start (its PEM is what the
//! worker trusts through `VPW__APNS__CA_FILE`) and a server certificate it signs
//! for the local addresses and Apple's host names. The same CA plays Apple's
//! part for VoIP Services certificates: it issues client certificates
//! (`certs.rs`), and a client certificate it did not sign, or one that expired,
//! is refused in the handshake, as APNs refuses them.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct SimTls {
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
    pub issuer: Arc<Issuer<'static, KeyPair>>,
}

pub fn generate() -> Result<SimTls, String> {
    let e = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "voip-push-worker APNs simulator CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(e)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut client_roots = rustls::RootCertStore::empty();
    client_roots
        .add(ca_cert.der().clone())
        .map_err(|e| e.to_string())?;

    let names = [
        "localhost",
        "127.0.0.1",
        "::1",
        "api.push.apple.com",
        "api.sandbox.push.apple.com",
        "api.development.push.apple.com",
        "apns-sim",
    ];
    let server_key = KeyPair::generate().map_err(e)?;
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .map_err(e)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "voip-push-worker APNs simulator");
    let server_cert = params.signed_by(&server_key, &issuer).map_err(e)?;

    let chain: Vec<CertificateDer<'static>> =
        vec![server_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Token apps send no certificate; a certificate, when sent, must be ours.
    let clients =
        WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| e.to_string())?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    // HTTP/2 only, like APNs.
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(SimTls {
        ca_pem: ca_cert.pem(),
        server: Arc::new(server),
        issuer: Arc::new(issuer),
    })
}
