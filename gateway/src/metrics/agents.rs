//! The agents' own metrics, merged into the gateway's exposition.
//!
//! Agents' text is untrusted input merged into one exposition, so it is parsed, not pasted:
//! samples are regrouped under one HELP/TYPE per family (the format requires a family's samples
//! to be contiguous and its metadata to appear once), label values are re-checked, an agent's own
//! `host` label becomes `exported_host` (as Prometheus does on conflicts), and families that
//! would clash with the gateway's own names are dropped.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::{esc, OWN_FAMILIES};
use crate::model::Machine;

/// One metric family gathered from all agents.
#[derive(Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// Every agent's own metrics with a `host` label added; HELP and TYPE once per family, and the
/// samples of a family kept together as the format requires.
pub(super) fn append_agent_metrics(out: &mut String, machines: &[&Machine]) {
    let mut order: Vec<String> = Vec::new();
    let mut families: HashMap<String, Family> = HashMap::new();
    for m in machines {
        relabel_into(
            &m.agent_metrics,
            &m.info.hostname,
            &mut order,
            &mut families,
        );
    }
    for name in order {
        let Some(f) = families.remove(&name) else {
            continue;
        };
        if let Some(help) = f.help {
            let _ = writeln!(out, "# HELP {name} {help}");
        }
        if let Some(kind) = f.kind {
            let _ = writeln!(out, "# TYPE {name} {kind}");
        }
        for s in f.samples {
            out.push_str(&s);
            out.push('\n');
        }
    }
}

/// Parses one agent's exposition and files its samples, relabelled, under their families.
fn relabel_into(
    text: &str,
    host: &str,
    order: &mut Vec<String>,
    families: &mut HashMap<String, Family>,
) {
    fn get<'f>(
        order: &mut Vec<String>,
        families: &'f mut HashMap<String, Family>,
        name: &str,
    ) -> Option<&'f mut Family> {
        // `cbus_gateway_*` are the gateway's own counters (crate::stats), `cbus_systemd_*` its
        // fleet series.
        if OWN_FAMILIES.contains(&name)
            || name.starts_with("cbus_gateway_")
            || name.starts_with("cbus_systemd_")
        {
            return None;
        }
        if !families.contains_key(name) {
            order.push(name.to_owned());
        }
        Some(families.entry(name.to_owned()).or_default())
    }
    // The family the last TYPE line named: its histogram/summary samples carry suffixes.
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            let mut parts = rest.splitn(3, ' ');
            let (Some(kind), Some(name)) = (parts.next(), parts.next()) else {
                continue;
            };
            let arg = parts.next().unwrap_or("").trim();
            if !valid_metric_name(name) {
                continue;
            }
            match kind {
                "HELP" => {
                    if let Some(f) = get(order, families, name) {
                        f.help.get_or_insert_with(|| arg.to_owned());
                    }
                }
                "TYPE" => {
                    const KINDS: [&str; 5] =
                        ["counter", "gauge", "histogram", "summary", "untyped"];
                    if !KINDS.contains(&arg) {
                        continue;
                    }
                    if let Some(f) = get(order, families, name) {
                        f.kind.get_or_insert_with(|| arg.to_owned());
                        current = Some((name.to_owned(), arg.to_owned()));
                    }
                }
                _ => {}
            }
            continue;
        }
        let Some(sample) = Sample::parse(line) else {
            tracing::debug!(host, line, "unparsable agent metric line dropped");
            continue;
        };
        let family_name = match &current {
            Some((fam, kind))
                if sample.name == *fam
                    || (matches!(kind.as_str(), "histogram" | "summary")
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| sample.name.strip_suffix(s) == Some(fam.as_str()))) =>
            {
                fam.clone()
            }
            _ => sample.name.to_owned(),
        };
        if let Some(f) = get(order, families, &family_name) {
            f.samples.push(sample.render_with_host(host));
        }
    }
}

/// A parsed sample line: `name{labels} value [timestamp]`.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    /// (label name, escaped value as written)
    labels: Vec<(&'a str, &'a str)>,
    /// value and optional timestamp, as written
    rest: &'a str,
}

impl<'a> Sample<'a> {
    fn parse(line: &'a str) -> Option<Sample<'a>> {
        let line = line.trim();
        let name_end = line
            .find(|c: char| c == '{' || c.is_ascii_whitespace())
            .unwrap_or(line.len());
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return None;
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut s = body;
            loop {
                s = s.trim_start();
                if let Some(after) = s.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let eq = s.find('=')?;
                let lname = s[..eq].trim();
                if !valid_label_name(lname) {
                    return None;
                }
                let after_eq = s[eq + 1..].trim_start().strip_prefix('"')?;
                // Find the closing quote, honouring backslash escapes.
                let mut end = None;
                let mut escaped = false;
                for (i, c) in after_eq.char_indices() {
                    match c {
                        _ if escaped => {
                            if !matches!(c, '\\' | '"' | 'n') {
                                return None;
                            }
                            escaped = false;
                        }
                        '\\' => escaped = true,
                        '"' => {
                            end = Some(i);
                            break;
                        }
                        '\n' => return None,
                        _ => {}
                    }
                }
                let end = end?;
                labels.push((lname, &after_eq[..end]));
                s = after_eq[end + 1..].trim_start();
                if let Some(after) = s.strip_prefix(',') {
                    s = after;
                } else if !s.starts_with('}') {
                    return None;
                }
            }
        }
        let rest = rest.trim();
        let mut fields = rest.split_ascii_whitespace();
        let value = fields.next()?;
        let valid_value = value.parse::<f64>().is_ok()
            || matches!(value, "NaN" | "+Inf" | "-Inf" | "Inf" | "+inf" | "-inf");
        if !valid_value {
            return None;
        }
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().ok()?;
        }
        if fields.next().is_some() {
            return None;
        }
        Some(Sample { name, labels, rest })
    }

    fn render_with_host(&self, host: &str) -> String {
        let mut s = String::with_capacity(self.name.len() + self.rest.len() + 32);
        s.push_str(self.name);
        s.push_str("{host=\"");
        s.push_str(&esc(host));
        s.push('"');
        for (name, value) in &self.labels {
            s.push(',');
            s.push_str(if *name == "host" {
                "exported_host"
            } else {
                name
            });
            s.push_str("=\"");
            s.push_str(value);
            s.push('"');
        }
        s.push_str("} ");
        s.push_str(self.rest);
        s
    }
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::machine;

    #[test]
    fn samples_parse_and_relabel() {
        let s = Sample::parse(r#"a{op="get",x="a\"}b"} 3 1700"#).unwrap();
        assert_eq!(s.labels, vec![("op", "get"), ("x", r#"a\"}b"#)]);
        assert_eq!(
            s.render_with_host("h\"x"),
            r#"a{host="h\"x",op="get",x="a\"}b"} 3 1700"#
        );
        assert_eq!(
            Sample::parse("a_total 3").unwrap().render_with_host("h"),
            "a_total{host=\"h\"} 3"
        );
        assert_eq!(
            Sample::parse("a{} 3").unwrap().render_with_host("h"),
            "a{host=\"h\"} 3"
        );
        assert_eq!(
            Sample::parse(r#"a{host="inner"} NaN"#)
                .unwrap()
                .render_with_host("h"),
            r#"a{host="h",exported_host="inner"} NaN"#
        );
        for bad in [
            "1bad 3",
            "a 3 4 5",
            "a{x=\"1} 3",
            "a{x=1} 3",
            "a{1x=\"1\"} 3",
            "a{x=\"\\q\"} 3",
            "a nope",
            "a",
        ] {
            assert!(Sample::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn families_merge_across_agents() {
        let a = "# HELP req_total Requests.\n# TYPE req_total counter\nreq_total{op=\"get\"} 1\n\
                 # HELP lat Latency.\n# TYPE lat histogram\nlat_bucket{le=\"1\"} 1\nlat_bucket{le=\"+Inf\"} 2\nlat_sum 3\nlat_count 2\n\
                 cbus_agent_up 1\nstray 5\n";
        let b = "# HELP req_total Other help.\n# TYPE req_total counter\nreq_total{op=\"get\"} 7\n# TYPE lat histogram\nlat_bucket{le=\"+Inf\"} 0\nlat_sum 0\nlat_count 0\n";
        let mut out = String::new();
        append_agent_metrics(&mut out, &[&machine("a", a), &machine("b", b)]);
        assert_eq!(out.matches("# HELP req_total").count(), 1);
        assert_eq!(out.matches("# TYPE lat histogram").count(), 1);
        assert!(
            !out.contains("cbus_agent_up"),
            "own families are not overwritten"
        );
        let req: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("req_total{"))
            .collect();
        assert_eq!(
            req,
            [
                "req_total{host=\"a\",op=\"get\"} 1",
                "req_total{host=\"b\",op=\"get\"} 7"
            ]
        );
        // The histogram's samples stay together after its TYPE, from both hosts.
        let lat_start = out.find("# TYPE lat").unwrap();
        let lat_block: Vec<&str> = out[lat_start..].lines().skip(1).take(7).collect();
        assert!(lat_block.iter().all(|l| l.starts_with("lat_")), "{out}");
        assert!(out.contains("stray{host=\"a\"} 5"));
    }
}
