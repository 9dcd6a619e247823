//! What APNs' answers mean: the verdict on each app's probe, and the fix for a
//! connection that could not be made.

use crate::apns::outcome::{classify, Action};
use crate::apns::token::unix_now;
use crate::apns::SendError;
use crate::doctor::config::AppSource;
use crate::doctor::Status;
use crate::event::Environment;

fn url_setting(env: Environment) -> &'static str {
    match env {
        Environment::Production => "VPW__APNS__PRODUCTION_URL",
        Environment::Sandbox => "VPW__APNS__SANDBOX_URL",
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
            crate::doctor::worker::misconfigured_fix(ctx.topic, ctx.team_id, key),
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
pub(super) fn connect_fix(e: &SendError, env: Environment, url: &str) -> String {
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
