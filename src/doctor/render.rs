//! The report for people (aligned, wrapped for an 80-column terminal) and for
//! scripts (JSON). Pure functions of a [`Report`].

use super::{Report, Section, Status};

pub const WIDTH: usize = 80;
/// Titles longer than this put their detail on the next line.
const TITLE_MAX: usize = 28;
/// Where fix text starts: "      fix: ".
const FIX_INDENT: usize = 11;

fn width(s: &str) -> usize {
    s.chars().count()
}

/// Word-wraps `text` into lines of at most `room` characters (a longer word gets a
/// line of its own).
pub fn wrap(text: &str, room: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && width(&line) + 1 + width(word) > room {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

fn push_wrapped(out: &mut String, first_prefix: &str, indent: usize, text: &str) {
    let pad = " ".repeat(indent);
    let lines = wrap(text, WIDTH - indent);
    // A word too long for the column (a URL) gets the width of a whole line.
    if indent > 6 && lines.iter().any(|l| width(l) > WIDTH - indent) {
        out.push_str(first_prefix.trim_end());
        out.push('\n');
        return push_wrapped(out, "      ", 6, text);
    }
    for (i, line) in lines.iter().enumerate() {
        out.push_str(if i == 0 { first_prefix } else { &pad });
        out.push_str(line);
        out.push('\n');
    }
}

/// ✓/!/✗/- per check, grouped by section, with the fix under each ✗ and !.
pub fn render_human(report: &Report) -> String {
    let title_width = report
        .checks
        .iter()
        .map(|c| width(&c.title))
        .filter(|w| *w <= TITLE_MAX)
        .max()
        .unwrap_or(0);
    // "  ✓ " + title + two spaces.
    let detail_col = 4 + title_width + 2;
    let mut out = String::from("voip-push-worker doctor\n");
    let mut section: Option<Section> = None;
    for c in &report.checks {
        if section != Some(c.section) {
            section = Some(c.section);
            out.push('\n');
            out.push_str(c.section.heading());
            out.push('\n');
        }
        let head = format!("  {} {}", c.status.symbol(), c.title);
        if c.detail.is_empty() {
            out.push_str(&head);
            out.push('\n');
        } else if width(&c.title) <= title_width {
            let first = format!("{head:<w$}", w = detail_col);
            // format! pads by chars, the symbol is one char wide: columns line up.
            push_wrapped(&mut out, &first, detail_col, &c.detail);
        } else {
            out.push_str(&head);
            out.push('\n');
            let pad = " ".repeat(detail_col);
            push_wrapped(&mut out, &pad, detail_col, &c.detail);
        }
        for note in &c.notes {
            out.push_str("      ");
            out.push_str(note);
            out.push('\n');
        }
        if let Some(fix) = &c.fix {
            push_wrapped(&mut out, "      fix: ", FIX_INDENT, fix);
        }
    }
    let (pass, warn, fail, skip) = (
        report.count(Status::Pass),
        report.count(Status::Warn),
        report.count(Status::Fail),
        report.count(Status::Skip),
    );
    out.push('\n');
    out.push_str(&format!(
        "{pass} passed, {warn} warning{}, {fail} failed, {skip} skipped in {} ms\n{}\n",
        if warn == 1 { "" } else { "s" },
        report.duration_ms,
        if fail == 0 {
            "nothing stands in the way of a ring"
        } else {
            "fix each ✗ above, then run the doctor again"
        }
    ));
    out
}

/// The stable JSON form documented in the README.
pub fn render_json(report: &Report) -> String {
    serde_json::to_string_pretty(report).expect("report serialises")
}

#[cfg(test)]
mod tests {
    use super::super::{Check, Report, Section};
    use super::*;

    #[test]
    fn wraps_at_words() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        assert_eq!(wrap("averylongword b", 4), vec!["averylongword", "b"]);
        assert!(wrap("", 10).is_empty());
    }

    #[test]
    fn every_line_fits_80_columns_and_fixes_follow_failures() {
        let report = Report {
            ok: false,
            duration_ms: 12,
            checks: vec![
                Check::new("config.load", Section::Configuration, "configuration loads")
                    .pass("1 app"),
                Check::new("apns.accept", Section::Apns, "production accepts com.example.chat")
                    .fail(
                        "403 InvalidProviderToken: APNs does not know key KEY0000009 of team TEAM000001",
                        "set VPW__APNS__KEY_ID to the Key ID shown with this key in the developer portal (Keys), and a great many more words that must wrap nicely",
                    ),
            ],
        };
        let text = render_human(&report);
        for line in text.lines() {
            assert!(width(line) <= WIDTH, "too wide: {line:?}");
        }
        assert!(text.contains("  ✓ configuration loads"), "{text}");
        assert!(text.contains("      fix: set VPW__APNS__KEY_ID"), "{text}");
        assert!(text.contains("1 passed, 0 warnings, 1 failed"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&render_json(&report)).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][1]["status"], "fail");
        assert_eq!(json["checks"][1]["environment"], serde_json::Value::Null);
        assert_eq!(json["checks"][0]["fix"], serde_json::Value::Null);
    }
}
