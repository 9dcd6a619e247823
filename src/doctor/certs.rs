//! Certificate apps (`cert_file` instead of a `.p8` key): the configuration, the
//! certificate itself (it loads, names the configured bundle, can push VoIP),
//! its expiry, and what APNs' answers to the probe mean for a certificate.

use std::sync::Arc;

use super::config::ConfiguredApp;
use super::{Check, Section, Status};
use crate::apns::cert::{rfc3339, CertError, ClientIdentity};
use crate::apns::token::unix_now;

/// Warn this long before a certificate expires: the shipped alert's horizon, and
/// time enough to create, export and deploy a new one.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// `config.app` of a certificate app: the file is set and readable, no key too.
pub fn check_app(ca: &ConfiguredApp, c: Check) -> Check {
    let app = &ca.app;
    let key = |f: &str| ca.source.key(f);
    let cert_file = app.cert_file.as_deref().unwrap_or(std::path::Path::new(""));
    if !app.key_file.as_os_str().is_empty() {
        return c.fail(
            "both a key file and a certificate are set",
            format!(
                "an app authenticates with a .p8 key or a certificate: unset {} or {}",
                key("key_file"),
                key("cert_file")
            ),
        );
    }
    if let Err(e) = std::fs::File::open(cert_file) {
        return c.fail(
            format!("cannot read certificate {}: {e}", cert_file.display()),
            format!(
                "point {} at the VoIP Services certificate (.p12 exported from Keychain \
                 Access, or PEM certificate + key) and make it readable by this user",
                key("cert_file")
            ),
        );
    }
    c.pass(format!(
        "topic {}, certificate {}",
        app.voip_topic(),
        cert_file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    ))
}

/// `cert.load`: the certificate and key load and name the configured bundle;
/// the identity when they do.
pub fn load(ca: &ConfiguredApp) -> (Option<Arc<ClientIdentity>>, Check) {
    let app = &ca.app;
    let key = |f: &str| ca.source.key(f);
    let c = Check::new(
        "cert.load",
        Section::Keys,
        format!("certificate {}", app.bundle_id),
    )
    .app(&app.bundle_id);
    let cert_file = app.cert_file.as_deref().unwrap_or(std::path::Path::new(""));
    let id = match ClientIdentity::load(cert_file, app.cert_password_file.as_deref()) {
        Ok(id) => id,
        Err(
            e @ CertError::Read {
                what: "certificate",
                ..
            },
        ) => return (None, c.skip(e.to_string())),
        Err(e) => {
            let fix = format!(
                "{} must be the VoIP Services certificate with its private key: a .p12 \
                 exported from Keychain Access (certificate and key selected) with its \
                 password in the file {} names, or one PEM file with the certificate and \
                 an unencrypted key",
                key("cert_file"),
                key("cert_password_file")
            );
            return (None, c.fail(e.to_string(), fix));
        }
    };
    let info = &id.info;
    let data = serde_json::json!({
        "subject": info.subject(),
        "bundleId": info.bundle_id,
        "teamId": info.team_id,
        "notAfter": info.not_after,
    });
    let c = c.with_data(data);
    // Expiry is cert.expiry's to judge; this check is about whose certificate it is.
    let check = match id.check_app(&app.bundle_id) {
        Err(e) => {
            let fix = match &e {
                CertError::WrongBundle { found, .. } => format!(
                    "set {} to {found}, or {} to the VoIP Services certificate of {}",
                    key("bundle_id"),
                    key("cert_file"),
                    app.bundle_id
                ),
                _ => format!(
                    "create a VoIP Services certificate for {} (developer portal: \
                     Certificates, +, VoIP Services Certificate) and point {} at it",
                    app.bundle_id,
                    key("cert_file")
                ),
            };
            // Still probed: APNs' own answer is shown beside this verdict.
            c.fail(e.to_string(), fix)
        }
        Ok(()) => c.pass(format!(
            "{}: a VoIP certificate of {}",
            info.subject(),
            app.bundle_id
        )),
    };
    (Some(Arc::new(id)), check)
}

/// `cert.expiry` of a loaded certificate: passes with the date and days left,
/// warns within [`EXPIRY_WARNING_DAYS`], fails once expired (or not yet valid).
pub fn expiry(bundle_id: &str, id: &ClientIdentity, now: i64) -> Check {
    let info = &id.info;
    let c = Check::new(
        "cert.expiry",
        Section::Keys,
        format!("certificate expiry {bundle_id}"),
    )
    .app(bundle_id)
    .with_data(serde_json::json!({
        "notAfter": info.not_after,
        "daysLeft": info.days_left(now),
    }));
    let renew = "create a new VoIP Services certificate in the developer portal \
                 (Certificates, +), export it with its key as .p12 and replace the file; \
                 the worker loads it at start";
    let until = rfc3339(info.not_after);
    let days = info.days_left(now);
    if now < info.not_before {
        c.fail(
            format!("not valid before {}", rfc3339(info.not_before)),
            "check this machine's clock (NTP), or wait until the certificate is valid",
        )
    } else if now >= info.not_after {
        c.fail(format!("expired at {until}: APNs refuses it"), renew)
    } else if days < EXPIRY_WARNING_DAYS {
        c.warn(format!("expires at {until}, in {days} days"), renew)
    } else {
        c.pass(format!("expires at {until}, in {days} days"))
    }
}

/// The `cert.expiry` checks of every certificate that loaded.
pub fn expiries(keys: &[super::config::KeyCheck]) -> Vec<Check> {
    let now = unix_now() as i64;
    keys.iter()
        .filter_map(|k| Some(expiry(&k.app.app.bundle_id, k.identity.as_deref()?, now)))
        .collect()
}

/// APNs' answers that mean something else for a certificate than for a key;
/// `None`: the key table ([`super::apns::verdict`]) says it as well.
pub fn verdict(
    status: u16,
    reason: Option<&str>,
    topic: &str,
    id: &ClientIdentity,
) -> Option<(Status, String, Option<String>)> {
    let answer = format!("{status} {}", reason.unwrap_or(""));
    let subject = id.info.subject();
    let fail = |detail: String, fix: String| Some((Status::Fail, detail, Some(fix)));
    match (status, reason?) {
        // APNs checks the certificate and topic before the made-up device token.
        (400, "BadDeviceToken") => Some((
            Status::Pass,
            format!("certificate and topic {topic} accepted ({answer} for a made-up token)"),
            None,
        )),
        (400, "TopicDisallowed") => fail(
            format!("{answer}: the certificate ({subject}) may not push to {topic}"),
            "use the VoIP Services certificate of this bundle id, or set the bundle id \
             the certificate names"
                .into(),
        ),
        (403, "BadCertificate") => fail(
            format!("{answer}: APNs refuses the certificate ({subject})"),
            "create a new VoIP Services certificate in the developer portal and export \
             it with its key; a revoked certificate is refused too"
                .into(),
        ),
        (403, "BadCertificateEnvironment") => fail(
            format!("{answer}: the certificate ({subject}) is for the other environment"),
            "use a VoIP Services certificate: it serves sandbox and production alike".into(),
        ),
        (403, "MissingProviderToken") => fail(
            format!("{answer}: APNs did not see the certificate"),
            "something between us and APNs terminates TLS and drops the client \
             certificate: connect to APNs directly"
                .into(),
        ),
        _ => None,
    }
}
