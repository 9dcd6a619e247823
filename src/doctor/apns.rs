//! APNs checks: TLS + HTTP/2 to each environment, and whether APNs accepts each
//! app's key and VoIP topic — asked with a push to a device token that cannot exist,
//! so no phone rings. APNs checks the provider token and the topic before the
//! device token, so `400 BadDeviceToken` means "key and topic accepted".

mod verdicts;

use std::sync::Arc;
use std::time::Duration;

use super::config::KeyCheck;
use super::{Check, Section};
use crate::apns::cert::ClientIdentity;
use crate::apns::token::unix_now;
use crate::apns::{ApnsClient, ApnsResponse, ClientSettings, PushRequest, SendError};
use crate::config::Config;
use crate::event::Environment;
use crate::metrics::Metrics;
use verdicts::connect_fix;
pub use verdicts::{verdict, ProbeContext};

/// 32 zero bytes: the length of a real token, but no device ever gets it.
pub const PROBE_TOKEN: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const ENVIRONMENTS: [Environment; 2] = [Environment::Production, Environment::Sandbox];

fn url_of(cfg: &Config, env: Environment) -> &str {
    match env {
        Environment::Production => &cfg.apns.production_url,
        Environment::Sandbox => &cfg.apns.sandbox_url,
    }
}

type Probe = (usize, Environment, Result<ApnsResponse, SendError>);

/// `apns.connect` per environment, then `apns.accept` per app and environment.
pub async fn check(cfg: &Config, keys: &[KeyCheck], timeout: Duration) -> Vec<Check> {
    let extra_roots_pem = match &cfg.apns.ca_file {
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                return ENVIRONMENTS
                    .iter()
                    .map(|env| {
                        connect_check(*env).fail(
                            format!("cannot read CA file {}: {e}", path.display()),
                            "fix VPW__APNS__CA_FILE or unset it to trust only the public roots \
                             (what Apple's servers need)",
                        )
                    })
                    .collect()
            }
        },
        None => None,
    };
    let settings = ClientSettings {
        production_url: cfg.apns.production_url.clone(),
        sandbox_url: cfg.apns.sandbox_url.clone(),
        extra_roots_pem,
        connections_per_environment: 1,
        request_timeout: timeout,
        pings: cfg.apns.ping_settings(),
    };
    let trust = crate::apns::client::trusted_roots(settings.extra_roots_pem.as_deref())
        .map(|roots| super::trust::trust_store(&roots.roots));
    // APNs binds a connection to the key of its first push, so each key gets its
    // own client, and each certificate app one presenting its certificate (and no
    // provider token); without any, an unsigned probe still tests TLS + HTTP/2.
    type ProbeWith = (usize, Arc<str>, String, Option<Arc<ClientIdentity>>);
    let signed: Vec<ProbeWith> = keys
        .iter()
        .enumerate()
        .filter_map(|(i, k)| {
            let topic = k.app.app.voip_topic();
            match (&k.key, &k.identity) {
                (Some(key), _) => Some((i, Arc::from(key.sign(unix_now())), topic, None)),
                // An expired certificate is refused in the handshake: cert.expiry says so.
                (None, Some(id)) if id.check_valid(unix_now() as i64).is_ok() => {
                    Some((i, Arc::from(""), topic, Some(id.clone())))
                }
                (None, _) => None,
            }
        })
        .collect();
    let probes: Vec<ProbeWith> = if signed.is_empty() {
        vec![(
            usize::MAX,
            Arc::from("unsigned"),
            "doctor.voip".to_string(),
            None,
        )]
    } else {
        signed
    };
    let mut tasks = Vec::new();
    for (i, provider_token, topic, identity) in probes {
        let client = match ApnsClient::with_identity(
            settings.clone(),
            Metrics::new(),
            identity.as_deref(),
        ) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                return ENVIRONMENTS
                    .iter()
                    .map(|env| {
                        connect_check(*env).fail(
                            format!("APNs client: {e}"),
                            "fix VPW__APNS__CA_FILE (PEM certificates) and the APNs URLs \
                             (https://host[:port], no path)",
                        )
                    })
                    .collect();
            }
        };
        for env in ENVIRONMENTS {
            let req = PushRequest {
                push_type: Default::default(),
                token: PROBE_TOKEN.into(),
                topic: topic.clone(),
                provider_token: provider_token.clone(),
                apns_id: uuid::Uuid::new_v4(),
                expiration: 0,
                priority: 10,
                collapse_id: "voip-push-worker-doctor".into(),
                payload: bytes::Bytes::from_static(br#"{"aps":{}}"#),
            };
            let client = client.clone();
            tasks.push(async move { (i, env, client.send(env, &req, timeout).await) });
        }
    }
    let results: Vec<Probe> = futures_util::future::join_all(tasks).await;

    let mut out: Vec<Check> = trust.into_iter().collect();
    let mut connected = Vec::new();
    for env in ENVIRONMENTS {
        let url = url_of(cfg, env);
        let mut of_env = results.iter().filter(|(_, e, _)| *e == env);
        let ok = of_env
            .clone()
            .find(|(_, _, r)| matches!(r, Ok(_) | Err(SendError::Transport { .. })));
        let c = connect_check(env);
        out.push(match ok {
            Some((_, _, r)) => {
                connected.push(env);
                let latency = r
                    .as_ref()
                    .map(|a| format!(", answered in {} ms", a.latency.as_millis()))
                    .unwrap_or_default();
                c.pass(format!("{url}: TLS ok, ALPN h2{latency}"))
            }
            None => match of_env.next() {
                Some((_, _, Err(e))) => c.fail(e.to_string(), connect_fix(e, env, url)),
                _ => c.skip("nothing to probe with"),
            },
        });
    }
    for (i, env, result) in &results {
        let Some(k) = keys.get(*i) else { continue };
        let app = &k.app.app;
        let topic = app.voip_topic();
        let key_file = app
            .key_file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let c = Check::new(
            "apns.accept",
            Section::Apns,
            format!("{}: {}", env.as_str(), app.bundle_id),
        )
        .app(&app.bundle_id)
        .environment(*env);
        out.push(match result {
            Ok(resp) => {
                let ctx = ProbeContext {
                    environment: *env,
                    topic: &topic,
                    team_id: &app.team_id,
                    key_id: &app.key_id,
                    key_file: &key_file,
                    source: &k.app.source,
                };
                let reason = resp.reason.as_deref();
                let (status, detail, fix) = k
                    .identity
                    .as_deref()
                    .and_then(|id| super::certs::verdict(resp.status, reason, &topic, id))
                    .unwrap_or_else(|| verdict(resp.status, reason, &ctx));
                let mut c = c.with_data(serde_json::json!({
                    "topic": topic,
                    "apnsStatus": resp.status,
                    "reason": resp.reason,
                }));
                c.status = status;
                c.detail = detail;
                c.fix = fix;
                c
            }
            Err(_) if !connected.contains(env) => c.skip("no connection (see above)"),
            Err(e) => c.fail(e.to_string(), connect_fix(e, *env, url_of(cfg, *env))),
        });
    }
    let answers = results.iter().filter_map(|(_, _, r)| r.as_ref().ok());
    out.push(super::trust::clock(answers, unix_now() as i64));
    // Keys that could not be used still get a line per environment, so every app
    // shows up in the APNs section.
    for (i, k) in keys.iter().enumerate() {
        if results.iter().any(|(j, _, _)| *j == i) {
            continue;
        }
        for env in ENVIRONMENTS {
            out.push(
                Check::new(
                    "apns.accept",
                    Section::Apns,
                    format!("{}: {}", env.as_str(), k.app.app.bundle_id),
                )
                .app(&k.app.app.bundle_id)
                .environment(env)
                .skip("no usable signing key (see above)"),
            );
        }
    }
    out
}

fn connect_check(env: Environment) -> Check {
    Check::new(
        "apns.connect",
        Section::Apns,
        format!("TLS + HTTP/2 to {}", env.as_str()),
    )
    .environment(env)
}

#[cfg(test)]
mod tests;
