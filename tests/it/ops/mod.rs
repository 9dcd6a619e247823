//! The operations files against the worker itself: every `voip_push_*` metric, label
//! and label value that the alert rules, their unit tests, the Grafana dashboard or
//! any other file under `deploy/` uses must be one that a running worker exports at
//! `/metrics`; and every metric family it exports has a place on the dashboard.
//!
//! PromQL is read by `promql.rs`, a small tokenizer enough for selectors,
//! `by`/`without` lists and Grafana's `label_values`; it is not a PromQL parser.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use voip_push_worker::apns_sim::certs::CertSpec;
use voip_push_worker::event::{Environment, Status};

use crate::common::{TestEnv, BUNDLE2};

mod promql;

use promql::{analyse, Exported};

/// `{{x}}` / `{{ $labels.x }}` placeholders of a legend or an annotation.
fn template_labels(text: &str) -> Vec<String> {
    text.split("{{")
        .skip(1)
        .filter_map(|part| part.split_once("}}"))
        .map(|(inside, _)| inside.trim().trim_start_matches("$labels.").to_string())
        .filter(|name| !name.is_empty() && !name.contains(['$', ' ', '|']))
        .collect()
}

/// The expression and the `$labels` used by each rule of a Prometheus rules
/// file, read line by line: `expr:` inline or as a `|`/`>` block.
fn rules_of(text: &str) -> Vec<(String, String, Vec<String>)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        let Some(name) = trimmed
            .strip_prefix("- alert:")
            .or_else(|| trimmed.strip_prefix("- record:"))
        else {
            i += 1;
            continue;
        };
        let rule_indent = lines[i].len() - trimmed.len();
        let mut end = i + 1;
        while end < lines.len() {
            let t = lines[end].trim_start();
            if !t.is_empty() && lines[end].len() - t.len() <= rule_indent {
                break;
            }
            end += 1;
        }
        let mut expr = String::new();
        for (k, line) in lines.iter().enumerate().take(end).skip(i) {
            let t = line.trim_start().trim_start_matches("- ");
            let Some(rest) = t.strip_prefix("expr:") else {
                continue;
            };
            let rest = rest.trim();
            if rest.starts_with('|') || rest.starts_with('>') {
                let indent = line.len() - line.trim_start().len();
                for body in &lines[k + 1..end] {
                    let bt = body.trim_start();
                    if !bt.is_empty() && body.len() - bt.len() <= indent {
                        break;
                    }
                    expr.push_str(body);
                    expr.push('\n');
                }
            } else {
                expr = rest.trim_matches(|c| c == '\'' || c == '"').to_string();
            }
        }
        let labels = lines[i..end]
            .iter()
            .flat_map(|l| template_labels(l))
            .collect();
        rules.push((name.trim().to_string(), expr, labels));
        i = end;
    }
    rules
}

/// Every string under the key `key` in a JSON tree.
fn strings_under(v: &Value, key: &str, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == key {
                    if let Value::String(s) = child {
                        out.push((s.clone(), v.clone()));
                    }
                }
                strings_under(child, key, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|c| strings_under(c, key, out)),
        _ => {}
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else if path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            out.push(path);
        }
    }
}

/// Identifiers that start with `voip_push_` anywhere in a text.
fn metric_words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("voip_push_"))
        .map(str::to_string)
        .collect()
}

/// All problems of the repository's operations files against `exported`.
fn check_ops_files(exported: &Exported) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut problems = Vec::new();

    // Alert rules: selectors, grouping, and the $labels their annotations use.
    let rules_path = root.join("deploy/monitoring/alerts.rules.yml");
    let rules_text = std::fs::read_to_string(&rules_path).expect("alert rules");
    let rules = rules_of(&rules_text);
    let declared = rules_text.matches("- alert:").count() + rules_text.matches("- record:").count();
    assert_eq!(rules.len(), declared, "every rule of {rules_path:?} read");
    for (name, expr, labels) in &rules {
        assert!(!expr.trim().is_empty(), "rule {name}: no expression read");
        let a = analyse(expr, exported);
        problems.extend(a.problems.iter().map(|p| format!("alert {name}: {p}")));
        // Only for rules on our metrics alone do we know the result's labels.
        if a.metrics.iter().all(|m| m.starts_with("voip_push_")) {
            for label in labels {
                if !a.by_labels.contains(label) {
                    problems.push(format!(
                        "alert {name}: annotation uses $labels.{label}, which the expression drops"
                    ));
                }
            }
        }
    }

    // The rules' unit tests feed series the worker must be able to produce.
    let tests = std::fs::read_to_string(root.join("deploy/monitoring/alerts.test.yml"))
        .expect("alert tests");
    for line in tests.lines() {
        if let Some(series) = line.trim().strip_prefix("- series:") {
            let series = series.trim().trim_matches('\'');
            for p in analyse(series, exported).problems {
                problems.push(format!("alerts.test.yml {series}: {p}"));
            }
        }
    }

    // The dashboard: every query, its legend, and the template variables.
    let dash_text = std::fs::read_to_string(root.join("deploy/monitoring/grafana-dashboard.json"))
        .expect("dashboard");
    let dash: Value = serde_json::from_str(&dash_text).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    strings_under(&dash, "expr", &mut exprs);
    assert!(exprs.len() >= 20, "dashboard queries read: {}", exprs.len());
    let mut shown = BTreeSet::new();
    for (expr, target) in &exprs {
        let a = analyse(expr, exported);
        problems.extend(
            a.problems
                .iter()
                .map(|p| format!("dashboard {expr:?}: {p}")),
        );
        shown.extend(a.metrics.iter().cloned());
        let legend = target["legendFormat"].as_str().unwrap_or_default();
        for label in template_labels(legend) {
            if !a.by_labels.contains(&label) {
                problems.push(format!(
                    "dashboard {expr:?}: legend uses {{{{{label}}}}}, which the query drops"
                ));
            }
        }
    }
    let mut variables = Vec::new();
    strings_under(&dash["templating"], "definition", &mut variables);
    for (query, _) in &variables {
        problems.extend(
            analyse(query, exported)
                .problems
                .into_iter()
                .map(|p| format!("dashboard variable {query:?}: {p}")),
        );
    }
    // Everything the worker measures has a panel.
    for family in exported.labels.keys() {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| family.strip_suffix(s))
            .unwrap_or(family);
        let on_dashboard = shown.iter().any(|m| m == family || m.starts_with(base));
        if family.starts_with("voip_push_") && !on_dashboard {
            problems.push(format!("dashboard: no panel shows {family}"));
        }
    }

    // Any other mention under deploy/ (the HPA's Pods metric, comments).
    let mut files = Vec::new();
    files_under(&root.join("deploy"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        for word in metric_words(&text) {
            if !exported.labels.contains_key(&word) {
                problems.push(format!("{}: {word} is not exported", file.display()));
            }
        }
    }
    problems
}

#[tokio::test]
async fn alerts_and_dashboard_use_only_what_the_worker_exports() {
    let mut env = TestEnv::without_worker(|_| {}).await;
    // The second app authenticates with a certificate: its expiry is exported.
    let certs = crate::certs::CertDir::new();
    env.cfg.apns.apps[1] = certs.pem_app(&env.sim, BUNDLE2, &CertSpec::voip(BUNDLE2));
    env.start_worker().await;
    // A device in production and one the worker has to find in the sandbox: a
    // delivery, a fallback, APNs answers in both environments.
    env.device("ops-1", None, Environment::Production).await;
    env.device("ops-2", None, Environment::Sandbox).await;
    env.publish(json!({"callId": "ops-a", "toUserId": "ops-1", "fromUserId": 7}))
        .await;
    env.publish(json!({"callId": "ops-b", "toUserId": "ops-2", "fromUserId": 7}))
        .await;
    for call in ["ops-a", "ops-b"] {
        let results = env.results_for(call, 1).await;
        assert_eq!(results[0].status, Status::Delivered, "{results:#?}");
    }
    let (status, text) = env.http_get("/metrics").await;
    assert_eq!(status, 200);
    let exported = Exported::parse(&text);
    assert!(
        exported
            .labels
            .contains_key("voip_push_end_to_end_seconds_bucket"),
        "{text}"
    );

    let problems = check_ops_files(&exported);
    assert!(
        problems.is_empty(),
        "the operations files do not match the worker's metrics:\n  {}",
        problems.join("\n  ")
    );
    env.cleanup().await;
}

/// The checker itself: it must catch the mistakes it is there for.
#[test]
fn checker_catches_unknown_metrics_labels_and_values() {
    let exported = Exported::parse(
        "# TYPE voip_push_deliveries_total counter\n\
         voip_push_deliveries_total{status=\"delivered\",environment=\"production\"} 1\n\
         voip_push_deliveries_total{status=\"failed\",environment=\"sandbox\"} 0\n\
         # TYPE voip_push_end_to_end_seconds histogram\n\
         voip_push_end_to_end_seconds_bucket{le=\"0.5\"} 1\n\
         voip_push_end_to_end_seconds_sum 0.1\n\
         voip_push_end_to_end_seconds_count 1\n",
    );
    let ok = [
        r#"sum by (namespace, status) (rate(voip_push_deliveries_total{status=~"failed|expired", environment="sandbox"}[5m]))"#,
        "histogram_quantile(0.99, sum by (le) (rate(voip_push_end_to_end_seconds_bucket{namespace=~\"$namespace\"}[$__rate_interval])))",
        "sum(rate(voip_push_deliveries_total[5m])) by (environment) > 0 and on () sum(rabbitmq_queue_messages_ready{queue=\"q\"}) > 0",
        "label_values(voip_push_deliveries_total, namespace)",
        "rate(voip_push_end_to_end_seconds_sum[5m]) / rate(voip_push_end_to_end_seconds_count[5m])",
    ];
    for expr in ok {
        let a = analyse(expr, &exported);
        assert!(a.problems.is_empty(), "{expr}: {:?}", a.problems);
    }
    let a = analyse(ok[0], &exported);
    assert_eq!(
        a.metrics.iter().collect::<Vec<_>>(),
        ["voip_push_deliveries_total"]
    );
    assert_eq!(
        a.by_labels.iter().collect::<Vec<_>>(),
        ["namespace", "status"]
    );
    let bad = [
        ("rate(voip_push_delivery_total[5m])", "not exported"),
        ("voip_push_deliveries_total{statsu=\"failed\"}", "no label"),
        (
            "voip_push_deliveries_total{status=\"fail\"}",
            "never exports",
        ),
        (
            "sum by (reason) (rate(voip_push_deliveries_total[5m]))",
            "by (reason)",
        ),
        (
            "sum(rate(voip_push_deliveries_total[5m])) without (le)",
            "without (le)",
        ),
        (
            "sum by (le) (rate(voip_push_end_to_end_seconds[5m]))",
            "by (le)",
        ),
        (
            "label_values(voip_push_deliveries_total, reason)",
            "no label",
        ),
    ];
    for (expr, why) in bad {
        let a = analyse(expr, &exported);
        assert!(
            a.problems.iter().any(|p| p.contains(why)),
            "{expr}: expected a problem with {why:?}, got {:?}",
            a.problems
        );
    }
    let rules = rules_of(
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n          sum by (status) (x)\n            > 1\n        annotations:\n          d: \"{{ $labels.status }} {{ $value }}\"\n      - record: r:x\n        expr: 'voip_push_in_flight'\n",
    );
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert!(
        rules[0].1.contains("sum by (status) (x)") && rules[0].1.contains("> 1"),
        "{rules:?}"
    );
    assert_eq!(rules[0].2, vec!["status".to_string()]);
    assert_eq!(rules[1].1, "voip_push_in_flight");
}
