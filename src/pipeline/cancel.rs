//! A cancel: record it, wait for the rings in flight, then send each device that
//! was rung what `worker.cancel_push` says: a `call.cancel` VoIP push, a "Missed
//! call" alert, or nothing.

use std::time::Instant;

use serde_json::{json, Value};
use tracing::{info, warn};

use super::ids::{base_result, claim_key, event_id};
use super::{Call, Disposition, Incoming, Pipeline};
use crate::apns::{App, DeliveryOutcome, FinalAction, PushType};
use crate::config::CancelPush;
use crate::event::{now_ms, CallEvent, EventType, InvalidEvent, InvalidKind, Status};
use crate::store::calls::Cancelled;
use crate::store::Device;

/// How long APNs keeps an undelivered missed-call notice: a phone that is off for
/// the call still learns of it within the hour; later, the app's call history is
/// where the user looks.
const MISSED_CALL_TTL_MS: i64 = 60 * 60 * 1000;

/// Whether the callee missed the call: not when it was answered (on any device)
/// or declined.
fn missed(event: &CallEvent) -> bool {
    !matches!(
        event.reason.as_deref(),
        Some("answered_elsewhere" | "declined")
    )
}

/// The alert a rung device shows when its call ended unanswered: "Missed call
/// from …", collapsed onto the call, with the call's fields for the app (which may
/// rewrite the text in a Notification Service Extension: `mutable-content`).
fn missed_call_payload(event: &CallEvent, sent_at_ms: i64, expires_at_ms: i64) -> bytes::Bytes {
    let from = [&event.from_display_name, &event.from_user_id]
        .into_iter()
        .flatten()
        .find_map(|v| match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
    let body = match from {
        Some(name) => format!("Missed call from {name}"),
        None => "Missed call".to_string(),
    };
    let mut payload = event.device_payload(sent_at_ms, expires_at_ms);
    payload["type"] = json!("call.missed");
    payload["aps"] = json!({"alert": {"title": "Missed call", "body": body}, "mutable-content": 1});
    bytes::Bytes::from(payload.to_string())
}

impl Pipeline {
    /// A cancel: record it (which stops every ring not yet sent, here or in any
    /// replica, and waits for the rings in flight), then send a `call.cancel`
    /// push to each device already rung, except the one that answered, so an
    /// undelivered ring is replaced and a ringing phone stops.
    pub(super) async fn cancel(&self, msg: &Incoming, event: &CallEvent, app: &App) -> Disposition {
        let event_id = event_id(msg, event);
        let key = claim_key(&event_id, event);
        let cancelled = self
            .store
            .cancel_call(
                &event.call_id,
                &app.config.bundle_id,
                &event.to_user_id,
                event.reason.as_deref(),
                event.answered_device_id.as_deref(),
            )
            .await;
        let ring_deadline = match cancelled {
            Ok(Cancelled::Recorded(d)) => d,
            Ok(Cancelled::OtherUser) => {
                let invalid = InvalidEvent {
                    kind: InvalidKind::BadField,
                    message: "toUserId is not the callee of this call; nothing was cancelled"
                        .into(),
                    call_id: Some(event.call_id.clone()),
                };
                return self.refuse(msg, invalid).await;
            }
            Err(e) => return self.retry("record the cancel", e),
        };
        info!(
            reason = event.reason.as_deref().unwrap_or(""),
            "call cancelled"
        );
        let mode = self.cfg.worker.cancel_push;
        if mode == CancelPush::Off {
            self.skipped("off");
            self.metrics.events.with_label_values(&["cancel"]).inc();
            return Disposition::Ack;
        }
        // Nobody missed a call that was answered or declined: no notice.
        if mode == CancelPush::Alert && !missed(event) {
            self.skipped("answered");
            self.metrics.events.with_label_values(&["cancel"]).inc();
            return Disposition::Ack;
        }
        let rung = match self.store.rung_devices(&event.call_id).await {
            Ok(r) => r,
            Err(e) => return self.retry("find rung devices", e),
        };
        let answered = (event.reason.as_deref() == Some("answered_elsewhere"))
            .then_some(event.answered_device_id.as_deref())
            .flatten();
        // Counted when the cancel is done: a try that fails and runs again
        // skips the same devices again.
        let mut no_alert_token = 0;
        let devices: Vec<Device> = rung
            .into_iter()
            .filter(|d| answered != Some(d.device_id.to_string().as_str()))
            .filter_map(|d| {
                let (token, proven) = match mode {
                    // It accepted the ring.
                    CancelPush::Voip => (d.token, true),
                    CancelPush::Alert => match d.alert_token {
                        Some(t) => (t, false),
                        None => {
                            no_alert_token += 1;
                            return None;
                        }
                    },
                    CancelPush::Off => return None,
                };
                Some(Device {
                    id: d.device_id,
                    token,
                    environment: d.environment,
                    updated_at_ms: 0,
                    proven,
                    success_is_recent: false,
                })
            })
            .collect();
        // The ring's own deadline bounds its cancel: after it, APNs has dropped an
        // undelivered ring (its expiration) and the phone has stopped ringing.
        // A missed-call notice is worth showing long after the ring (APNs keeps
        // it for an hour); its attempts still stop after a ring time, so a slow
        // APNs cannot hold the cancel lane.
        let (sent_at_ms, own_deadline) = self.ring_window(msg, event);
        let expires_at_ms = match mode {
            CancelPush::Alert => now_ms() + MISSED_CALL_TTL_MS,
            _ => ring_deadline.unwrap_or(own_deadline),
        };
        let remaining_ms = expires_at_ms - now_ms();
        let base = base_result(&event_id, event, app);
        if !devices.is_empty() && remaining_ms > 0 {
            let ids = (event_id.as_str(), key.as_str());
            let mut call = Call::new(app, event, ids, &base, msg, (sent_at_ms, expires_at_ms));
            if mode == CancelPush::Alert {
                call.push_type = PushType::Alert;
                call.payload = missed_call_payload(event, sent_at_ms, expires_at_ms);
                call.deadline = Instant::now() + self.cfg.worker.ring_timeout();
            }
            let mut claims = Vec::with_capacity(devices.len());
            for d in devices {
                let claimed = self
                    .store
                    .claim(
                        &key,
                        d.id,
                        call.owner,
                        &event.call_id,
                        EventType::Cancel.as_str(),
                    )
                    .await;
                match claimed {
                    Ok(c) => claims.push((d, c)),
                    Err(e) => return self.retry("claim a cancel push", e),
                }
            }
            match self.push_all(&call, claims).await {
                Err(reason) => return Disposition::Retry(reason),
                Ok((_, true)) => {
                    return Disposition::Wait {
                        until: call.deadline,
                    }
                }
                Ok(_) => {}
            }
        }
        if no_alert_token > 0 {
            (self.metrics.cancel_pushes_skipped)
                .with_label_values(&["no_alert_token"])
                .inc_by(no_alert_token);
        }
        self.metrics.events.with_label_values(&["cancel"]).inc();
        Disposition::Ack
    }
}

impl Pipeline {
    fn skipped(&self, reason: &'static str) {
        self.metrics
            .cancel_pushes_skipped
            .with_label_values(&[reason])
            .inc();
    }

    /// What APNs' answer to a missed-call alert means. A refused alert token is
    /// forgotten, never the device's VoIP token: the two are independent.
    pub(super) async fn learn_alert(
        &self,
        app: &App,
        device: &Device,
        out: &DeliveryOutcome,
    ) -> Status {
        match out.action {
            FinalAction::Delivered => Status::Delivered,
            // Not before this process has seen the app's configuration work in
            // every environment that refused it: a wrong bundle id or key
            // refuses every token, and forgetting them all would be the
            // misconfiguration wiping the table.
            FinalAction::Invalidate | FinalAction::Unregistered
                if !super::suspect::refused_in(out)
                    .iter()
                    .all(|e| app.guard.is_proven(*e)) =>
            {
                info!(
                    device_id = device.id,
                    "APNs refused the alert token before the app proved its configuration; kept"
                );
                Status::Failed
            }
            FinalAction::Invalidate | FinalAction::Unregistered => {
                if let Err(e) = self.store.clear_alert_token(device.id, &device.token).await {
                    warn!(device_id = device.id, error = %e, "could not forget a refused alert token");
                }
                info!(
                    device_id = device.id,
                    "APNs refused the alert token; forgotten"
                );
                Status::Failed
            }
            FinalAction::Failed => Status::Failed,
            FinalAction::Expired => Status::Expired,
            FinalAction::Cancelled => Status::Cancelled,
        }
    }
}
