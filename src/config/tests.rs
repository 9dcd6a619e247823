//! Loading and validation.

use super::*;
use crate::event::Environment;

fn env(pairs: &[(&str, &str)]) -> config::Map<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_match_the_contract() {
    let cfg = Config::load_from(None, Some(env(&[]))).unwrap();
    assert_eq!(cfg.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
    assert_eq!(
        cfg.postgres.url,
        "postgres://postgres@127.0.0.1:5432/voip_push"
    );
    assert_eq!(cfg.http.listen, "0.0.0.0:9464");
    assert_eq!(cfg.apns.production_url, "https://api.push.apple.com");
    assert_eq!(cfg.apns.sandbox_url, "https://api.sandbox.push.apple.com");
    assert_eq!(cfg.apns.default_environment, Environment::Production);
    assert_eq!(cfg.worker.ring_timeout_secs, 45);
    assert_eq!(cfg.amqp.work_queue, "voip-push.calls");
}

#[test]
fn env_vars_override_with_double_underscores_and_keep_digit_strings() {
    let cfg = Config::load_from(
        None,
        Some(env(&[
            ("VPW__WORKER__RING_TIMEOUT_SECS", "30"),
            ("VPW__APNS__TEAM_ID", "0123456789"),
            ("VPW__APNS__KEY_ID", "ABC123DEFG"),
            ("VPW__APNS__KEY_FILE", "/keys/AuthKey.p8"),
            ("VPW__APNS__BUNDLE_ID", "com.example.app"),
            ("VPW__APNS__DEFAULT_ENVIRONMENT", "sandbox"),
        ])),
    )
    .unwrap();
    assert_eq!(cfg.worker.ring_timeout_secs, 30);
    assert_eq!(cfg.apns.default_environment, Environment::Sandbox);
    let apps = cfg.apps();
    assert_eq!(apps.len(), 1);
    assert_eq!(apps[0].team_id, "0123456789");
    assert_eq!(apps[0].voip_topic(), "com.example.app.voip");
}

#[test]
fn inconsistent_app_is_rejected_with_a_reason() {
    let err = Config::load_from(
        None,
        Some(env(&[("VPW__APNS__BUNDLE_ID", "com.example.app")])),
    )
    .unwrap_err();
    assert!(err.to_string().contains("has no team_id"), "{err}");
    let err = Config::load_from(
        None,
        Some(env(&[
            ("VPW__APNS__BUNDLE_ID", "com.example.app.voip"),
            ("VPW__APNS__TEAM_ID", "T"),
            ("VPW__APNS__KEY_ID", "K"),
            ("VPW__APNS__KEY_FILE", "/k.p8"),
        ])),
    )
    .unwrap_err();
    assert!(err.to_string().contains("must not end in .voip"), "{err}");
}

#[test]
fn non_numeric_value_is_a_clear_error() {
    let err = Config::load_from(
        None,
        Some(env(&[("VPW__WORKER__RING_TIMEOUT_SECS", "soon")])),
    )
    .unwrap_err();
    assert!(err.to_string().contains("ring_timeout_secs"), "{err}");
}

#[test]
fn debug_output_redacts_passwords() {
    let mut cfg = Config::default();
    cfg.amqp.url = "amqp://user:hunter2@rabbit:5672/%2f".into();
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("hunter2"));
    assert!(shown.contains("user:***@rabbit"));
    cfg.http.service_token = Some("svc-secret-1".into());
    cfg.http.user_jwt_secret = Some("jwt-secret-2".into());
    cfg.twilio.api_key_secret = Some("twilio-secret-3".into());
    let shown = format!("{cfg:?}");
    for secret in ["svc-secret-1", "jwt-secret-2", "twilio-secret-3"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("<redacted>"));
}

#[test]
fn secrets_come_from_files_named_by_file_keys() {
    let dir = std::env::temp_dir().join(format!("vpw-secrets-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let pg = write(
        "pg",
        "postgres://app:s3cr%40t@db.example.com/voip?sslmode=verify-full\n",
    );
    let token = write("token", "tok en\r\n");
    let toml = dir.join("config.toml");
    std::fs::write(
        &toml,
        format!(
            "[twilio]\napi_key_secret_file = {:?}\n",
            write("twilio", "tw")
        ),
    )
    .unwrap();
    let cfg = Config::load_from(
        Some(&toml),
        Some(env(&[
            ("VPW__POSTGRES__URL_FILE", &pg),
            ("VPW__HTTP__SERVICE_TOKEN_FILE", &token),
        ])),
    )
    .unwrap();
    assert_eq!(
        cfg.postgres.url,
        "postgres://app:s3cr%40t@db.example.com/voip?sslmode=verify-full"
    );
    assert_eq!(cfg.http.service_token.as_deref(), Some("tok en"));
    assert_eq!(cfg.twilio.api_key_secret.as_deref(), Some("tw"));
    // Unset secrets keep their defaults.
    assert_eq!(cfg.amqp.url, AmqpConfig::default().url);

    let err = Config::load_from(
        None,
        Some(env(&[
            ("VPW__POSTGRES__URL_FILE", &pg),
            ("VPW__POSTGRES__URL", "postgres://x@y/z"),
        ])),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not both"), "{err}");
    let err = Config::load_from(
        None,
        Some(env(&[("VPW__AMQP__URL_FILE", "/nonexistent/amqp-url")])),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("amqp.url_file \"/nonexistent/amqp-url\""),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn file_variables_are_named_as_the_environment_spells_them() {
    let vars: Vec<String> = secrets::file_env_vars().collect();
    assert!(vars.contains(&"VPW__POSTGRES__URL_FILE".to_string()));
    assert!(vars.contains(&"VPW__HTTP__SERVICE_TOKEN_FILE".to_string()));
}

#[test]
fn http_limits_load_from_the_environment_and_are_checked() {
    let cfg = Config::load_from(
        None,
        Some(env(&[
            ("VPW__HTTP__TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.1"),
            ("VPW__HTTP__HEADER_READ_TIMEOUT_MS", "2500"),
            ("VPW__HTTP__USER_JWT_ISSUER", "https://auth.example.com"),
        ])),
    )
    .unwrap();
    assert_eq!(cfg.http.trusted_proxies, ["10.0.0.0/8", "192.0.2.1"]);
    assert_eq!(cfg.http.header_read_timeout_ms, 2500);
    assert_eq!(cfg.http.max_connections, 512);
    assert_eq!(cfg.http.long_poll_pool_size, 1);
    assert_eq!(cfg.http.user_jwt_max_lifetime_secs, 86_400);
    let file = std::env::temp_dir().join(format!("vpw-proxies-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        "[http]\ntrusted_proxies = [\"10.0.0.1\", \"fd00::/8\"]\n",
    )
    .unwrap();
    let from_file = Config::load_from(Some(&file), Some(env(&[])));
    let _ = std::fs::remove_file(&file);
    assert_eq!(
        from_file.unwrap().http.trusted_proxies,
        ["10.0.0.1", "fd00::/8"]
    );
    for (key, value, says) in [
        (
            "VPW__HTTP__TRUSTED_PROXIES",
            "10.0.0.0/40",
            "http.trusted_proxies",
        ),
        (
            "VPW__HTTP__BODY_READ_TIMEOUT_MS",
            "0",
            "body_read_timeout_ms",
        ),
        ("VPW__HTTP__MAX_CONNECTIONS", "0", "max_connections"),
        ("VPW__HTTP__LONG_POLL_POOL_SIZE", "0", "long_poll_pool_size"),
        (
            "VPW__HTTP__USER_JWT_MAX_LIFETIME_SECS",
            "0",
            "user_jwt_max_lifetime_secs",
        ),
    ] {
        let err = Config::load_from(None, Some(env(&[(key, value)]))).unwrap_err();
        assert!(err.to_string().contains(says), "{key}: {err}");
    }
}

#[test]
fn cancel_push_takes_a_mode_or_the_older_boolean() {
    use crate::config::CancelPush;
    let load = |v: &str| {
        Config::load_from(None, Some(env(&[("VPW__WORKER__CANCEL_PUSH", v)])))
            .map(|c| c.worker.cancel_push)
    };
    assert_eq!(Config::default().worker.cancel_push, CancelPush::Alert);
    assert_eq!(load("voip").unwrap(), CancelPush::Voip);
    assert_eq!(load("alert").unwrap(), CancelPush::Alert);
    assert_eq!(load("off").unwrap(), CancelPush::Off);
    assert_eq!(load("true").unwrap(), CancelPush::Voip);
    assert_eq!(load("false").unwrap(), CancelPush::Off);
    assert!(load("loud").is_err());
    let dir = std::env::temp_dir().join(format!("vpw-cancel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(&file, "[worker]\ncancel_push = false\n").unwrap();
    let cfg = Config::load_from(Some(&file), Some(env(&[]))).unwrap();
    assert_eq!(cfg.worker.cancel_push, CancelPush::Off);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_supervisors_names_cover_every_amqp_object_and_reach_its_worker_processes() {
    let mut cfg = Config::default();
    cfg.name_amqp_objects("sup.1");
    let (queues, exchanges) = cfg.amqp_objects();
    let env = cfg.process_env();
    for name in queues.iter().chain(&exchanges) {
        assert!(name.starts_with("sup.1."), "{name} keeps a default name");
        assert!(
            env.iter().any(|(_, v)| v == name),
            "{name} does not reach a worker process"
        );
    }
    let distinct: std::collections::BTreeSet<_> = queues.iter().chain(&exchanges).collect();
    assert_eq!(distinct.len(), 10, "every object has a name of its own");
}
