//! One machine's unit series, rendered once per change of its units (`Metrics` keeps them).
//!
//! Which units and values follow node_exporter's systemd collector: the per-unit series are of
//! loaded units only (node_exporter filters `LoadState == "loaded"`), `type` of
//! `cbus_systemd_unit_state` is a service's or mount's `Type` (empty for other units), a unit
//! not active starts at 0, and counts systemd has no value for are left out. `unit_info` is
//! systemd_exporter's, for every followed unit, with its load, active, sub and unit-file state.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::esc;
use crate::model::{unit_type, Machine, Unit, UNIT_STATES};

/// The unit families: (name, type, help), in the order they are rendered.
pub(super) const FAMILIES: [(&str, &str, &str); 11] = [
    (
        "cbus_systemd_unit_state",
        "gauge",
        "systemd unit state, one-hot over the states; type is a service's or mount's Type.",
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
const INFO: usize = 1;
const SUMMARY: usize = 2;
const RESTARTS: usize = 3;
const START: usize = 4;
const TASKS: usize = 5;
const TASKS_MAX: usize = 6;
const ACCEPTED: usize = 7;
const CONNECTIONS: usize = 8;
const REFUSED: usize = 9;
const TRIGGER: usize = 10;

/// One machine's samples of the unit families.
#[derive(Debug, Default)]
pub(super) struct UnitSeries {
    /// What they were rendered from: the machine's units generation and hostname.
    pub generation: u64,
    pub host: String,
    /// Samples by family, as [`FAMILIES`].
    pub samples: [String; FAMILIES.len()],
}

impl UnitSeries {
    pub fn is_of(&self, m: &Machine) -> bool {
        self.generation == m.units_generation() && self.host == m.info.hostname
    }

    pub fn len(&self) -> usize {
        self.samples.iter().map(String::len).sum()
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

pub(super) fn render(m: &Machine) -> UnitSeries {
    let host = esc(&m.info.hostname);
    let mut s = UnitSeries {
        generation: m.units_generation(),
        host: m.info.hostname.clone(),
        ..Default::default()
    };
    s.samples[STATE].reserve(m.units().len() * UNIT_STATES.len() * 100);
    s.samples[INFO].reserve(m.units().len() * 220);
    let mut by_state: BTreeMap<&str, u64> = UNIT_STATES.iter().map(|st| (*st, 0)).collect();
    for (name, u) in m.units() {
        let n = esc(name);
        info(&mut s.samples[INFO], &host, &n, name, u);
        if u.load != "loaded" {
            continue;
        }
        *by_state.entry(u.active.as_str()).or_default() += 1;
        let out = &mut s.samples;
        // Each unit's label prefix is built once, then plain pushes.
        let prefix = format!(
            "cbus_systemd_unit_state{{host=\"{host}\",name=\"{n}\",type=\"{}\",state=\"",
            esc(&u.detail.kind)
        );
        for state in UNIT_STATES {
            out[STATE].push_str(&prefix);
            out[STATE].push_str(state);
            out[STATE].push_str(if u.active == state {
                "\"} 1\n"
            } else {
                "\"} 0\n"
            });
        }
        match u.active_enter_us {
            Some(us) if u.active == "active" => sample(
                &mut out[START],
                START,
                &host,
                &n,
                format_args!("{:.6}", us as f64 / 1e6),
            ),
            _ if u.active != "active" => sample(&mut out[START], START, &host, &n, "0"),
            _ => {} // active since a time not read yet
        }
        let d = &u.detail;
        match unit_type(name) {
            "service" => {
                let counts = [
                    (RESTARTS, u.restarts.map(u64::from)),
                    (TASKS, d.tasks_current),
                    (TASKS_MAX, d.tasks_max),
                ];
                for (family, v) in counts {
                    if let Some(v) = v {
                        sample(&mut out[family], family, &host, &n, v);
                    }
                }
            }
            "socket" => {
                for (family, v) in [
                    (ACCEPTED, d.accepted),
                    (CONNECTIONS, d.connections),
                    (REFUSED, d.refused),
                ] {
                    if let Some(v) = v {
                        sample(&mut out[family], family, &host, &n, v);
                    }
                }
            }
            "timer" => {
                if let Some(us) = d.last_trigger_us {
                    let secs = format_args!("{:.6}", us as f64 / 1e6);
                    sample(&mut out[TRIGGER], TRIGGER, &host, &n, secs);
                }
            }
            _ => {}
        }
    }
    for (state, count) in by_state {
        let _ = writeln!(
            s.samples[SUMMARY],
            "cbus_systemd_units{{host=\"{host}\",state=\"{}\"}} {count}",
            esc(state)
        );
    }
    s
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
