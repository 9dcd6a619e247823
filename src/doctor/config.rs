//! Configuration checks: the configuration loads, every app is complete and
//! consistent, and each signing key parses and signs a provider token.

use std::path::Path;
use std::sync::Arc;

use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

use super::{Check, Section};
use crate::apns::cert::ClientIdentity;
use crate::apns::token::{unix_now, KeyError, SigningKey};
use crate::config::{AppConfig, Config, ConfigError};

/// Where an app's settings live, so a fix names the exact key to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppSource {
    /// `VPW__APNS__BUNDLE_ID` and friends (or `[apns]` in the file).
    Shorthand,
    /// `[[apns.apps]]` entry number `n` (from 1) in the configuration file.
    List(usize),
}

impl AppSource {
    /// The setting that holds `field` of this app.
    pub fn key(&self, field: &str) -> String {
        match self {
            AppSource::Shorthand => format!("VPW__APNS__{}", field.to_ascii_uppercase()),
            AppSource::List(n) => format!("{field} of [[apns.apps]] #{n}"),
        }
    }
}

/// An app with where its settings come from.
#[derive(Clone, Debug)]
pub struct ConfiguredApp {
    pub app: AppConfig,
    pub source: AppSource,
}

/// The apps in [`Config::apps`]' order, each with its source.
pub fn apps(cfg: &Config) -> Vec<ConfiguredApp> {
    cfg.apps()
        .into_iter()
        .map(|app| {
            let source = match cfg.apns.apps.iter().position(|a| *a == app) {
                Some(i) => AppSource::List(i + 1),
                None => AppSource::Shorthand,
            };
            ConfiguredApp { app, source }
        })
        .collect()
}

/// The same sources as [`Config::load`] without its validation, so an invalid
/// configuration can still be diagnosed in full.
pub fn load_unvalidated(file: Option<&Path>) -> Result<Config, ConfigError> {
    Config::load_unvalidated_from(file, None)
}

/// The only check when the configuration cannot even be read.
pub fn unreadable(e: &ConfigError) -> Check {
    Check::new("config.load", Section::Configuration, "configuration loads").fail(
        e.to_string(),
        "correct the value named above in the file given by --config/VPW_CONFIG or in its \
         VPW__SECTION__KEY variable (numbers must be numbers; see the README's \
         Configuration table)",
    )
}

/// Apple's team and key ids are ten upper-case letters and digits.
fn looks_like_apple_id(s: &str) -> bool {
    s.len() == 10
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// The key id in a file name as Apple hands it out: `AuthKey_<KEYID>.p8`.
fn key_id_in_file_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let id = name.strip_prefix("AuthKey_")?.strip_suffix(".p8")?;
    Some(id.to_string())
}

/// `config.load` and one `config.app` per app.
pub fn check(cfg: &Config) -> Vec<Check> {
    let apps = apps(cfg);
    let mut out = Vec::new();
    let load = Check::new("config.load", Section::Configuration, "configuration loads");
    out.push(match cfg.validate_for_push() {
        Ok(()) => load.pass(format!(
            "{} app{}",
            apps.len(),
            if apps.len() == 1 { "" } else { "s" }
        )),
        Err(_) if apps.is_empty() => load.fail(
            "no APNs app configured",
            "set VPW__APNS__BUNDLE_ID, VPW__APNS__TEAM_ID, VPW__APNS__KEY_ID and \
             VPW__APNS__KEY_FILE, or VPW__APNS__BUNDLE_ID and VPW__APNS__CERT_FILE (or \
             add [[apns.apps]] entries to the config file)",
        ),
        Err(e) => load.fail(
            e.to_string(),
            "correct the setting named above; the app checks below say exactly what to set",
        ),
    });
    for ca in &apps {
        out.push(check_app(ca));
    }
    out
}

fn check_app(ca: &ConfiguredApp) -> Check {
    let app = &ca.app;
    let c = Check::new(
        "config.app",
        Section::Configuration,
        format!("app {}", app.bundle_id),
    )
    .app(&app.bundle_id);
    let key = |f: &str| ca.source.key(f);
    if app.bundle_id.is_empty() {
        return c.fail(
            "no bundle id",
            format!(
                "set {} to the app's bundle id, e.g. com.example.chat",
                key("bundle_id")
            ),
        );
    }
    if let Some(base) = app.bundle_id.strip_suffix(".voip") {
        return c.fail(
            format!("bundle id {} ends in .voip", app.bundle_id),
            format!(
                "set {} to {base}: the VoIP topic is <bundle id>.voip and the worker \
                 adds .voip itself (now it would send {}.voip)",
                key("bundle_id"),
                app.bundle_id
            ),
        );
    }
    if app.uses_certificate() {
        return super::certs::check_app(ca, c);
    }
    if app.team_id.is_empty() {
        return c.fail(
            "no team id",
            format!(
                "set {} to the 10-character Team ID (developer portal, Membership)",
                key("team_id")
            ),
        );
    }
    if app.key_id.is_empty() {
        return c.fail(
            "no key id",
            format!(
                "set {} to the 10-character Key ID of the APNs key (it is in the \
                 file name AuthKey_<KEYID>.p8)",
                key("key_id")
            ),
        );
    }
    if app.key_file.as_os_str().is_empty() {
        return c.fail(
            "no key file",
            format!(
                "set {} to the path of AuthKey_{}.p8",
                key("key_file"),
                app.key_id
            ),
        );
    }
    if let Err(e) =
        std::fs::metadata(&app.key_file).and_then(|_| std::fs::File::open(&app.key_file))
    {
        return c.fail(
            format!("cannot read key file {}: {e}", app.key_file.display()),
            format!(
                "point {} at the .p8 file downloaded from Apple and make it readable by \
                 this user",
                key("key_file")
            ),
        );
    }
    let summary = format!(
        "topic {}, team {}, key {}",
        app.voip_topic(),
        app.team_id,
        app.key_id
    );
    if let Some(in_name) = key_id_in_file_name(&app.key_file) {
        if in_name != app.key_id {
            return c.warn(
                format!("{summary}; but the key file is AuthKey_{in_name}.p8"),
                format!(
                    "Apple names a key's file after its key id: set {} to {in_name}, or \
                     {} to AuthKey_{}.p8",
                    key("key_id"),
                    key("key_file"),
                    app.key_id
                ),
            );
        }
    }
    for (field, value) in [("team_id", &app.team_id), ("key_id", &app.key_id)] {
        if !looks_like_apple_id(value) {
            return c.warn(
                format!("{summary}; {field} {value:?} is not 10 letters/digits"),
                format!(
                    "Apple's ids are 10 upper-case letters and digits: copy {} from \
                     the developer portal",
                    key(field)
                ),
            );
        }
    }
    c.pass(summary)
}

/// An app whose key (or certificate) was tried: the key when it parsed, the
/// certificate when it loaded, and the `key.sign` (or `cert.load`) check.
pub struct KeyCheck {
    pub app: ConfiguredApp,
    pub key: Option<Arc<SigningKey>>,
    pub identity: Option<Arc<ClientIdentity>>,
    pub check: Check,
}

/// Parses each app's key as PKCS#8 P-256, signs a provider token and verifies
/// it; loads each certificate app's certificate.
pub fn keys(cfg: &Config) -> Vec<KeyCheck> {
    apps(cfg)
        .into_iter()
        .map(|ca| {
            if ca.app.uses_certificate() {
                let (identity, check) = super::certs::load(&ca);
                return KeyCheck {
                    app: ca,
                    key: None,
                    identity,
                    check,
                };
            }
            let app = &ca.app;
            let c = Check::new("key.sign", Section::Keys, format!("key {}", app.key_id))
                .app(&app.bundle_id);
            if app.key_file.as_os_str().is_empty() {
                let check = c.skip("no key file configured");
                return KeyCheck {
                    app: ca,
                    key: None,
                    identity: None,
                    check,
                };
            }
            let key_file = ca.source.key("key_file");
            let (key, check) =
                match SigningKey::from_p8_file(&app.key_file, &app.team_id, &app.key_id) {
                    Ok(key) => {
                        let token = key.sign(unix_now());
                        let verified = token
                            .rsplit_once('.')
                            .and_then(|(input, sig)| {
                                use base64::Engine;
                                let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
                                    .decode(sig)
                                    .ok()?;
                                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_key())
                                    .verify(input.as_bytes(), &sig)
                                    .ok()
                            })
                            .is_some();
                        if verified {
                            let file = app.key_file.file_name().unwrap_or_default();
                            let c = c.pass(format!(
                                "{} (P-256) signs ES256 provider tokens",
                                file.to_string_lossy()
                            ));
                            (Some(Arc::new(key)), c)
                        } else {
                            let c = c.fail(
                                "a provider token signed with this key does not verify",
                                format!("download the key again and point {key_file} at it"),
                            );
                            (None, c)
                        }
                    }
                    Err(e @ KeyError::Read { .. }) => (None, c.skip(format!("{e}"))),
                    Err(e) => (
                        None,
                        c.fail(
                            e.to_string(),
                            format!(
                                "{key_file} must be the AuthKey_{}.p8 file exactly as \
                                 downloaded from Apple (Keys, Apple Push Notifications \
                                 service): PEM \"BEGIN PRIVATE KEY\", P-256; not a \
                                 certificate or a .p12",
                                app.key_id
                            ),
                        ),
                    ),
                };
            KeyCheck {
                app: ca,
                key,
                identity: None,
                check,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixes_name_the_setting_of_the_app() {
        assert_eq!(AppSource::Shorthand.key("key_id"), "VPW__APNS__KEY_ID");
        assert_eq!(
            AppSource::List(2).key("team_id"),
            "team_id of [[apns.apps]] #2"
        );
    }

    #[test]
    fn apple_ids_and_key_file_names() {
        assert!(looks_like_apple_id("ABCDE12345"));
        assert!(!looks_like_apple_id("abc"));
        assert_eq!(
            key_id_in_file_name(Path::new("/keys/AuthKey_ABCDE12345.p8")).as_deref(),
            Some("ABCDE12345")
        );
        assert_eq!(key_id_in_file_name(Path::new("/keys/push.p8")), None);
    }

    #[test]
    fn a_bundle_id_with_voip_names_the_topic_rule() {
        let cfg = Config {
            apns: crate::config::ApnsConfig {
                bundle_id: "com.example.chat.voip".into(),
                team_id: "ABCDE12345".into(),
                key_id: "KEY1234567".into(),
                key_file: Some("/nonexistent/AuthKey_KEY1234567.p8".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let checks = check(&cfg);
        assert_eq!(checks[0].status, super::super::Status::Fail);
        let app = &checks[1];
        assert_eq!(app.status, super::super::Status::Fail);
        let fix = app.fix.as_deref().unwrap();
        assert!(
            fix.contains("set VPW__APNS__BUNDLE_ID to com.example.chat:"),
            "{fix}"
        );
        assert!(fix.contains("<bundle id>.voip"), "{fix}");
    }
}
