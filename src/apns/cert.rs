//! VoIP Services certificates: the alternative to a `.p8` key. An app configured
//! with `cert_file` authenticates in the TLS handshake with its certificate
//! (PEM certificate + key, or a PKCS#12 `.p12` as Keychain Access exports it) and
//! sends no provider token.
//!
//! Apple names the app in the certificate's subject: `UID=<bundle>.voip,
//! CN=VoIP Services: <bundle>, OU=<team id>` (an "Apple Push Services" certificate
//! for several topics says `UID=<bundle>`). APNs takes the topic from there, so a
//! certificate of another app refuses every push (`TopicDisallowed`): start-up
//! compares it with the configured bundle id and says so in one line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::info;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::oid_registry::{OID_USERID, OID_X509_COMMON_NAME, OID_X509_ORGANIZATIONAL_UNIT};
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};

use super::token::{unix_now, ProviderToken};
use super::{ApnsClient, ClientSettings, SetupError};
use crate::config::AppConfig;
use crate::event::Environment;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("certificate {path}: {detail}")]
    Invalid { path: String, detail: String },
    #[error(
        "certificate {path} is for bundle {found} ({subject}), but the app is configured as {configured}: \
         set bundle_id to {found}, or cert_file to the VoIP Services certificate of {configured}"
    )]
    WrongBundle {
        path: String,
        found: String,
        configured: String,
        subject: String,
    },
    #[error(
        "certificate {path} ({subject}) names no app (no UID and no \"VoIP Services: <bundle id>\" \
         common name): it is not an APNs certificate"
    )]
    NoBundle { path: String, subject: String },
    #[error(
        "certificate {path} ({subject}) is an alert push certificate; VoIP pushes need a \
         \"VoIP Services\" certificate (developer portal: Certificates, +, VoIP Services Certificate)"
    )]
    NotVoip { path: String, subject: String },
    #[error(
        "certificate {path} ({subject}) expired at {at}: create a new VoIP Services certificate \
         in the developer portal and replace the file"
    )]
    Expired {
        path: String,
        subject: String,
        at: String,
    },
    #[error("certificate {path} ({subject}) is not valid before {at}: check this machine's clock")]
    NotYetValid {
        path: String,
        subject: String,
        at: String,
    },
}

/// What the leaf certificate says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The app it pushes for: the subject's UID without `.voip`, else the bundle id
    /// in a `VoIP Services: <bundle>` common name.
    pub bundle_id: Option<String>,
    pub uid: Option<String>,
    pub common_name: Option<String>,
    /// The team id Apple puts in the organisational unit.
    pub team_id: Option<String>,
    /// UNIX seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// `None`: both environments (VoIP Services and Apple Push Services
    /// certificates); the old per-environment alert certificates are limited.
    pub only_environment: Option<Environment>,
    /// False for the alert-only `Apple Development/Production IOS Push Services`.
    pub voip: bool,
}

/// Common-name prefixes Apple uses, and what each certificate may do.
const KINDS: &[(&str, Option<Environment>, bool)] = &[
    ("VoIP Services: ", None, true),
    ("Apple Push Services: ", None, true),
    (
        "Apple Development IOS Push Services: ",
        Some(Environment::Sandbox),
        false,
    ),
    (
        "Apple Production IOS Push Services: ",
        Some(Environment::Production),
        false,
    ),
];

fn attribute(name: &X509Name<'_>, oid: &x509_parser::der_parser::oid::Oid<'_>) -> Option<String> {
    name.iter_by_oid(oid)
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string)
}

impl CertInfo {
    /// Parses a DER certificate's subject and validity.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let subject = cert.subject();
        let uid = attribute(subject, &OID_USERID);
        let common_name = attribute(subject, &OID_X509_COMMON_NAME);
        let kind = common_name.as_deref().and_then(|cn| {
            KINDS
                .iter()
                .find_map(|(prefix, env, voip)| cn.strip_prefix(prefix).map(|b| (b, *env, *voip)))
        });
        // APNs takes the topic from the UID; the common name repeats it for people.
        let bundle_id = uid
            .as_deref()
            .map(|u| u.strip_suffix(".voip").unwrap_or(u).to_string())
            .or_else(|| kind.map(|(b, _, _)| b.trim().to_string()))
            .filter(|b| !b.is_empty());
        let only_environment = kind.and_then(|(_, env, _)| env);
        let voip = kind.is_none_or(|(_, _, voip)| voip);
        let validity = cert.validity();
        Ok(Self {
            bundle_id,
            uid,
            common_name,
            team_id: attribute(subject, &OID_X509_ORGANIZATIONAL_UNIT),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            only_environment,
            voip,
        })
    }

    /// The subject as people read it: `UID=…, CN=…`.
    pub fn subject(&self) -> String {
        let parts: Vec<String> = [("UID", &self.uid), ("CN", &self.common_name)]
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
            .collect();
        if parts.is_empty() {
            "no UID or CN".into()
        } else {
            parts.join(", ")
        }
    }

    /// Whole days until expiry (negative once expired).
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }
}

/// An RFC 3339 rendering of UNIX seconds, for messages.
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// A certificate with its private key, ready for TLS client authentication.
/// `Debug` shows the file and subject only, never key material.
pub struct ClientIdentity {
    pub path: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub info: CertInfo,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("path", &self.path)
            .field("subject", &self.info.subject())
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl ClientIdentity {
    /// Loads `cert_file`: PEM (certificates and the private key, in one file as
    /// Twilio and `openssl pkcs12 -nodes` write them) or PKCS#12, whose password is
    /// in `password_file` (none: the empty password).
    pub fn load(cert_file: &Path, password_file: Option<&Path>) -> Result<Self, CertError> {
        let data = read("certificate", cert_file)?;
        let path = cert_file.display().to_string();
        let invalid = |detail: String| CertError::Invalid {
            path: path.clone(),
            detail,
        };
        let (chain, key) = if data.windows(11).any(|w| w == b"-----BEGIN ") {
            from_pem(&data).map_err(invalid)?
        } else {
            let password = match password_file {
                Some(p) => String::from_utf8_lossy(&read("certificate password", p)?)
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
                None => String::new(),
            };
            from_pkcs12(&data, &password).map_err(invalid)?
        };
        let leaf = chain
            .first()
            .ok_or_else(|| invalid("holds no certificate".into()))?;
        let info = CertInfo::from_der(leaf).map_err(|e| invalid(format!("not X.509: {e}")))?;
        Ok(Self {
            path: cert_file.to_path_buf(),
            chain,
            key,
            info,
        })
    }

    /// What start-up insists on: the certificate is for `bundle_id`, can send VoIP
    /// pushes and is valid at `now` (UNIX seconds).
    pub fn check_for(&self, bundle_id: &str, now: i64) -> Result<(), CertError> {
        self.check_app(bundle_id)?;
        self.check_valid(now)
    }

    /// The certificate is for `bundle_id` and can send VoIP pushes.
    pub fn check_app(&self, bundle_id: &str) -> Result<(), CertError> {
        let path = self.path.display().to_string();
        let subject = self.info.subject();
        let Some(found) = &self.info.bundle_id else {
            return Err(CertError::NoBundle { path, subject });
        };
        if found != bundle_id {
            return Err(CertError::WrongBundle {
                path,
                found: found.clone(),
                configured: bundle_id.to_string(),
                subject,
            });
        }
        if !self.info.voip {
            return Err(CertError::NotVoip { path, subject });
        }
        Ok(())
    }

    /// The certificate is valid at `now` (UNIX seconds).
    pub fn check_valid(&self, now: i64) -> Result<(), CertError> {
        let (path, subject) = (self.path.display().to_string(), self.info.subject());
        if now >= self.info.not_after {
            return Err(CertError::Expired {
                path,
                subject,
                at: rfc3339(self.info.not_after),
            });
        }
        if now < self.info.not_before {
            return Err(CertError::NotYetValid {
                path,
                subject,
                at: rfc3339(self.info.not_before),
            });
        }
        Ok(())
    }
}

/// A certificate app's provider token (none) and connections of its own, once
/// the certificate passed [`ClientIdentity::check_for`]. Its expiry goes to
/// `voip_push_apns_certificate_expiry_timestamp_seconds{app}`.
pub fn app_parts(
    app: &AppConfig,
    settings: &ClientSettings,
    metrics: &Metrics,
) -> Result<(Arc<ProviderToken>, Arc<ApnsClient>), SetupError> {
    let cert_file = app.cert_file.as_deref().unwrap_or(Path::new(""));
    let identity = ClientIdentity::load(cert_file, app.cert_password_file.as_deref())?;
    identity.check_for(&app.bundle_id, unix_now() as i64)?;
    metrics
        .apns_certificate_expiry
        .with_label_values(&[&app.bundle_id])
        .set(identity.info.not_after);
    let client = ApnsClient::with_identity(settings.clone(), metrics.clone(), Some(&identity))
        .map_err(SetupError::Client)?;
    info!(
        bundle_id = %app.bundle_id,
        subject = %identity.info.subject(),
        expires = %rfc3339(identity.info.not_after),
        "APNs certificate loaded"
    );
    Ok((
        Arc::new(ProviderToken::none(metrics.clone())),
        Arc::new(client),
    ))
}

type Parts = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn from_pem(data: &[u8]) -> Result<Parts, String> {
    let text = String::from_utf8_lossy(data);
    // PKCS#8 `ENCRYPTED PRIVATE KEY`, or OpenSSL's traditional encrypted PEM.
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(
            "the private key is encrypted: decrypt it once with `openssl pkey -in \
                    key.pem -out key-plain.pem` (or use the .p12 with cert_password_file)"
                .into(),
        );
    }
    let chain = CertificateDer::pem_slice_iter(data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no \"BEGIN CERTIFICATE\" block".into());
    }
    let key = PrivateKeyDer::from_pem_slice(data).map_err(|_| {
        "no private key (\"BEGIN PRIVATE KEY\" or \"BEGIN RSA PRIVATE KEY\"): put the key \
         in the same file after the certificate"
            .to_string()
    })?;
    Ok((chain, key))
}

fn from_pkcs12(data: &[u8], password: &str) -> Result<Parts, String> {
    let store = p12_keystore::KeyStore::from_pkcs12(data, password).map_err(|e| {
        format!("not a PKCS#12 file this password opens ({e}); check cert_password_file")
    })?;
    let (_, chain) = store
        .private_key_chain()
        .ok_or("the PKCS#12 file holds no private key: export the certificate together with its key (Keychain Access: select both, Export 2 items)")?;
    let certs = chain
        .chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(chain.key().to_vec()));
    Ok((certs, key))
}

#[cfg(test)]
mod tests;
