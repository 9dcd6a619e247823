//! `devices list --user U`: a user's devices, live and invalidated, as support
//! needs them. Only a token's last 8 hex digits ever leave the database.

use serde::Serialize;

/// One device of a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    pub device_id: i64,
    pub bundle_id: String,
    pub token_suffix: String,
    /// `sandbox`, `production` or `unknown`.
    pub environment: String,
    /// `learned` (a push was delivered there), `registered` (as the backend said,
    /// not confirmed yet) or `unknown` (learned on the first push).
    pub environment_source: &'static str,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Last (re-)registration.
    pub updated_at: String,
    pub last_success_at: Option<String>,
    pub invalidated_at: Option<String>,
    pub invalid_reason: Option<String>,
    /// The user this device's token was registered by before it moved to this one.
    pub moved_from: Option<String>,
    /// Set on a device that moved away: the user who holds its token now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    /// When it last moved.
    pub moved_at: Option<String>,
}

const RFC3339_UTC: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS"Z"'"#;

/// A user's devices across every app, oldest first, then the devices whose token
/// last moved from this user to another.
pub async fn list(
    client: &tokio_postgres::Client,
    user_id: &str,
) -> Result<Vec<DeviceInfo>, tokio_postgres::Error> {
    let ts = |col: &str| format!("to_char({col} AT TIME ZONE 'UTC', {RFC3339_UTC})");
    let sql = format!(
        "SELECT id, bundle_id, right(voip_token, 8), environment, {}, {}, {}, {}, invalid_reason,
                last_success_at IS NOT NULL, user_id, previous_user_id, {}
         FROM devices WHERE user_id = $1 OR previous_user_id = $1
         ORDER BY user_id <> $1, id",
        ts("created_at"),
        ts("updated_at"),
        ts("last_success_at"),
        ts("invalidated_at"),
        ts("moved_at"),
    );
    let rows = client.query(&sql, &[&user_id]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let environment: String = r.get(3);
            let delivered: bool = r.get(9);
            let owner: String = r.get(10);
            let previous: Option<String> = r.get(11);
            let (moved_from, moved_to) = if owner == user_id {
                (previous, None)
            } else {
                (None, Some(owner))
            };
            DeviceInfo {
                device_id: r.get(0),
                bundle_id: r.get(1),
                token_suffix: r.get(2),
                environment_source: match (environment.as_str(), delivered) {
                    ("unknown", _) => "unknown",
                    (_, true) => "learned",
                    (_, false) => "registered",
                },
                environment,
                created_at: r.get(4),
                updated_at: r.get(5),
                last_success_at: r.get(6),
                invalidated_at: r.get(7),
                invalid_reason: r.get(8),
                moved_from,
                moved_to,
                moved_at: r.get(12),
            }
        })
        .collect())
}

/// `2026-11-22T22:02:18Z` → `2026-11-22 22:02:18Z`, easier on the eye in a table.
fn human_time(t: &str) -> String {
    t.replacen('T', " ", 1)
}

/// The listing for people: one block per device, under 80 columns.
pub fn render_human(user_id: &str, all: &[DeviceInfo]) -> String {
    let (devices, away) = owned_and_moved_away(all);
    let live = devices
        .iter()
        .filter(|d| d.invalidated_at.is_none())
        .count();
    let mut out = format!(
        "user {user_id}: {} device{}, {live} live\n",
        devices.len(),
        if devices.len() == 1 { "" } else { "s" }
    );
    for d in devices {
        let state = if d.invalidated_at.is_some() {
            "invalidated"
        } else {
            "live"
        };
        out.push_str(&format!(
            "\ndevice {}  …{}  {}  {state}\n",
            d.device_id, d.token_suffix, d.bundle_id
        ));
        let env_note = match d.environment_source {
            "learned" => " (learned from a delivered push)",
            "registered" => " (as registered; no push delivered yet)",
            _ => " (learned on the first push)",
        };
        out.push_str(&format!("  environment   {}{env_note}\n", d.environment));
        out.push_str(&format!(
            "  registered    {} (first {})\n",
            human_time(&d.updated_at),
            human_time(&d.created_at)
        ));
        out.push_str(&format!(
            "  last success  {}\n",
            d.last_success_at
                .as_deref()
                .map(human_time)
                .unwrap_or_else(|| "never".into())
        ));
        if let Some(at) = &d.invalidated_at {
            out.push_str(&format!(
                "  invalidated   {}: {}\n",
                human_time(at),
                d.invalid_reason.as_deref().unwrap_or("no reason recorded")
            ));
        }
        if let (Some(from), Some(at)) = (&d.moved_from, &d.moved_at) {
            out.push_str(&format!(
                "  moved         from user {from} at {}\n",
                human_time(at)
            ));
        }
    }
    for d in away {
        out.push_str(&format!(
            "\ndevice {}  …{}  {}  moved away\n  moved         to user {} at {}\n",
            d.device_id,
            d.token_suffix,
            d.bundle_id,
            d.moved_to.as_deref().unwrap_or("?"),
            d.moved_at.as_deref().map(human_time).unwrap_or_default()
        ));
    }
    out
}

/// This user's devices, and those whose token moved to another user since.
fn owned_and_moved_away(all: &[DeviceInfo]) -> (Vec<&DeviceInfo>, Vec<&DeviceInfo>) {
    all.iter().partition(|d| d.moved_to.is_none())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeviceList<'a> {
    user_id: &'a str,
    devices: Vec<&'a DeviceInfo>,
    moved_away: Vec<&'a DeviceInfo>,
}

/// The stable JSON form: `{"userId", "devices": [DeviceInfo…], "movedAway": [DeviceInfo…]}`.
pub fn render_json(user_id: &str, all: &[DeviceInfo]) -> String {
    let (devices, moved_away) = owned_and_moved_away(all);
    serde_json::to_string_pretty(&DeviceList {
        user_id,
        devices,
        moved_away,
    })
    .expect("device list serialises")
}
