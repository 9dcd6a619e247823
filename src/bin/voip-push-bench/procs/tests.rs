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
