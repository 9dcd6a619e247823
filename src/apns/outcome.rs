//! The one table that turns APNs' (status, reason) into what the worker does.
//! Nowhere else matches on reason strings.

/// Every reason Apple documents. Anything else is labelled `other` in metrics and
/// classified by status code alone.
pub const KNOWN_REASONS: &[&str] = &[
    "BadCollapseId",
    "BadDeviceToken",
    "BadExpirationDate",
    "BadMessageId",
    "BadPriority",
    "BadTopic",
    "DeviceTokenNotForTopic",
    "DuplicateHeaders",
    "IdleTimeout",
    "InvalidPushType",
    "MissingDeviceToken",
    "MissingTopic",
    "PayloadEmpty",
    "TopicDisallowed",
    "BadCertificate",
    "BadCertificateEnvironment",
    "BadEnvironmentKeyIdInToken",
    "ExpiredProviderToken",
    "Forbidden",
    "InvalidProviderToken",
    "MissingProviderToken",
    "UnrelatedKeyIdInToken",
    "BadPath",
    "MethodNotAllowed",
    "ExpiredToken",
    "Unregistered",
    "PayloadTooLarge",
    "TooManyProviderTokenUpdates",
    "TooManyRequests",
    "InternalServerError",
    "ServiceUnavailable",
    "Shutdown",
];

/// A reason as a metric label: itself when Apple documents it, `other` when not,
/// `none` when there was none (a 200).
pub fn reason_label(reason: Option<&str>) -> &'static str {
    match reason {
        None => "none",
        Some(r) => KNOWN_REASONS
            .iter()
            .copied()
            .find(|k| *k == r)
            .unwrap_or("other"),
    }
}

/// A status code as a metric label, from a closed set.
pub fn code_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        403 => "403",
        404 => "404",
        405 => "405",
        410 => "410",
        413 => "413",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => "other",
    }
}

/// What to do with one APNs answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// 200: the push was accepted.
    Delivered,
    /// The token may belong to the other environment (a debug build's sandbox
    /// token sent to production, or the reverse): try there once.
    TryOtherEnvironment,
    /// The token is not a VoIP token of this app: never push to it again.
    InvalidateToken,
    /// 410: the app was uninstalled or the token expired; invalidate only if the
    /// token was registered at or before Apple's timestamp.
    Unregistered,
    /// The provider token is too old: mint a new one (once) and retry.
    RefreshProviderToken,
    /// The connection is unusable (idle timeout, shutdown, another key bound to it):
    /// retry on a new connection.
    Reconnect,
    /// Transient (throttled device, Apple overloaded): retry after a backoff,
    /// within the ring deadline.
    Retry,
    /// The app's key or topic is refused (a configuration error, whatever the
    /// token): fail now, no retry, alert; it counts towards the app being held
    /// as misconfigured (`apns::guard`).
    Misconfigured,
    /// Our bug (a malformed request): fail now, no retry, alert.
    Fatal,
}

impl Action {
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Action::RefreshProviderToken | Action::Reconnect | Action::Retry
        )
    }

    /// A refusal of the token itself, which a wrong bundle id or a key of
    /// another team also produces for every token: the misconfiguration guard
    /// (`apns::guard`) decides whether it may invalidate the token.
    pub fn refuses_token(self) -> bool {
        matches!(self, Action::TryOtherEnvironment | Action::InvalidateToken)
    }
}

/// APNS.md's response table, row by row; unknown reasons fall back to the status.
pub fn classify(status: u16, reason: Option<&str>) -> Action {
    match (status, reason.unwrap_or("")) {
        (200, _) => Action::Delivered,
        (400, "BadDeviceToken") => Action::TryOtherEnvironment,
        (403, "BadCertificateEnvironment" | "BadEnvironmentKeyIdInToken") => {
            Action::TryOtherEnvironment
        }
        (400, "DeviceTokenNotForTopic") => Action::InvalidateToken,
        (400, "IdleTimeout") => Action::Reconnect,
        (403, "ExpiredProviderToken") => Action::RefreshProviderToken,
        (403, "UnrelatedKeyIdInToken") => Action::Reconnect,
        (410, _) => Action::Unregistered,
        (429, "TooManyProviderTokenUpdates") => Action::Retry,
        (429, _) => Action::Retry,
        (503, "Shutdown") => Action::Reconnect,
        (500 | 502 | 503 | 504, _) => Action::Retry,
        (400, "BadTopic" | "MissingTopic" | "TopicDisallowed") => Action::Misconfigured,
        (403, "InvalidProviderToken" | "MissingProviderToken" | "BadCertificate" | "Forbidden") => {
            Action::Misconfigured
        }
        // Remaining 400s, 403s, 404, 405, 413 are our bug.
        _ => Action::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apns_md_table_row_by_row() {
        let rows: &[(u16, &str, Action)] = &[
            (200, "", Action::Delivered),
            (400, "BadDeviceToken", Action::TryOtherEnvironment),
            (400, "DeviceTokenNotForTopic", Action::InvalidateToken),
            (400, "BadCollapseId", Action::Fatal),
            (400, "BadExpirationDate", Action::Fatal),
            (400, "BadMessageId", Action::Fatal),
            (400, "BadPriority", Action::Fatal),
            (400, "BadTopic", Action::Misconfigured),
            (400, "DuplicateHeaders", Action::Fatal),
            (400, "InvalidPushType", Action::Fatal),
            (400, "MissingDeviceToken", Action::Fatal),
            (400, "MissingTopic", Action::Misconfigured),
            (400, "PayloadEmpty", Action::Fatal),
            (400, "TopicDisallowed", Action::Misconfigured),
            (400, "IdleTimeout", Action::Reconnect),
            (403, "ExpiredProviderToken", Action::RefreshProviderToken),
            (403, "InvalidProviderToken", Action::Misconfigured),
            (403, "MissingProviderToken", Action::Misconfigured),
            (403, "BadCertificate", Action::Misconfigured),
            (403, "Forbidden", Action::Misconfigured),
            (403, "UnrelatedKeyIdInToken", Action::Reconnect),
            (
                403,
                "BadCertificateEnvironment",
                Action::TryOtherEnvironment,
            ),
            (
                403,
                "BadEnvironmentKeyIdInToken",
                Action::TryOtherEnvironment,
            ),
            (404, "BadPath", Action::Fatal),
            (405, "MethodNotAllowed", Action::Fatal),
            (410, "Unregistered", Action::Unregistered),
            (410, "ExpiredToken", Action::Unregistered),
            (413, "PayloadTooLarge", Action::Fatal),
            (429, "TooManyRequests", Action::Retry),
            (429, "TooManyProviderTokenUpdates", Action::Retry),
            (500, "InternalServerError", Action::Retry),
            (503, "ServiceUnavailable", Action::Retry),
            (503, "Shutdown", Action::Reconnect),
        ];
        for (status, reason, want) in rows {
            assert_eq!(classify(*status, Some(reason)), *want, "{status} {reason}");
        }
    }

    #[test]
    fn unknown_reasons_are_classified_by_status() {
        assert_eq!(classify(410, Some("SomethingNew")), Action::Unregistered);
        assert_eq!(classify(503, Some("SomethingNew")), Action::Retry);
        assert_eq!(classify(500, None), Action::Retry);
        assert_eq!(classify(429, None), Action::Retry);
        assert_eq!(classify(400, Some("SomethingNew")), Action::Fatal);
        assert_eq!(classify(418, None), Action::Fatal);
    }

    #[test]
    fn only_token_refusals_reach_the_guard() {
        let token_level: Vec<_> = KNOWN_REASONS
            .iter()
            .flat_map(|r| [400, 403, 410].map(|s| (s, *r)))
            .filter(|(s, r)| classify(*s, Some(r)).refuses_token())
            .collect();
        assert_eq!(
            token_level,
            [
                (400, "BadDeviceToken"),
                (400, "DeviceTokenNotForTopic"),
                (403, "BadCertificateEnvironment"),
                (403, "BadEnvironmentKeyIdInToken"),
            ]
        );
    }

    #[test]
    fn labels_are_a_closed_set() {
        assert_eq!(reason_label(Some("BadDeviceToken")), "BadDeviceToken");
        assert_eq!(reason_label(Some("a user's token 1234")), "other");
        assert_eq!(reason_label(None), "none");
        assert_eq!(code_label(418), "other");
    }
}
