//! `voip-push-worker trace --call C`: every delivery and attempt of one call, from
//! Postgres — the answer to "why didn't it ring?".

use std::fmt::Write as _;

use crate::cli::CommandError;
use crate::config::Config;
use crate::store::history::CallTrace;
use crate::store::Store;

#[derive(clap::Args)]
pub struct TraceArgs {
    /// The call id.
    #[arg(long = "call")]
    pub call_id: String,
    /// Print the CONTRACT §10 JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn trace(config: &Config, a: TraceArgs) -> Result<(), CommandError> {
    let store =
        Store::connect(&config.postgres).map_err(|e| CommandError::Failed(e.to_string()))?;
    let found = store
        .trace_call(&a.call_id)
        .await
        .map_err(|e| CommandError::Failed(e.to_string()))?;
    let Some(t) = found else {
        return Err(CommandError::Failed(format!(
            "no call {:?} is recorded (never received, or purged after its retention)",
            a.call_id
        )));
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&t).expect("trace serialises")
        );
    } else {
        print!("{}", render(&t));
    }
    Ok(())
}

/// The trace for a person, within 80 columns.
pub fn render(t: &CallTrace) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "call {}  to user {}  ({})",
        t.call_id, t.to_user_id, t.bundle_id
    );
    let _ = writeln!(s, "  state      {}", t.state.as_str());
    let _ = writeln!(s, "  created    {}", t.created_at);
    if let Some(d) = &t.ring_deadline {
        let _ = writeln!(s, "  rings until {d}");
    }
    if let Some(c) = &t.cancelled_at {
        let _ = writeln!(
            s,
            "  cancelled  {c} ({}{})",
            t.cancel_reason.as_deref().unwrap_or("no reason"),
            t.answered_device_id
                .as_deref()
                .map(|d| format!(", answered on device {d}"))
                .unwrap_or_default()
        );
    }
    if t.deliveries.is_empty() {
        let _ = writeln!(
            s,
            "  no delivery: the user had no live device, or nothing was sent yet"
        );
    }
    for d in &t.deliveries {
        let _ = writeln!(
            s,
            "  device {} …{}  {}  {}{}{}",
            d.device_id,
            d.token_suffix.as_deref().unwrap_or("????????"),
            d.event_type,
            d.status,
            d.environment
                .as_deref()
                .map(|e| format!(" via {e}"))
                .unwrap_or_default(),
            if d.fallback_used {
                " (after fallback)"
            } else {
                ""
            }
        );
        for a in &d.attempts {
            let answer = match (a.apns_status, a.reason.as_deref()) {
                (Some(code), reason) => format!("{code} {}", reason.unwrap_or("")),
                // The push left and its answer was lost: APNs may have taken it,
                // so the phone may ring again when it is resent.
                (None, Some("unanswered")) => "unanswered: may have rung".into(),
                (None, reason) => format!("no answer ({})", reason.unwrap_or("?")),
            };
            let _ = writeln!(
                s,
                "    {}  {:<10} {:<28} {:>5} ms",
                a.at,
                a.environment,
                answer.trim_end(),
                a.latency_ms
            );
        }
    }
    s
}
