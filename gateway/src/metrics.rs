//! `/metrics` rendered from the cache: no NATS round trip during a scrape, so one stuck machine
//! can never slow Prometheus down. Names follow node_exporter's systemd collector with a `host`
//! label, so dashboards carry over; the agents' own metrics are appended with a `host` label.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use cbus_protocol::presence::AgentState;

use crate::cache::Machine;

/// The states node_exporter exports one-hot.
const STATES: [&str; 6] = [
    "active",
    "activating",
    "deactivating",
    "inactive",
    "failed",
    "reloading",
];

/// Prometheus text exposition of the fleet.
pub fn render(machines: &[Machine], now_ms: u64) -> String {
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
    family(
        &mut out,
        "cbus_systemd_unit_state",
        "gauge",
        "systemd unit state, one-hot over the states.",
    );
    // The bulk of a scrape: each unit's label prefix is built once, then plain pushes.
    out.reserve(machines.iter().map(|m| m.units.len()).sum::<usize>() * STATES.len() * 100);
    for m in machines {
        let host = esc(&m.info.hostname);
        for (name, u) in &m.units {
            let prefix = format!(
                "cbus_systemd_unit_state{{host=\"{host}\",name=\"{}\",type=\"{}\",state=\"",
                esc(name),
                esc(unit_type(name))
            );
            for s in STATES {
                out.push_str(&prefix);
                out.push_str(s);
                out.push_str(if u.active == s { "\"} 1\n" } else { "\"} 0\n" });
            }
        }
    }
    family(
        &mut out,
        "cbus_systemd_unit_restarts_total",
        "counter",
        "Service restarts (NRestarts), where known.",
    );
    for m in machines {
        for (name, u) in &m.units {
            if let Some(r) = u.restarts {
                let _ = writeln!(
                    out,
                    "cbus_systemd_unit_restarts_total{{host=\"{}\",name=\"{}\"}} {r}",
                    esc(&m.info.hostname),
                    esc(name)
                );
            }
        }
    }
    family(
        &mut out,
        "cbus_systemd_unit_start_time_seconds",
        "gauge",
        "When the unit last became active, where known.",
    );
    for m in machines {
        for (name, u) in &m.units {
            if let Some(us) = u.active_enter_us.filter(|us| *us > 0) {
                let _ = writeln!(
                    out,
                    "cbus_systemd_unit_start_time_seconds{{host=\"{}\",name=\"{}\",type=\"{}\"}} {:.6}",
                    esc(&m.info.hostname),
                    esc(name),
                    esc(unit_type(name)),
                    us as f64 / 1e6
                );
            }
        }
    }
    append_agent_metrics(&mut out, machines);
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn unit_type(name: &str) -> &str {
    name.rsplit_once('.').map(|(_, t)| t).unwrap_or("")
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

/// Every agent's own metrics with a `host` label added; HELP and TYPE once per family, and the
/// samples of a family kept together as the format requires.
fn append_agent_metrics(out: &mut String, machines: &[Machine]) {
    // family name -> (help/type lines, samples)
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    let mut seen_meta: BTreeSet<String> = BTreeSet::new();
    for m in machines {
        let mut current: Option<usize> = None;
        for line in m.agent_metrics.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (Some(kind), Some(name)) = (parts.next(), parts.next()) else {
                    continue;
                };
                if kind != "HELP" && kind != "TYPE" {
                    continue;
                }
                if !valid_metric_name(name) {
                    current = None;
                    continue;
                }
                let idx = match families.iter().position(|f| f.0 == name) {
                    Some(i) => i,
                    None => {
                        families.push((name.to_owned(), Vec::new(), Vec::new()));
                        families.len() - 1
                    }
                };
                if seen_meta.insert(format!("{kind} {name}")) {
                    families[idx].1.push(line.to_owned());
                }
                current = Some(idx);
            } else if !line.trim().is_empty() && !line.starts_with('#') {
                let Some(idx) = current else { continue };
                if let Some(sample) = with_host(line, &m.info.hostname) {
                    families[idx].2.push(sample);
                }
            }
        }
    }
    for (_, meta, samples) in families {
        for l in meta {
            out.push_str(&l);
            out.push('\n');
        }
        for s in samples {
            out.push_str(&s);
            out.push('\n');
        }
    }
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{a="b"} 1` -> `name{host="h",a="b"} 1`; `name 1` -> `name{host="h"} 1`.
fn with_host(line: &str, host: &str) -> Option<String> {
    let label = format!("host=\"{}\"", esc(host));
    if let Some(brace) = line.find('{') {
        let (name, rest) = line.split_at(brace);
        if !valid_metric_name(name) || rest.contains("host=") {
            return None;
        }
        let rest = &rest[1..];
        if rest.starts_with('}') {
            Some(format!("{name}{{{label}{rest}"))
        } else {
            Some(format!("{name}{{{label},{rest}"))
        }
    } else {
        let (name, value) = line.split_once(' ')?;
        valid_metric_name(name).then(|| format!("{name}{{{label}}} {value}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_label_is_added() {
        assert_eq!(
            with_host("a_total 3", "h").unwrap(),
            "a_total{host=\"h\"} 3"
        );
        assert_eq!(
            with_host("a{op=\"get\"} 3", "h\"x").unwrap(),
            "a{host=\"h\\\"x\",op=\"get\"} 3"
        );
        assert_eq!(with_host("a{} 3", "h").unwrap(), "a{host=\"h\"} 3");
        assert!(with_host("1bad 3", "h").is_none());
    }

    #[test]
    fn escapes() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
