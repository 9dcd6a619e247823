//! VoIP Services certificates in the simulator: issuing them from the
//! simulator's CA (for tests and laptops — Apple's subject layout, PEM or
//! PKCS#12), and APNs' rules for a push on a connection that presented one.

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use time::{Duration, OffsetDateTime};

use super::validate::Refusal;
use crate::apns::cert::CertInfo;
use crate::event::Environment;

/// The subject attribute `UID` (RFC 4519), where Apple writes the topic.
const UID: [u64; 7] = [0, 9, 2342, 19200300, 100, 1, 1];

/// What a client certificate says: Apple's subject fields and its validity.
#[derive(Clone, Debug)]
pub struct CertSpec {
    pub uid: Option<String>,
    pub common_name: Option<String>,
    pub team_id: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CertSpec {
    /// A VoIP Services certificate for `bundle_id`, as Apple issues it: `UID=<bundle>.voip,
    /// CN=VoIP Services: <bundle>, OU=<team>`, valid since yesterday for a year.
    pub fn voip(bundle_id: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            uid: Some(format!("{bundle_id}.voip")),
            common_name: Some(format!("VoIP Services: {bundle_id}")),
            team_id: "SIMTEAM001".into(),
            not_before: now - Duration::days(1),
            not_after: now + Duration::days(365),
        }
    }

    /// The same, valid from `not_before` to `not_after`.
    pub fn valid(mut self, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }
}

/// A client certificate and its private key (PKCS#8).
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl IssuedCert {
    /// Certificate then key in one PEM file, as `openssl pkcs12 -nodes` and Twilio's
    /// instructions produce.
    pub fn pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }

    /// A PKCS#12 file as Keychain Access exports it: legacy triple-DES encryption
    /// and an HMAC-SHA1 integrity check (`aes`: the AES-256 scheme newer OpenSSL
    /// writes instead).
    pub fn pkcs12(&self, password: &str, aes: bool) -> Result<Vec<u8>, String> {
        use p12_keystore::{
            Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm,
            PrivateKeyChain,
        };
        let cert = Certificate::from_der(&self.cert_der).map_err(|e| e.to_string())?;
        let chain = PrivateKeyChain::new(&self.key_der, b"voip-push-worker", [cert]);
        let mut store = KeyStore::new();
        store.add_entry("voip services", KeyStoreEntry::PrivateKeyChain(chain));
        let (encryption, mac) = if aes {
            (
                EncryptionAlgorithm::PbeWithHmacSha256AndAes256,
                MacAlgorithm::HmacSha256,
            )
        } else {
            (
                EncryptionAlgorithm::PbeWithShaAnd3KeyTripleDesCbc,
                MacAlgorithm::HmacSha1,
            )
        };
        store
            .writer(password)
            .encryption_algorithm(encryption)
            .mac_algorithm(mac)
            .write()
            .map_err(|e| e.to_string())
    }
}

/// Issues a client certificate signed by `issuer`.
pub fn issue(issuer: &Issuer<'static, KeyPair>, spec: &CertSpec) -> Result<IssuedCert, String> {
    let e = |e: rcgen::Error| e.to_string();
    let key = KeyPair::generate().map_err(e)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    if let Some(uid) = &spec.uid {
        params
            .distinguished_name
            .push(DnType::CustomDnType(UID.to_vec()), uid.as_str());
    }
    if let Some(cn) = &spec.common_name {
        params
            .distinguished_name
            .push(DnType::CommonName, cn.as_str());
    }
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, spec.team_id.as_str());
    params
        .distinguished_name
        .push(DnType::OrganizationName, "voip-push-worker simulator");
    params.distinguished_name.push(DnType::CountryName, "US");
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer).map_err(e)?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    })
}

/// APNs' verdict on the topic of a push sent with a client certificate (the
/// handshake already checked the signature and validity): the app comes from
/// the certificate, not from a provider token. Returns the bundle id.
pub fn check_topic(topic: &str, cert: &CertInfo, env: Environment) -> Result<String, Refusal> {
    let Some(bundle) = &cert.bundle_id else {
        return Err((403, "BadCertificate"));
    };
    if cert.only_environment.is_some_and(|only| only != env) {
        return Err((403, "BadCertificateEnvironment"));
    }
    let voip_topic = format!("{bundle}.voip");
    if (cert.voip && topic == voip_topic) || topic == bundle {
        Ok(bundle.clone())
    } else {
        Err((400, "TopicDisallowed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(cn: &str, uid: Option<&str>) -> CertInfo {
        CertInfo {
            bundle_id: uid.map(|u| u.trim_end_matches(".voip").to_string()),
            uid: uid.map(str::to_string),
            common_name: Some(cn.into()),
            team_id: None,
            not_before: 0,
            not_after: i64::MAX,
            only_environment: None,
            voip: true,
        }
    }

    #[test]
    fn a_certificate_pushes_to_its_own_topic_only() {
        let voip = info("VoIP Services: com.a", Some("com.a.voip"));
        let prod = Environment::Production;
        assert_eq!(check_topic("com.a.voip", &voip, prod), Ok("com.a".into()));
        assert_eq!(
            check_topic("com.b.voip", &voip, prod),
            Err((400, "TopicDisallowed"))
        );
        let nameless = CertInfo {
            bundle_id: None,
            ..info("someone", None)
        };
        assert_eq!(
            check_topic("com.a.voip", &nameless, prod),
            Err((403, "BadCertificate"))
        );
        let sandbox_only = CertInfo {
            only_environment: Some(Environment::Sandbox),
            voip: false,
            ..info("Apple Development IOS Push Services: com.a", Some("com.a"))
        };
        assert_eq!(
            check_topic("com.a", &sandbox_only, prod),
            Err((403, "BadCertificateEnvironment"))
        );
        assert_eq!(
            check_topic("com.a.voip", &sandbox_only, Environment::Sandbox),
            Err((400, "TopicDisallowed"))
        );
    }
}
