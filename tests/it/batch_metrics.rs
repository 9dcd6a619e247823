//! `voip_push_batch_requests`: how many events each shared statement served,
//! from a real worker's `/metrics` after rings through the real services.

use serde_json::json;
use voip_push_worker::event::{Environment, Status};

use crate::common::{metric, TestEnv};

/// Every ring's admission and every device's finish is counted once, in the
/// batch it went in; the finishes of concurrent rings share statements.
#[tokio::test]
async fn each_shared_statement_counts_the_requests_it_served() {
    let mut env = TestEnv::new().await;
    let rings = 40;
    for i in 0..rings {
        env.device(
            &format!("bm-{i}"),
            Some(Environment::Production),
            Environment::Production,
        )
        .await;
    }
    for i in 0..rings {
        env.publish(json!({"callId": format!("bm-call-{i}"), "toUserId": format!("bm-{i}")}))
            .await;
    }
    for i in 0..rings {
        let r = &env.results_for(&format!("bm-call-{i}"), 1).await[0];
        assert_eq!(r.status, Status::Delivered);
    }
    for i in 0..rings {
        env.recorded_trace(&format!("bm-call-{i}")).await;
    }
    let series =
        |stat: &str, part: &str| format!("voip_push_batch_requests_{part}{{statement=\"{stat}\"}}");
    let text = env
        .wait_metric(&series("finish_event", "sum"), rings as f64)
        .await;
    assert_eq!(metric(&text, &series("admit_ring", "sum")), rings as f64);
    let (admits, finishes) = (
        metric(&text, &series("admit_ring", "count")),
        metric(&text, &series("finish_event", "count")),
    );
    assert!((1.0..=rings as f64).contains(&admits), "{admits}");
    // The finishes linger for one another: far fewer statements than rings.
    assert!(
        finishes >= 1.0 && finishes < rings as f64 / 2.0,
        "{finishes}"
    );
    // Every shared statement is exported, used or not.
    assert!(text.contains(&series("is_cancelled", "count")), "{text}");
    env.cleanup().await;
}
