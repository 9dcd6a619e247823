//! A device token registered by another user moves to them — the old owner's
//! calls stop ringing there — and every move is logged (token suffix only),
//! counted and shown by `devices list` to both users.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use voip_push_worker::event::{Environment, Status};

use super::{all_groups, bearer, register_mine, req, user_jwt, SERVICE_TOKEN, USER_JWT_SECRET};
use crate::common::{binary_for, random_token, TestEnv, BUNDLE};

/// Everything the worker logs on this test's thread (the test runtime is
/// single-threaded, so the worker's tasks log here too).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn a_token_move_is_logged_counted_and_listed() {
    let logs = Captured::default();
    let writer = logs.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter("info")
            .with_writer(move || writer.clone())
            .finish(),
    );
    let mut env = TestEnv::with(all_groups).await;
    let token = random_token();
    env.sim
        .register_token(Environment::Production, &token, BUNDLE);
    let service = bearer(SERVICE_TOKEN);
    let body = json!({"userId":"old-owner","token":token,"environment":"production"}).to_string();
    // Registered by its owner, then again by the same owner: no move.
    for _ in 0..2 {
        let auth = Some(("Authorization", service.as_str()));
        let got = req(&env, "PUT", "/v1/devices", auth, &body).await;
        assert_eq!(got.0, 200, "{got:?}");
    }
    env.wait_metric("voip_push_device_moves_total", 0.0).await;

    // The phone changes hands: its new user registers it with their JWT.
    let jwt = bearer(&user_jwt("new-owner", 600, USER_JWT_SECRET));
    let got = register_mine(&env, &jwt, &token.to_ascii_uppercase()).await;
    assert_eq!(got.0, 200, "{got:?}");
    env.wait_metric("voip_push_device_moves_total", 1.0).await;

    let text = logs.text();
    let moved = text
        .lines()
        .find(|l| l.contains("device token moved to another user"))
        .unwrap_or_else(|| panic!("no move logged:\n{text}"));
    assert!(moved.contains("previous_user_id=old-owner"), "{moved}");
    assert!(moved.contains("user_id=new-owner"), "{moved}");
    assert!(moved.contains(&token[56..]), "{moved}");
    assert!(!text.contains(&token[..16]), "a token in the log:\n{text}");

    // The old owner's calls no longer ring the phone; the new owner's do.
    env.publish(json!({"callId":"mv-old","toUserId":"old-owner"}))
        .await;
    assert_eq!(
        env.results_for("mv-old", 1).await[0].status,
        Status::NoDevice
    );
    env.publish(json!({"callId":"mv-new","toUserId":"new-owner"}))
        .await;
    assert_eq!(
        env.results_for("mv-new", 1).await[0].status,
        Status::Delivered
    );

    // `devices list` tells both users.
    let cfg = env.cfg.clone();
    let list = |user: &'static str, json: bool| {
        let cfg = cfg.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut c = binary_for(&cfg);
                c.args(["devices", "list", "--user", user]);
                if json {
                    c.arg("--json");
                }
                let out = c.output().expect("devices list");
                assert!(out.status.success(), "{out:?}");
                String::from_utf8(out.stdout).unwrap()
            })
            .await
            .unwrap()
        }
    };
    let new: Value = serde_json::from_str(&list("new-owner", true).await).unwrap();
    assert_eq!(new["devices"][0]["movedFrom"], "old-owner", "{new}");
    assert!(new["devices"][0]["movedAt"].is_string(), "{new}");
    let old: Value = serde_json::from_str(&list("old-owner", true).await).unwrap();
    assert_eq!(old["devices"], json!([]), "{old}");
    assert_eq!(old["movedAway"][0]["movedTo"], "new-owner", "{old}");
    assert_eq!(old["movedAway"][0]["tokenSuffix"], &token[56..], "{old}");
    let human = list("old-owner", false).await;
    assert!(human.contains("moved away"), "{human}");
    assert!(human.contains("to user new-owner at "), "{human}");
    let human = list("new-owner", false).await;
    assert!(human.contains("from user old-owner at "), "{human}");
    for out in [human, new.to_string(), old.to_string()] {
        assert!(!out.contains(&token[..16]), "a token listed: {out}");
    }
    env.cleanup().await;
}
