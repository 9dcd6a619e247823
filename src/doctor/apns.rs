//! APNs checks: TLS + HTTP/2 to each environment, and whether APNs accepts each
//! app's key and VoIP topic — asked with a push to a device token that cannot exist,
//! so no phone rings. APNs checks the provider token and the topic before the
//! device token, so `400 BadDeviceToken` means "key and topic accepted".

use std::sync::Arc;
use std::time::Duration;

use super::config::{AppSource, KeyCheck};
use super::{Check, Section, Status};
use crate::apns::cert::ClientIdentity;
use crate::apns::outcome::{classify, Action};
use crate::apns::token::unix_now;
use crate::apns::{ApnsClient, ApnsResponse, ClientSettings, PushRequest, SendError};
use crate::config::Config;
use crate::event::Environment;
use crate::metrics::Metrics;

/// 32 zero bytes: the length of a real token, but no device ever gets it.
pub const PROBE_TOKEN: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const ENVIRONMENTS: [Environment; 2] = [Environment::Production, Environment::Sandbox];

fn url_setting(env: Environment) -> &'static str {
    match env {
        Environment::Production => "VPW__APNS__PRODUCTION_URL",
        Environment::Sandbox => "VPW__APNS__SANDBOX_URL",
    }
}

fn url_of(cfg: &Config, env: Environment) -> &str {
    match env {
        Environment::Production => &cfg.apns.production_url,
        Environment::Sandbox => &cfg.apns.sandbox_url,
    }
}

/// What the probe was sent as, for the texts of the verdict.
pub struct ProbeContext<'a> {
    pub environment: Environment,
    pub topic: &'a str,
    pub team_id: &'a str,
    pub key_id: &'a str,
    /// The key file's name (not its path).
    pub key_file: &'a str,
    pub source: &'a AppSource,
}

/// APNs' answer to the probe → (status, detail, fix). Pure, tested row by row.
/// The verdict comes from the worker's own outcome table (`apns::outcome`):
/// what the worker would retry is a warning, what it would fail on is a
/// failure; this function only adds the explanation and the fix.
pub fn verdict(
    resp_status: u16,
    reason: Option<&str>,
    ctx: &ProbeContext,
) -> (Status, String, Option<String>) {
    let env = ctx.environment.as_str();
    let other = ctx.environment.other().as_str();
    let key = |f: &str| ctx.source.key(f);
    let answer = match reason {
        Some(r) => format!("{resp_status} {r}"),
        None => resp_status.to_string(),
    };
    let fail = |detail: String, fix: String| (Status::Fail, detail, Some(fix));
    let action = classify(resp_status, reason);
    match (action, resp_status, reason.unwrap_or("")) {
        // A made-up token refused as a token: the key and the topic were accepted.
        (Action::TryOtherEnvironment, 400, _) | (Action::Unregistered, _, _) => (
            Status::Pass,
            format!(
                "key and topic {} accepted ({answer} for a made-up token)",
                ctx.topic
            ),
            None,
        ),
        // No token is of this topic when even a made-up one is "not for" it: the
        // topic is not a VoIP topic APNs serves for this key.
        (Action::InvalidateToken, _, _) => fail(
            format!(
                "{answer}: APNs says a made-up token is not for {}",
                ctx.topic
            ),
            super::worker::misconfigured_fix(ctx.topic, ctx.team_id, key),
        ),
        (Action::Delivered, _, _) => (
            Status::Pass,
            format!("key and topic {} accepted (200)", ctx.topic),
            None,
        ),
        (Action::Retry | Action::Reconnect, _, _) => (
            Status::Warn,
            format!("{answer}: APNs {env} is busy; the key could not be checked"),
            Some(
                "run the doctor again in a minute; if it persists see \
                 https://developer.apple.com/system-status/"
                    .into(),
            ),
        ),
        (_, 403, "InvalidProviderToken") => fail(
            format!(
                "{answer}: APNs does not know key {} of team {}",
                ctx.key_id, ctx.team_id
            ),
            format!(
                "the provider token says key {} of team {} and is signed with {} ({}). Set \
                 {} to the Key ID shown with this key in the developer portal (Keys), {} \
                 to the Team ID of the account that created the key, and {} to that key's \
                 .p8 (a revoked key is refused too)",
                ctx.key_id,
                ctx.team_id,
                ctx.key_file,
                key("key_file"),
                key("key_id"),
                key("team_id"),
                key("key_file")
            ),
        ),
        (_, 400, "TopicDisallowed") => fail(
            format!(
                "{answer}: team {} may not push to {}",
                ctx.team_id, ctx.topic
            ),
            format!(
                "{} must be the bundle id of an app of team {} (without .voip: the worker \
                 sends <bundle id>.voip), with Push Notifications enabled; if the app \
                 belongs to another team, use that team's key ({}, {}, {})",
                key("bundle_id"),
                ctx.team_id,
                key("team_id"),
                key("key_id"),
                key("key_file")
            ),
        ),
        (_, 400, "BadTopic" | "MissingTopic") => fail(
            format!("{answer}: APNs refused the topic {}", ctx.topic),
            format!(
                "VoIP pushes must go to the topic <bundle id>.voip of an app with the \
                 Voice over IP background mode; we sent {}. Set {} to the app's bundle id \
                 without .voip; if it is right, something between us and APNs rewrites \
                 the apns-topic header",
                ctx.topic,
                key("bundle_id")
            ),
        ),
        (Action::TryOtherEnvironment, _, _) => fail(
            format!("{answer}: key {} is restricted to {other}", ctx.key_id),
            format!(
                "in the developer portal (Keys, {}) allow the key for Sandbox & \
                 Production, or use a key that allows {env}; until then {env} tokens \
                 ({}) cannot ring",
                ctx.key_id,
                match ctx.environment {
                    Environment::Sandbox => "Xcode debug builds",
                    Environment::Production => "TestFlight and App Store builds",
                }
            ),
        ),
        (Action::RefreshProviderToken, _, _) => fail(
            format!("{answer}: a token signed just now is refused as over an hour old"),
            format!(
                "this machine's clock is wrong (it says UNIX time {}): synchronise it \
                 with NTP (timedatectl set-ntp true, or chrony); provider tokens carry \
                 the time they were signed",
                unix_now()
            ),
        ),
        (_, 403, "Forbidden") => fail(
            format!("{answer}: APNs refuses key {}", ctx.key_id),
            format!(
                "check in the developer portal that key {} is active and enabled for \
                 APNs; if it was revoked, create a new key and set {} and {}",
                ctx.key_id,
                key("key_id"),
                key("key_file")
            ),
        ),
        _ => fail(
            format!("unexpected answer {answer}"),
            format!(
                "check that {} points at APNs {env} (https://api.push.apple.com or \
                 https://api.sandbox.push.apple.com) and not at another service",
                url_setting(ctx.environment)
            ),
        ),
    }
}

/// The fix for a connection that could not be made.
fn connect_fix(e: &SendError, env: Environment, url: &str) -> String {
    let setting = url_setting(env);
    match e {
        SendError::Connect { detail, .. } if detail.starts_with("TLS") => format!(
            "the TLS certificate of {url} is not trusted: for the APNs simulator set \
             VPW__APNS__CA_FILE to the CA it writes (apns-sim --ca-out FILE); for Apple, \
             make sure no proxy intercepts TLS to APNs"
        ),
        SendError::Connect { detail, .. } if detail.contains("HTTP/2") => format!(
            "{url} does not speak HTTP/2 (ALPN h2): point {setting} at APNs \
             (https://api.push.apple.com, https://api.sandbox.push.apple.com) and do \
             not route it through a proxy that terminates TLS"
        ),
        SendError::Connect { .. } => format!(
            "nothing accepts connections at {url}: check {setting} and that outbound TCP \
             to that host and port (443, or 2197 for Apple) is allowed"
        ),
        SendError::Timeout { .. } | SendError::Unanswered { .. } => format!(
            "{url} did not answer in time: a firewall probably drops traffic to it; allow \
             outbound TCP 443 (or 2197) to APNs, or fix {setting}"
        ),
        SendError::Transport { .. } => "run the doctor again; if the connection keeps \
             failing mid-request, a proxy is closing HTTP/2 streams"
            .into(),
        SendError::Request { .. } => "the bundle id (the apns-topic header) holds a \
             character HTTP headers cannot carry: fix bundle_id of the app"
            .into(),
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
