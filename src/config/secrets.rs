//! Secrets from files, the Kubernetes way: each secret setting also accepts
//! `<key>_file` (TOML) or `VPW__SECTION__KEY_FILE` (environment) naming a file
//! that holds the value, so a Secret mounted as files never passes through the
//! environment (where `kubectl describe`, crash dumps and child processes see it).

use super::ConfigError;

/// The settings that hold a secret (a password inside a URL counts).
pub const SECRET_KEYS: &[&str] = &[
    "postgres.url",
    "amqp.url",
    "http.service_token",
    "http.user_jwt_secret",
    "twilio.api_key_secret",
];

/// `VPW__POSTGRES__URL_FILE` and the rest: what a supervisor that passes the
/// values themselves (`Config::process_env`) removes from a child's environment.
pub fn file_env_vars() -> impl Iterator<Item = String> {
    SECRET_KEYS
        .iter()
        .map(|k| format!("VPW__{}_FILE", k.replace('.', "__").to_ascii_uppercase()))
}

/// A file's secret: its contents without the trailing newline editors and
/// `echo` add (a secret never ends in one).
fn read_secret(key: &str, path: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Invalid(format!("{key}_file {path:?}: {e}")))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// `built` with each `<key>_file` replaced by the file's contents under `<key>`.
pub fn resolve(built: config::Config) -> Result<config::Config, ConfigError> {
    let mut overrides = Vec::new();
    for key in SECRET_KEYS {
        let file_key = format!("{key}_file");
        let Ok(path) = built.get_string(&file_key) else {
            continue;
        };
        if built.get_string(key).is_ok() {
            return Err(ConfigError::Invalid(format!(
                "set {key} or {file_key}, not both"
            )));
        }
        overrides.push((*key, read_secret(key, &path)?));
    }
    if overrides.is_empty() {
        return Ok(built);
    }
    let mut builder = config::Config::builder().add_source(built);
    for (key, value) in overrides {
        builder = builder.set_override(key, value)?;
    }
    Ok(builder.build()?)
}
