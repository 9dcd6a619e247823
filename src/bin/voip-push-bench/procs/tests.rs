use super::*;

#[test]
fn step_means_come_from_the_histogram_sums_and_counts() {
    let text = "\
voip_push_stage_duration_seconds_bucket{stage=\"claim\",le=\"0.001\"} 1
voip_push_stage_duration_seconds_sum{stage=\"claim\"} 0.5
voip_push_stage_duration_seconds_count{stage=\"claim\"} 100
voip_push_stage_duration_seconds_sum{stage=\"resolve\"} 0
voip_push_stage_duration_seconds_count{stage=\"resolve\"} 0
";
    let means = stage_means(text);
    let of = |s: &str| means.iter().find(|m| m.stage == s).unwrap().mean_ms;
    assert_eq!(of("claim"), 5.0);
    // No observations (or no series at all): 0, not NaN.
    assert_eq!(of("resolve"), 0.0);
    assert_eq!(of("publish"), 0.0);
    assert_eq!(means.len(), voip_push_worker::metrics::STAGES.len());
}

#[test]
fn batch_means_come_from_the_histogram_per_statement() {
    let text = "\
voip_push_batch_requests_bucket{statement=\"admit_ring\",le=\"1\"} 2
voip_push_batch_requests_sum{statement=\"admit_ring\"} 30
voip_push_batch_requests_count{statement=\"admit_ring\"} 4
voip_push_batch_requests_sum{statement=\"finish_event\"} 0
voip_push_batch_requests_count{statement=\"finish_event\"} 0
";
    let means = batch_means(text);
    let of = |s: &str| {
        means
            .iter()
            .find(|m| m.statement == s)
            .unwrap()
            .mean_requests
    };
    assert_eq!(of("admit_ring"), 7.5);
    assert_eq!(of("finish_event"), 0.0);
    assert_eq!(of("live_devices"), 0.0);
    assert_eq!(
        means.len(),
        voip_push_worker::metrics::BATCHED_STATEMENTS.len()
    );
}
