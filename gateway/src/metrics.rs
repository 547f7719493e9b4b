//! `/metrics` rendered from the cache: no NATS round trip during a scrape, so one stuck machine
//! can never slow Prometheus down. Names follow node_exporter's systemd collector with a `host`
//! label, so dashboards carry over; the agents' own metrics are appended with a `host` label.
//!
//! Agents' text is untrusted input merged into one exposition, so it is parsed, not pasted:
//! samples are regrouped under one HELP/TYPE per family (the format requires a family's samples
//! to be contiguous and its metadata to appear once), label values are re-checked, an agent's own
//! `host` label becomes `exported_host` (as Prometheus does on conflicts), and families that
//! would clash with the gateway's own names are dropped.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use cbus_protocol::presence::AgentState;

use crate::cache::{unit_type, Machine};

/// The states node_exporter exports one-hot.
pub const STATES: [&str; 6] = [
    "active",
    "activating",
    "deactivating",
    "inactive",
    "failed",
    "reloading",
];

/// Families the gateway writes itself; agents may not reuse them.
const OWN_FAMILIES: [&str; 5] = [
    "cbus_agent_up",
    "cbus_agent_last_seen_timestamp_seconds",
    "cbus_systemd_unit_state",
    "cbus_systemd_unit_restarts_total",
    "cbus_systemd_unit_start_time_seconds",
];

/// Prometheus text exposition (format 0.0.4) of the fleet.
pub fn render<M: Borrow<Machine>>(machines: &[M], now_ms: u64) -> String {
    let machines: Vec<&Machine> = machines.iter().map(Borrow::borrow).collect();
    let machines = machines.as_slice();
    let mut out = String::new();
    family(
        &mut out,
        "cbus_agent_up",
        "gauge",
        "1 when the agent heartbeats (running), 0 when unresponsive or stopped.",
    );
    for m in machines {
        let up = u8::from(m.state(now_ms) == AgentState::Running);
        let _ = writeln!(
            out,
            "cbus_agent_up{{host=\"{}\",nkey=\"{}\"}} {up}",
            esc(&m.info.hostname),
            esc(&m.info.nkey)
        );
    }
    family(
        &mut out,
        "cbus_agent_last_seen_timestamp_seconds",
        "gauge",
        "When the agent was last heard from.",
    );
    for m in machines {
        let _ = writeln!(
            out,
            "cbus_agent_last_seen_timestamp_seconds{{host=\"{}\",nkey=\"{}\"}} {:.3}",
            esc(&m.info.hostname),
            esc(&m.info.nkey),
            m.last_seen_ms as f64 / 1000.0
        );
    }
    // The bulk of a scrape is the units' series, so each machine's are rendered once per
    // change of its units and reused by every scrape until then.
    let series: Vec<Arc<UnitSeries>> = machines.iter().map(|m| unit_series(m)).collect();
    out.reserve(
        series
            .iter()
            .map(|s| s.state.len() + s.restarts.len() + s.start_time.len())
            .sum(),
    );
    family(
        &mut out,
        "cbus_systemd_unit_state",
        "gauge",
        "systemd unit state, one-hot over the states.",
    );
    for s in &series {
        out.push_str(&s.state);
    }
    family(
        &mut out,
        "cbus_systemd_unit_restarts_total",
        "counter",
        "Service restarts (NRestarts), where known.",
    );
    for s in &series {
        out.push_str(&s.restarts);
    }
    family(
        &mut out,
        "cbus_systemd_unit_start_time_seconds",
        "gauge",
        "When an active unit became active (ActiveEnterTimestamp); 0 for units not active.",
    );
    for s in &series {
        out.push_str(&s.start_time);
    }
    crate::stats::render(&mut out);
    append_agent_metrics(&mut out, machines);
    out
}

/// One machine's samples of the three unit families, kept in [`Machine`] until its units change.
#[derive(Debug, Default)]
pub struct UnitSeries {
    /// The hostname the series were rendered with. The cache drops the series when a machine
    /// reports a new name; this guards any other change of `Machine::info`.
    host: String,
    state: String,
    restarts: String,
    start_time: String,
}

/// Renders the machine's unit series if its units changed since the last scrape, so that a
/// following [`render`] finds them ready. Called for one machine at a time, it keeps the bulk
/// of a scrape's work out of the one long hold of the cache that [`render`] needs.
pub fn prepare(m: &Machine) {
    unit_series(m);
}

/// The machine's cached unit series, rendered now if its units changed since the last scrape.
fn unit_series(m: &Machine) -> Arc<UnitSeries> {
    let cached = m
        .unit_series
        .get_or_init(|| Arc::new(render_unit_series(m)));
    if cached.host == m.info.hostname {
        Arc::clone(cached)
    } else {
        Arc::new(render_unit_series(m))
    }
}

fn render_unit_series(m: &Machine) -> UnitSeries {
    let host = esc(&m.info.hostname);
    let mut s = UnitSeries {
        host: m.info.hostname.clone(),
        state: String::with_capacity(m.units().len() * STATES.len() * 100),
        ..Default::default()
    };
    for (name, u) in m.units() {
        let (name, kind) = (esc(name), esc(unit_type(name)));
        // Each unit's label prefix is built once, then plain pushes.
        let prefix = format!(
            "cbus_systemd_unit_state{{host=\"{host}\",name=\"{name}\",type=\"{kind}\",state=\""
        );
        for state in STATES {
            s.state.push_str(&prefix);
            s.state.push_str(state);
            s.state.push_str(if u.active == state {
                "\"} 1\n"
            } else {
                "\"} 0\n"
            });
        }
        if let Some(r) = u.restarts {
            let _ = writeln!(
                s.restarts,
                "cbus_systemd_unit_restarts_total{{host=\"{host}\",name=\"{name}\"}} {r}"
            );
        }
        let secs = match u.active_enter_us {
            Some(us) if u.active == "active" => us as f64 / 1e6,
            _ if u.active != "active" => 0.0,
            _ => continue,
        };
        let _ = writeln!(
            s.start_time,
            "cbus_systemd_unit_start_time_seconds{{host=\"{host}\",name=\"{name}\",type=\"{kind}\"}} {secs:.6}"
        );
    }
    s
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value per the exposition format.
pub fn esc(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(v);
    }
    std::borrow::Cow::Owned(
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n"),
    )
}

/// One metric family gathered from all agents.
#[derive(Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// Every agent's own metrics with a `host` label added; HELP and TYPE once per family, and the
/// samples of a family kept together as the format requires.
pub fn append_agent_metrics(out: &mut String, machines: &[&Machine]) {
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
        // `cbus_gateway_*` are the gateway's own counters (crate::stats).
        if OWN_FAMILIES.contains(&name) || name.starts_with("cbus_gateway_") {
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
    use crate::cache::Unit;
    use cbus_protocol::presence::{AgentInfo, PresenceKind};
    use std::collections::BTreeMap;

    fn machine(host: &str, metrics: &str) -> Machine {
        let mut m = Machine::new(
            AgentInfo {
                nkey: format!("U{host}"),
                hostname: host.into(),
                version: "0.1.0".into(),
                bus: "system".into(),
                started_at_ms: 1,
                heartbeat_ms: 5000,
                bus_connected: true,
                labels: BTreeMap::new(),
            },
            PresenceKind::Heartbeat,
            cbus_protocol::presence::now_ms(),
        );
        m.agent_metrics = metrics.into();
        m
    }

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

    #[test]
    fn exposition_of_units() {
        let mut m = machine("h1", "");
        m.units_mut().insert(
            "x.service".into(),
            Unit {
                active: "failed".into(),
                restarts: Some(2),
                ..Default::default()
            },
        );
        m.units_mut().insert(
            "y.service".into(),
            Unit {
                active: "active".into(),
                active_enter_us: Some(1_500_000),
                ..Default::default()
            },
        );
        let out = render(&[m], cbus_protocol::presence::now_ms());
        assert!(out.contains(
            "cbus_systemd_unit_state{host=\"h1\",name=\"x.service\",type=\"service\",state=\"failed\"} 1"
        ));
        assert!(out.contains(
            "cbus_systemd_unit_state{host=\"h1\",name=\"x.service\",type=\"service\",state=\"active\"} 0"
        ));
        assert!(out.contains("cbus_systemd_unit_restarts_total{host=\"h1\",name=\"x.service\"} 2"));
        assert!(out.contains("cbus_systemd_unit_start_time_seconds{host=\"h1\",name=\"y.service\",type=\"service\"} 1.500000"));
        assert!(out.contains("cbus_systemd_unit_start_time_seconds{host=\"h1\",name=\"x.service\",type=\"service\"} 0.000000"));
        assert!(out.contains("cbus_agent_up{host=\"h1\",nkey=\"Uh1\"} 1"));
    }

    #[test]
    fn cached_unit_series_follow_changes() {
        let mut m = machine("h1", "");
        m.units_mut().insert(
            "x.service".into(),
            Unit {
                active: "active".into(),
                ..Default::default()
            },
        );
        let line = |host: &str, state: &str, v: u8| {
            format!("cbus_systemd_unit_state{{host=\"{host}\",name=\"x.service\",type=\"service\",state=\"{state}\"}} {v}")
        };
        let now = cbus_protocol::presence::now_ms();
        assert!(render(&[&m], now).contains(&line("h1", "active", 1)));
        // A second scrape reuses what the first rendered.
        let first = unit_series(&m);
        assert!(Arc::ptr_eq(&first, &unit_series(&m)));
        if let Some(u) = m.units_mut().get_mut("x.service") {
            u.active = "failed".into();
        }
        let out = render(&[&m], now);
        assert!(out.contains(&line("h1", "failed", 1)), "{out}");
        assert!(out.contains(&line("h1", "active", 0)), "{out}");
        m.info.hostname = "h2".into();
        let out = render(&[&m], now);
        assert!(out.contains(&line("h2", "failed", 1)), "{out}");
        assert!(!out.contains("host=\"h1\""), "{out}");
    }

    #[test]
    fn escapes() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
