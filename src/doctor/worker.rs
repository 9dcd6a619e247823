//! `worker.apps`: whether a running worker holds an app as misconfigured — APNs
//! refused many distinct devices of it and accepted none (`apns::guard`), which
//! the doctor's own probe cannot see when the bundle id is a real app of the
//! team but not the one the tokens belong to.

use std::time::Duration;

use super::config::apps;
use super::services::http_get;
use super::{Check, Section};
use crate::config::Config;

/// The metric the worker raises, by app.
const GAUGE: &str = "voip_push_apns_app_misconfigured";

/// The fix for an app whose every token APNs refuses (`DeviceTokenNotForTopic`,
/// `TopicDisallowed`): the worker's `app_misconfigured`, and the probe's
/// `DeviceTokenNotForTopic`. `key` names a setting of the app.
pub fn misconfigured_fix(topic: &str, team_id: &str, key: impl Fn(&str) -> String) -> String {
    format!(
        "APNs refuses the tokens for topic {topic}: set {} to the bundle id of the app \
         whose PushKit tokens are registered (without .voip: the worker sends <bundle id>.voip; \
         the app needs the Voice over IP background mode), and sign with a key of the team \
         that owns it (team {team_id} now: {}, {}, {}). No token was invalidated; the worker \
         recovers at the first push APNs accepts",
        key("bundle_id"),
        key("team_id"),
        key("key_id"),
        key("key_file")
    )
}

/// The apps `/metrics` shows held as misconfigured.
pub fn misconfigured_apps(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(GAUGE)?.strip_prefix("{app=\""))
        .filter_map(|l| {
            let (app, rest) = l.split_once("\"}")?;
            let value: f64 = rest.trim().parse().ok()?;
            (value > 0.0).then(|| app.to_string())
        })
        .collect()
}

/// `worker.apps` for the worker at `authority` (HOST:PORT; `readyz` checks it).
pub async fn apps_check(cfg: &Config, authority: &str, timeout: Duration) -> Check {
    let c = Check::new("worker.apps", Section::Worker, "apps the worker pushes for");
    // /metrics is a few hundred KiB at most.
    let text = match http_get(authority, "/metrics", 4 << 20, timeout).await {
        Ok(t) => t,
        Err(e) => return c.skip(format!("{authority}: {e}")),
    };
    let held = misconfigured_apps(&text);
    if held.is_empty() {
        return c.pass("APNs accepts each app's pushes, or has refused too few to tell");
    }
    let known = apps(cfg);
    let fixes: Vec<String> = held
        .iter()
        .map(|bundle| {
            let app = known.iter().find(|a| a.app.bundle_id == *bundle);
            let (team, source) = match app {
                Some(a) => (a.app.team_id.as_str(), a.source.clone()),
                None => ("?", super::config::AppSource::Shorthand),
            };
            format!(
                "{bundle}: {}",
                misconfigured_fix(&format!("{bundle}.voip"), team, |f| source.key(f))
            )
        })
        .collect();
    c.fail(
        format!(
            "held as app_misconfigured: {} (APNs refused many distinct devices and accepted \
             none; their tokens are kept)",
            held.join(", ")
        ),
        fixes.join("; "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_gauge_per_app() {
        let text = "# TYPE voip_push_apns_app_misconfigured gauge\n\
                    voip_push_apns_app_misconfigured{app=\"com.a\"} 1\n\
                    voip_push_apns_app_misconfigured{app=\"com.b\"} 0\n\
                    voip_push_apns_app_misconfigured_other{app=\"com.c\"} 1\n";
        assert_eq!(misconfigured_apps(text), ["com.a"]);
    }
}
