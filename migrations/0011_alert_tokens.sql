-- The app's alert (User Notifications) token beside its PushKit token: a cancel in
-- `worker.cancel_push = alert` mode shows a "Missed call" notification, which only
-- an alert push to this token can do (a VoIP token refuses other push types).
ALTER TABLE devices ADD COLUMN alert_token text;
