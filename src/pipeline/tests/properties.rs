//! Whatever APNs answers, and wherever a cancel falls: one result per claimed
//! device, and no attempt after a recorded cancel but a ring's first (admitted
//! with its claim, before the cancel).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::{ring_ending_in, token, Rig};
use crate::event::Environment;
use crate::pipeline::fakes::Answer;
use crate::pipeline::Disposition;

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        Just(Answer::OK),
        Just(Answer::refused(429, "TooManyRequests")),
        Just(Answer::refused(500, "InternalServerError")),
        Just(Answer::refused(503, "Shutdown")),
        Just(Answer::refused(400, "BadDeviceToken")),
        Just(Answer::refused(400, "DeviceTokenNotForTopic")),
        Just(Answer::refused(400, "IdleTimeout")),
        Just(Answer::refused(403, "ExpiredProviderToken")),
        Just(Answer::refused(403, "InvalidProviderToken")),
        Just(Answer::refused(413, "PayloadTooLarge")),
        Just(Answer::unregistered(0)),
        Just(Answer::unregistered(i64::MAX / 2)),
        Just(Answer::Silence),
    ]
}

/// Each device's answers in production and in sandbox.
type Script = Vec<(Vec<Answer>, Vec<Answer>)>;

fn script() -> impl Strategy<Value = Script> {
    let answers = || proptest::collection::vec(answer(), 1..4);
    proptest::collection::vec((answers(), answers()), 1..4)
}

/// What APNs saw: requests per token, and those that came after the cancel
/// from a ring that had been tried before.
#[derive(Default)]
struct Seen {
    per_token: HashMap<String, usize>,
    total: usize,
    cancelled: bool,
    retried_after_cancel: Vec<String>,
}

fn run(script: Script, cancel_after: Option<usize>) -> Result<(), TestCaseError> {
    let rig = Rig::new();
    let mut devices = Vec::new();
    for (n, (production, sandbox)) in script.iter().enumerate() {
        let t = token(n as u8 + 1);
        devices.push(rig.device(&t));
        rig.apns.answer(&t, Environment::Production, production);
        rig.apns.answer(&t, Environment::Sandbox, sandbox);
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (store, watch) = (rig.store.clone(), seen.clone());
    rig.apns.on_send(move |sent| {
        let mut s = watch.lock().unwrap();
        let before = s.per_token.entry(sent.token.clone()).or_default();
        let tried = *before > 0;
        *before += 1;
        if s.cancelled && tried {
            s.retried_after_cancel.push(sent.token.clone());
        }
        s.total += 1;
        if Some(s.total) == cancel_after {
            s.cancelled = true;
            store.cancel("c1");
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let disposition = runtime.block_on(rig.handle(ring_ending_in("c1", 200)));

    prop_assert_eq!(disposition, Disposition::Ack);
    for d in &devices {
        prop_assert_eq!(rig.results_for(*d).len(), 1, "one result for device {}", d);
    }
    prop_assert_eq!(rig.results.published().len(), devices.len());
    let seen = seen.lock().unwrap();
    prop_assert!(
        seen.retried_after_cancel.is_empty(),
        "attempts after the cancel: {:?}",
        seen.retried_after_cancel
    );
    let finished = rig.store.state().finished.clone();
    let recorded: usize = finished.iter().map(|f| f.outcomes.len()).sum();
    prop_assert_eq!(recorded, devices.len(), "each outcome recorded once");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn one_result_per_device_and_no_retry_after_a_cancel(
        script in script(),
        cancel_after in proptest::option::of(1usize..6),
    ) {
        run(script, cancel_after)?;
    }
}
