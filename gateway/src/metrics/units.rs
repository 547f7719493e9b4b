//! One machine's unit series, rendered once per change of its units (`Metrics` keeps them).
//!
//! Which units and values follow node_exporter's systemd collector: the per-unit series are of
//! loaded units only (node_exporter filters `LoadState == "loaded"`), `type` of
//! `cbus_systemd_unit_state` is a service's or mount's `Type` (empty for other units), a unit
//! not active starts at 0, and counts systemd has no value for are left out. `unit_info` is
//! systemd_exporter's, for every followed unit, with its load, active, sub and unit-file state.
//! `unit_active_state` is the one-hot's 1s alone: one series per unit where the one-hot has six,
//! for fleets whose Prometheus cannot take six (docs/metrics.md, *At scale*).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use super::esc;
use crate::model::{unit_type, Machine, Unit, UNIT_STATES};

/// The unit families: (name, type, help), in the order they are rendered.
pub(super) const FAMILIES: [(&str, &str, &str); 12] = [
    (
        "cbus_systemd_unit_state",
        "gauge",
        "systemd unit state, one-hot over the states; type is a service's or mount's Type.",
    ),
    (
        "cbus_systemd_unit_active_state",
        "gauge",
        "Always 1: a loaded unit's ActiveState as the state label, one series per unit (the one-hot's 1s).",
    ),
    (
        "cbus_systemd_unit_info",
        "gauge",
        "Always 1: a followed unit's type, load, active, sub and unit-file state.",
    ),
    (
        "cbus_systemd_units",
        "gauge",
        "Loaded units by active state, after the unit filters.",
    ),
    (
        "cbus_systemd_unit_restarts_total",
        "counter",
        "Service restarts (NRestarts), where known.",
    ),
    (
        "cbus_systemd_unit_start_time_seconds",
        "gauge",
        "When an active unit became active (ActiveEnterTimestamp); 0 for units not active.",
    ),
    (
        "cbus_systemd_unit_tasks_current",
        "gauge",
        "A service's tasks (TasksCurrent), as of the last refresh.",
    ),
    (
        "cbus_systemd_unit_tasks_max",
        "gauge",
        "A service's task limit (TasksMax), where limited.",
    ),
    (
        "cbus_systemd_socket_accepted_connections_total",
        "counter",
        "Connections a socket accepted (NAccepted), as of the last refresh.",
    ),
    (
        "cbus_systemd_socket_current_connections",
        "gauge",
        "A socket's open connections (NConnections), as of the last refresh.",
    ),
    (
        "cbus_systemd_socket_refused_connections_total",
        "counter",
        "Connections a socket refused (NRefused), as of the last refresh.",
    ),
    (
        "cbus_systemd_timer_last_trigger_seconds",
        "gauge",
        "When a timer last triggered (LastTriggerUSec); 0 if never.",
    ),
];
const STATE: usize = 0;
const ACTIVE_STATE: usize = 1;
const INFO: usize = 2;
const SUMMARY: usize = 3;
const RESTARTS: usize = 4;
const START: usize = 5;
const TASKS: usize = 6;
const TASKS_MAX: usize = 7;
const ACCEPTED: usize = 8;
const CONNECTIONS: usize = 9;
const REFUSED: usize = 10;
const TRIGGER: usize = 11;

/// One machine's samples of the unit families, each rendered the first time a scrape asks for
/// it: a fleet scraped only for its compact families never holds the one-hot text.
#[derive(Debug, Default)]
pub(super) struct UnitSeries {
    /// What they were rendered from: the machine's units generation and hostname.
    pub generation: u64,
    pub host: String,
    /// Samples by family, as [`FAMILIES`]; `None` until a scrape wanted the family.
    pub samples: [Option<Arc<str>>; FAMILIES.len()],
}

impl UnitSeries {
    pub fn is_of(&self, m: &Machine) -> bool {
        self.generation == m.units_generation() && self.host == m.info.hostname
    }

    /// Whether every family `wanted` says is rendered.
    pub fn has(&self, wanted: &[bool; FAMILIES.len()]) -> bool {
        self.samples
            .iter()
            .zip(wanted)
            .all(|(s, w)| s.is_some() || !w)
    }

    /// The same series with the `wanted` families rendered too (those already rendered are
    /// shared, not copied); `self` must be of `m` or empty.
    pub fn with(&self, m: &Machine, wanted: &[bool; FAMILIES.len()]) -> UnitSeries {
        let mut s = UnitSeries {
            generation: m.units_generation(),
            host: m.info.hostname.clone(),
            samples: self.samples.clone(),
        };
        for (family, slot) in s.samples.iter_mut().enumerate() {
            if wanted[family] && slot.is_none() {
                *slot = Some(render(m, family).into());
            }
        }
        s
    }

    pub fn len(&self, wanted: &[bool; FAMILIES.len()]) -> usize {
        self.samples
            .iter()
            .zip(wanted)
            .filter(|(_, w)| **w)
            .map(|(s, _)| s.as_deref().map_or(0, str::len))
            .sum()
    }
}

/// `family{host="h",name="n"} value`.
fn sample(out: &mut String, family: usize, host: &str, name: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "{}{{host=\"{host}\",name=\"{name}\"}} {value}",
        FAMILIES[family].0
    );
}

/// One family's samples of the machine's units.
fn render(m: &Machine, family: usize) -> String {
    let host = esc(&m.info.hostname);
    let mut out = String::with_capacity(match family {
        STATE => m.units().len() * UNIT_STATES.len() * 100,
        INFO => m.units().len() * 220,
        _ => m.units().len() * 80,
    });
    let mut by_state: BTreeMap<&str, u64> = UNIT_STATES.iter().map(|st| (*st, 0)).collect();
    for (name, u) in m.units() {
        let n = esc(name);
        if family == INFO {
            info(&mut out, &host, &n, name, u);
            continue;
        }
        if u.load != "loaded" {
            continue;
        }
        match family {
            STATE => {
                // Each unit's label prefix is built once, then plain pushes.
                let prefix = format!(
                    "cbus_systemd_unit_state{{host=\"{host}\",name=\"{n}\",type=\"{}\",state=\"",
                    esc(&u.detail.kind)
                );
                for state in UNIT_STATES {
                    out.push_str(&prefix);
                    out.push_str(state);
                    out.push_str(if u.active == state {
                        "\"} 1\n"
                    } else {
                        "\"} 0\n"
                    });
                }
            }
            ACTIVE_STATE => {
                let _ = writeln!(
                    out,
                    "cbus_systemd_unit_active_state{{host=\"{host}\",name=\"{n}\",state=\"{}\"}} 1",
                    esc(&u.active)
                );
            }
            SUMMARY => *by_state.entry(u.active.as_str()).or_default() += 1,
            START => match u.active_enter_us {
                Some(us) if u.active == "active" => {
                    sample(&mut out, START, &host, &n, Value::Micros(us))
                }
                _ if u.active != "active" => sample(&mut out, START, &host, &n, "0"),
                _ => {} // active since a time not read yet
            },
            _ => {
                if let Some(v) = count(name, u, family) {
                    sample(&mut out, family, &host, &n, v);
                }
            }
        }
    }
    if family == SUMMARY {
        for (state, count) in by_state {
            let _ = writeln!(
                out,
                "cbus_systemd_units{{host=\"{host}\",state=\"{}\"}} {count}",
                esc(state)
            );
        }
    }
    out
}

/// A per-type family's value: a count, or microseconds shown as seconds.
enum Value {
    Count(u64),
    Micros(u64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Count(v) => write!(f, "{v}"),
            Value::Micros(us) => write!(f, "{:.6}", *us as f64 / 1e6),
        }
    }
}

/// The value of one of the per-type families for a unit, if it is of that type and systemd
/// has the value.
fn count(name: &str, u: &Unit, family: usize) -> Option<Value> {
    let d = &u.detail;
    let v = match (unit_type(name), family) {
        ("service", RESTARTS) => u.restarts.map(u64::from),
        ("service", TASKS) => d.tasks_current,
        ("service", TASKS_MAX) => d.tasks_max,
        ("socket", ACCEPTED) => d.accepted.map(u64::from),
        ("socket", CONNECTIONS) => d.connections.map(u64::from),
        ("socket", REFUSED) => d.refused.map(u64::from),
        ("timer", TRIGGER) => return d.last_trigger_us.map(Value::Micros),
        _ => None,
    };
    v.map(Value::Count)
}

/// systemd_exporter's `unit_info` with the states: `type` is the unit's kind (`service`), and
/// the service's or mount's own `Type` is `service_type` or `mount_type`.
fn info(out: &mut String, host: &str, n: &str, name: &str, u: &Unit) {
    let kind = unit_type(name);
    let own = esc(&u.detail.kind);
    let (service_type, mount_type) = match kind {
        "service" => (own.as_ref(), ""),
        "mount" => ("", own.as_ref()),
        _ => ("", ""),
    };
    let _ = writeln!(
        out,
        "cbus_systemd_unit_info{{host=\"{host}\",name=\"{n}\",type=\"{}\",service_type=\"{service_type}\",mount_type=\"{mount_type}\",load_state=\"{}\",active_state=\"{}\",sub_state=\"{}\",unit_file_state=\"{}\"}} 1",
        esc(kind),
        esc(&u.load),
        esc(&u.active),
        esc(&u.sub),
        esc(&u.detail.unit_file_state),
    );
}
