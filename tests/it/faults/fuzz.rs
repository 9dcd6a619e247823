//! Malformed messages by the hundred, among good events.

use super::*;

/// Messages no producer should send, but some will.
fn malformed(rng: &mut rand::rngs::StdRng, i: usize) -> Vec<u8> {
    match i % 10 {
        0 => (0..rng.random_range(1..200))
            .map(|_| rng.random::<u8>())
            .collect(),
        1 => {
            let mut b = b"{\"callId\":\"x\",\"toUserId\":\"".to_vec();
            b.extend([0xc3, 0x28, b'"', b'}']);
            b
        }
        2 => json!({"callId": i, "toUserId": [1, 2]})
            .to_string()
            .into_bytes(),
        3 => json!({"toUserId": i}).to_string().into_bytes(),
        4 => json!({"callId": format!("fz-{i}")})
            .to_string()
            .into_bytes(),
        5 => json!({"callId": "x".repeat(65 + i % 50), "toUserId": 1})
            .to_string()
            .into_bytes(),
        6 => json!({"callId": format!("fz-{i}"), "toUserId": 1, "type": "call.ringing"})
            .to_string()
            .into_bytes(),
        7 => json!({"callId": format!("fz-{i}"), "toUserId": 1, "hasVideo": {"no": true}})
            .to_string()
            .into_bytes(),
        8 => {
            let big = "y".repeat(17 * 1024);
            json!({"callId": format!("fz-{i}"), "toUserId": 1, "room": big})
                .to_string()
                .into_bytes()
        }
        _ => {
            let shapes = ["null", "[]", "42", "\"call\"", "{", "{\"callId\":", "true"];
            shapes[rng.random_range(0..shapes.len())]
                .as_bytes()
                .to_vec()
        }
    }
}

#[tokio::test]
async fn fuzzed_messages_are_all_dead_lettered_and_good_events_flow() {
    let mut env = TestEnv::new().await;
    let token = random_token();
    env.sim
        .register_token(Environment::Production, &token, BUNDLE);
    env.store
        .register_device("fz", BUNDLE, &token, None)
        .await
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let bad = 300;
    let mut good = Vec::new();
    for i in 0..bad {
        env.publish_raw(&malformed(&mut rng, i)).await;
        if i % 15 == 0 {
            let call = format!("fz-good-{i}");
            env.publish(json!({"callId": call, "toUserId": "fz"})).await;
            good.push(call);
        }
    }
    for call in &good {
        assert_eq!(env.results_for(call, 1).await[0].status, Status::Delivered);
    }
    let mut dead = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead < bad {
        assert!(
            Instant::now() < deadline,
            "only {dead} of {bad} dead letters"
        );
        dead += env.dead_letters().await.len();
        if dead < bad {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(dead, bad);
    assert_eq!(env.http_get("/healthz").await.0, 200, "the worker is alive");
    println!(
        "fault-report: fuzz: malformed messages {bad}, dead-lettered {dead}, good events {}, delivered {}",
        good.len(),
        good.len()
    );
    env.cleanup().await;
}
