//! The small PromQL reader the operations check uses: the metrics a worker
//! exports (from its `/metrics` text), a tokenizer enough for selectors,
//! `by`/`without` lists and Grafana's `label_values`, and the check of one
//! expression against what is exported. Not a PromQL parser.

use std::collections::{BTreeMap, BTreeSet};
/// Labels that Prometheus attaches from the scrape target, not from the worker.
pub(super) const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "container",
    "endpoint",
];

/// Labels whose values only appear once APNs has said them (Apple's reasons and
/// status codes): their values are not checked, only their names.
pub(super) const OPEN_VALUED: &[(&str, &str)] = &[
    ("voip_push_apns_requests_total", "code"),
    ("voip_push_apns_requests_total", "reason"),
];

pub(super) const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
];

/// What `/metrics` showed: label names per sample name (and per histogram family
/// name), and the values seen per (sample name, label).
#[derive(Default)]
pub(super) struct Exported {
    pub(super) labels: BTreeMap<String, BTreeSet<String>>,
    pub(super) values: BTreeMap<(String, String), BTreeSet<String>>,
}

impl Exported {
    pub(super) fn parse(text: &str) -> Self {
        let mut out = Exported::default();
        let mut histograms = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    out.labels.entry(name.to_string()).or_default();
                    if kind == "histogram" {
                        histograms.push(name.to_string());
                    }
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = line[..end].to_string();
            let names = out.labels.entry(name.clone()).or_default();
            if line[end..].starts_with('{') {
                for (label, value) in parse_label_pairs(&line[end + 1..]) {
                    names.insert(label.clone());
                    out.values
                        .entry((name.clone(), label))
                        .or_default()
                        .insert(value);
                }
            }
        }
        // A histogram's family name stands for its series without `le`.
        for family in histograms {
            let count = out
                .labels
                .get(&format!("{family}_count"))
                .cloned()
                .unwrap_or_default();
            out.labels.insert(family, count);
        }
        out
    }

    fn has_label(&self, metric: &str, label: &str) -> bool {
        TARGET_LABELS.contains(&label)
            || self
                .labels
                .get(metric)
                .is_some_and(|set| set.contains(label))
    }
}

/// `a="x",b="y"}` → [(a, x), (b, y)], with `\"` and `\\` unescaped.
pub(super) fn parse_label_pairs(s: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let label: String = chars
            .by_ref()
            .take_while(|c| *c != '=' && *c != '}')
            .collect();
        let label = label.trim_matches(|c: char| c == ',' || c.is_whitespace());
        if label.is_empty() || chars.next() != Some('"') {
            return pairs;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        pairs.push((label.to_string(), value));
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Tok {
    Ident(String),
    Str(String),
    Punct(String),
    /// Numbers, durations, `[5m]` ranges, Grafana `$variables`.
    Other,
}

pub(super) fn tokenize(expr: &str) -> Vec<Tok> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c == '"' || c == '\'' || c == '`' {
            let mut value = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
            i += 1;
            out.push(Tok::Str(value));
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
            out.push(Tok::Other);
        } else if c.is_ascii_digit() || c == '.' || c == '$' {
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
            out.push(Tok::Other);
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let op = if ["=~", "!~", "!=", "==", ">=", "<="].contains(&two.as_str()) {
                two
            } else {
                c.to_string()
            };
            i += op.chars().count();
            out.push(Tok::Punct(op));
        }
    }
    out
}

pub(super) fn is_punct(t: Option<&Tok>, p: &str) -> bool {
    matches!(t, Some(Tok::Punct(x)) if x == p)
}

/// Index of the bracket that closes the one at `open` (searching forward), or
/// opens the one at `close` (searching backward).
pub(super) fn matching(toks: &[Tok], at: usize, forward: bool) -> Option<usize> {
    let (inc, dec) = if forward { ("(", ")") } else { (")", "(") };
    let mut depth = 0i32;
    let mut i = at as isize;
    while i >= 0 && (i as usize) < toks.len() {
        if is_punct(toks.get(i as usize), inc) {
            depth += 1;
        } else if is_punct(toks.get(i as usize), dec) {
            depth -= 1;
            if depth == 0 {
                return Some(i as usize);
            }
        }
        i += if forward { 1 } else { -1 };
    }
    None
}

/// The identifiers in `toks[open+1..close]` up to the closing parenthesis.
pub(super) fn ident_list(toks: &[Tok], open: usize) -> (Vec<String>, usize) {
    let close = matching(toks, open, true).unwrap_or(toks.len() - 1);
    let names = toks[open + 1..close]
        .iter()
        .filter_map(|t| match t {
            Tok::Ident(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    (names, close)
}

/// What one expression uses, and what is wrong with it.
#[derive(Default, Debug)]
pub(super) struct Analysis {
    /// Every metric name (any source) selected by the expression.
    pub(super) metrics: BTreeSet<String>,
    /// Labels named in `by (...)` clauses.
    pub(super) by_labels: BTreeSet<String>,
    pub(super) problems: Vec<String>,
}

pub(super) fn analyse(expr: &str, exported: &Exported) -> Analysis {
    let toks = tokenize(expr);
    let mut a = Analysis::default();
    // Selector and grouping labels, so they are not taken for metric names.
    let mut skip = BTreeSet::new();
    for (i, tok) in toks.iter().enumerate() {
        let Tok::Ident(word) = tok else { continue };
        if skip.contains(&i) {
            continue;
        }
        if word == "label_values" && is_punct(toks.get(i + 1), "(") {
            // Grafana: label_values(metric, label)
            if let (Some(Tok::Ident(metric)), Some(Tok::Ident(label))) =
                (toks.get(i + 2), toks.get(i + 4))
            {
                skip.extend([i + 2, i + 4]);
                a.metrics.insert(metric.clone());
                if metric.starts_with("voip_push_") {
                    check_metric(metric, exported, &mut a);
                    if !exported.has_label(metric, label) {
                        a.problems
                            .push(format!("label_values: {metric} has no label {label:?}"));
                    }
                }
            }
            continue;
        }
        if matches!(word.as_str(), "by" | "without") && is_punct(toks.get(i + 1), "(") {
            let (labels, close) = ident_list(&toks, i + 1);
            skip.extend(i + 1..=close);
            if word == "by" {
                a.by_labels.extend(labels.iter().cloned());
            }
            // The aggregated expression: `sum by (x) (expr)` or `sum(expr) by (x)`.
            let group = if is_punct(toks.get(i.wrapping_sub(1)), ")") {
                matching(&toks, i - 1, false).map(|open| (open, i - 1))
            } else if is_punct(toks.get(close + 1), "(") {
                matching(&toks, close + 1, true).map(|end| (close + 1, end))
            } else {
                None
            };
            let Some((from, to)) = group else {
                a.problems
                    .push(format!("{word} ({labels:?}) aggregates nothing I can find"));
                continue;
            };
            let inner: Vec<&String> = toks[from..to]
                .iter()
                .enumerate()
                .filter_map(|(k, t)| match t {
                    Tok::Ident(s)
                        if s.starts_with("voip_push_")
                            && !is_punct(toks.get(from + k + 1), "(") =>
                    {
                        Some(s)
                    }
                    _ => None,
                })
                .collect();
            if inner.is_empty() {
                continue; // another exporter's metrics
            }
            for label in &labels {
                if !inner.iter().any(|m| exported.has_label(m, label)) {
                    a.problems.push(format!(
                        "{word} ({label}) over {inner:?}: no such label is exported"
                    ));
                }
            }
            continue;
        }
        if matches!(
            word.as_str(),
            "on" | "ignoring" | "group_left" | "group_right"
        ) && is_punct(toks.get(i + 1), "(")
        {
            let (_, close) = ident_list(&toks, i + 1);
            skip.extend(i + 1..=close);
            continue;
        }
        let aggregator =
            matches!(toks.get(i + 1), Some(Tok::Ident(next)) if next == "by" || next == "without");
        if KEYWORDS.contains(&word.as_str()) || aggregator || is_punct(toks.get(i + 1), "(") {
            continue; // a keyword, a function or an aggregation
        }
        // A metric name, maybe with a selector.
        a.metrics.insert(word.clone());
        let ours = word.starts_with("voip_push_");
        if ours {
            check_metric(word, exported, &mut a);
        }
        if is_punct(toks.get(i + 1), "{") {
            let mut k = i + 2;
            while let (Some(Tok::Ident(label)), Some(Tok::Punct(op)), Some(Tok::Str(value))) =
                (toks.get(k), toks.get(k + 1), toks.get(k + 2))
            {
                skip.insert(k);
                if ours {
                    check_matcher(word, label, op, value, exported, &mut a);
                }
                k += 3;
                if is_punct(toks.get(k), ",") {
                    k += 1;
                }
            }
            if !is_punct(toks.get(k), "}") {
                a.problems
                    .push(format!("{word}: selector not understood near token {k}"));
            }
        }
    }
    a
}

pub(super) fn check_metric(name: &str, exported: &Exported, a: &mut Analysis) {
    if !exported.labels.contains_key(name) {
        a.problems
            .push(format!("metric {name} is not exported by the worker"));
    }
}

pub(super) fn check_matcher(
    metric: &str,
    label: &str,
    op: &str,
    value: &str,
    exported: &Exported,
    a: &mut Analysis,
) {
    if !exported.has_label(metric, label) {
        a.problems.push(format!("{metric} has no label {label:?}"));
        return;
    }
    if op != "=" || TARGET_LABELS.contains(&label) || OPEN_VALUED.contains(&(metric, label)) {
        return;
    }
    let family = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| metric.strip_suffix(s))
        .unwrap_or(metric);
    let seen = exported
        .values
        .get(&(metric.to_string(), label.to_string()))
        .or_else(|| {
            exported
                .values
                .get(&(format!("{family}_count"), label.to_string()))
        });
    if !seen.is_some_and(|values| values.contains(value)) {
        a.problems.push(format!(
            "{metric}{{{label}=\"{value}\"}}: the worker never exports that value (it has {seen:?})"
        ));
    }
}
