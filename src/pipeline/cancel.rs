//! A cancel: record it, wait for the rings in flight, then replace each ring
//! that reached a phone with a `call.cancel` push.

use tracing::info;

use super::ids::{base_result, claim_key, event_id};
use super::{Call, Disposition, Incoming, Pipeline};
use crate::apns::App;
use crate::event::{now_ms, CallEvent, EventType, InvalidEvent, InvalidKind};
use crate::store::calls::Cancelled;
use crate::store::Device;

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
        if !self.cfg.worker.cancel_push {
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
        let devices: Vec<Device> = rung
            .into_iter()
            .filter(|d| answered != Some(d.device_id.to_string().as_str()))
            .map(|d| Device {
                id: d.device_id,
                token: d.token,
                environment: d.environment,
                updated_at_ms: 0,
                // It accepted the ring.
                proven: true,
            })
            .collect();
        // The ring's own deadline bounds its cancel: after it, APNs has dropped an
        // undelivered ring (its expiration) and the phone has stopped ringing.
        let (sent_at_ms, own_deadline) = self.ring_window(msg, event);
        let expires_at_ms = ring_deadline.unwrap_or(own_deadline);
        let remaining_ms = expires_at_ms - now_ms();
        let base = base_result(&event_id, event, app);
        if !devices.is_empty() && remaining_ms > 0 {
            let ids = (event_id.as_str(), key.as_str());
            let call = Call::new(app, event, ids, &base, msg, (sent_at_ms, expires_at_ms));
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
        self.metrics.events.with_label_values(&["cancel"]).inc();
        Disposition::Ack
    }
}
