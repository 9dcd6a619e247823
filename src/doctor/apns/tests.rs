use super::*;
use crate::apns::outcome::{classify, Action};
use crate::doctor::config::AppSource;
use crate::doctor::Status;

fn ctx(source: &AppSource) -> ProbeContext<'_> {
    ProbeContext {
        environment: Environment::Production,
        topic: "com.example.chat.voip",
        team_id: "TEAM000001",
        key_id: "KEY0000001",
        key_file: "AuthKey_KEY0000001.p8",
        source,
    }
}

#[test]
fn each_answer_maps_to_its_fix() {
    let s = AppSource::Shorthand;
    let c = ctx(&s);
    let rows: &[(u16, &str, Status, &str)] = &[
        (400, "BadDeviceToken", Status::Pass, ""),
        (200, "", Status::Pass, ""),
        (
            403,
            "InvalidProviderToken",
            Status::Fail,
            "VPW__APNS__KEY_ID",
        ),
        (400, "TopicDisallowed", Status::Fail, "VPW__APNS__BUNDLE_ID"),
        (400, "BadTopic", Status::Fail, "<bundle id>.voip"),
        (
            403,
            "BadEnvironmentKeyIdInToken",
            Status::Fail,
            "Sandbox & Production",
        ),
        (403, "ExpiredProviderToken", Status::Fail, "NTP"),
        (403, "Forbidden", Status::Fail, "revoked"),
        (503, "ServiceUnavailable", Status::Warn, "again"),
        // As the worker sees them: retried (a warning) or failed.
        (429, "TooManyRequests", Status::Warn, "again"),
        (503, "Shutdown", Status::Warn, "again"),
        (403, "UnrelatedKeyIdInToken", Status::Warn, "again"),
        (501, "", Status::Fail, "VPW__APNS__PRODUCTION_URL"),
        (410, "Unregistered", Status::Pass, ""),
        (
            400,
            "DeviceTokenNotForTopic",
            Status::Fail,
            "VPW__APNS__BUNDLE_ID",
        ),
        (404, "BadPath", Status::Fail, "VPW__APNS__PRODUCTION_URL"),
    ];
    for (code, reason, want, in_fix) in rows {
        let reason = (!reason.is_empty()).then_some(*reason);
        let (status, _, fix) = verdict(*code, reason, &c);
        assert_eq!(status, *want, "{code} {reason:?}");
        assert!(
            fix.as_deref().unwrap_or("").contains(in_fix),
            "{code} {reason:?}: {fix:?}"
        );
    }
}

#[test]
fn verdicts_agree_with_the_workers_outcome_table_for_every_answer() {
    let s = AppSource::Shorthand;
    let c = ctx(&s);
    let reasons = [
        None,
        Some("BadDeviceToken"),
        Some("DeviceTokenNotForTopic"),
        Some("TopicDisallowed"),
        Some("BadTopic"),
        Some("IdleTimeout"),
        Some("ExpiredProviderToken"),
        Some("InvalidProviderToken"),
        Some("UnrelatedKeyIdInToken"),
        Some("BadEnvironmentKeyIdInToken"),
        Some("Forbidden"),
        Some("Unregistered"),
        Some("TooManyRequests"),
        Some("InternalServerError"),
        Some("ServiceUnavailable"),
        Some("Shutdown"),
    ];
    for code in 200..600u16 {
        for reason in reasons {
            let (status, _, _) = verdict(code, reason, &c);
            let action = classify(code, reason);
            let want = match action {
                Action::Retry | Action::Reconnect => Status::Warn,
                Action::Fatal
                | Action::Misconfigured
                | Action::RefreshProviderToken
                | Action::InvalidateToken => Status::Fail,
                Action::TryOtherEnvironment if code == 403 => Status::Fail,
                _ => Status::Pass,
            };
            assert_eq!(status, want, "{code} {reason:?} ({action:?})");
        }
    }
}

#[test]
fn a_listed_app_is_named_by_its_entry() {
    let s = AppSource::List(2);
    let (_, _, fix) = verdict(403, Some("InvalidProviderToken"), &ctx(&s));
    assert!(fix.unwrap().contains("key_id of [[apns.apps]] #2"));
}
