//! What a worker's `/metrics` text says: sums of series and means of
//! histograms, for the bench's report.

use super::round3;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BatchMean {
    pub statement: &'static str,
    pub mean_requests: f64,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StageMean {
    pub stage: &'static str,
    pub mean_ms: f64,
}

/// Mean of each `stage` of `voip_push_stage_duration_seconds`, in ms.
pub(super) fn stage_means(text: &str) -> Vec<StageMean> {
    voip_push_worker::metrics::STAGES
        .iter()
        .map(|&stage| StageMean {
            stage,
            mean_ms: round3(
                histogram_mean(text, "voip_push_stage_duration_seconds", "stage", stage) * 1000.0,
            ),
        })
        .collect()
}

/// Mean of each statement of `voip_push_batch_requests`.
pub(super) fn batch_means(text: &str) -> Vec<BatchMean> {
    voip_push_worker::metrics::BATCHED_STATEMENTS
        .iter()
        .map(|&statement| BatchMean {
            statement,
            mean_requests: round3(histogram_mean(
                text,
                "voip_push_batch_requests",
                "statement",
                statement,
            )),
        })
        .collect()
}

/// Sum over count of the histogram `name`'s series `label="value"`; 0 with
/// no observations (or no such series).
fn histogram_mean(text: &str, name: &str, label: &str, value: &str) -> f64 {
    let series = |suffix: &str| {
        let prefix = format!("{name}_{suffix}{{{label}=\"{value}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str())?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (sum, count) = (series("sum"), series("count"));
    if count > 0.0 {
        sum / count
    } else {
        0.0
    }
}

/// Sum of every series of `name` in Prometheus text.
pub(super) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
