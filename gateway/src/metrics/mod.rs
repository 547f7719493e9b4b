//! `/metrics` rendered from the fleet state: no NATS round trip during a scrape, so one stuck
//! machine can never slow Prometheus down. Names follow node_exporter's systemd collector with a
//! `host` label, so dashboards carry over; the agents' own metrics are appended with a `host`
//! label ([`agents`]).
//!
//! The bulk of a scrape is the units' series, so [`Metrics`] keeps each machine's, rendered,
//! until the machine's units generation ([`Machine::units_generation`]) or its hostname moves:
//! the fleet state knows nothing of what is rendered from it.

mod agents;

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

use cbus_protocol::presence::AgentState;

use crate::model::{unit_type, Machine, UNIT_STATES as STATES};

/// Families the gateway writes itself; agents may not reuse them.
const OWN_FAMILIES: [&str; 9] = [
    "cbus_build_info",
    "cbus_systemd_units",
    "cbus_systemd_unit_info",
    "cbus_agent_up",
    "cbus_agent_maintenance",
    "cbus_agent_last_seen_timestamp_seconds",
    "cbus_systemd_unit_state",
    "cbus_systemd_unit_restarts_total",
    "cbus_systemd_unit_start_time_seconds",
];

/// One machine's samples of the unit families.
#[derive(Debug, Default)]
struct UnitSeries {
    /// What they were rendered from: the machine's units generation and hostname.
    generation: u64,
    host: String,
    state: String,
    restarts: String,
    start_time: String,
    /// `cbus_systemd_units`: units per active state.
    units: String,
    /// `cbus_systemd_unit_info`: load, active and sub state as labels.
    info: String,
}

impl UnitSeries {
    fn is_of(&self, m: &Machine) -> bool {
        self.generation == m.units_generation() && self.host == m.info.hostname
    }
}

/// Renders `/metrics`, keeping each machine's unit series until its units change.
#[derive(Default)]
pub struct Metrics {
    /// nkey -> the machine's series last rendered.
    memo: Mutex<HashMap<String, Arc<UnitSeries>>>,
}

impl Metrics {
    fn memo(&self) -> MutexGuard<'_, HashMap<String, Arc<UnitSeries>>> {
        // Entries are replaced whole, so a poisoned lock is still usable.
        self.memo.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The machine's unit series, rendered now if its units changed since they were last.
    fn unit_series(&self, m: &Machine) -> Arc<UnitSeries> {
        if let Some(s) = self.memo().get(&m.info.nkey).filter(|s| s.is_of(m)) {
            return Arc::clone(s);
        }
        let s = Arc::new(render_unit_series(m));
        self.memo().insert(m.info.nkey.clone(), Arc::clone(&s));
        s
    }

    /// Renders the machine's unit series if its units changed since the last scrape, so that a
    /// following [`Metrics::render`] finds them ready. Called for one machine at a time, it
    /// keeps the bulk of a scrape's work out of the one long hold of the store that `render`
    /// needs.
    pub(crate) fn prepare(&self, m: &Machine) {
        self.unit_series(m);
    }

    /// Prometheus text exposition (format 0.0.4) of the fleet: `machines` are all of it (the
    /// series of machines not among them are forgotten).
    pub fn render<M: Borrow<Machine>>(&self, machines: &[M], now_ms: u64) -> String {
        let machines: Vec<&Machine> = machines.iter().map(Borrow::borrow).collect();
        let machines = machines.as_slice();
        let mut out = String::new();
        family(
            &mut out,
            "cbus_build_info",
            "gauge",
            "Always 1; the gateway's version as a label.",
        );
        let _ = writeln!(
            out,
            "cbus_build_info{{version=\"{}\"}} 1",
            esc(env!("CARGO_PKG_VERSION"))
        );
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
            "cbus_agent_maintenance",
            "gauge",
            "1 while an operator's maintenance mark is in force (cbus maintenance on): the machine is expected away.",
        );
        for m in machines {
            let marked = u8::from(m.maintenance(now_ms).is_some());
            let _ = writeln!(
                out,
                "cbus_agent_maintenance{{host=\"{}\",nkey=\"{}\"}} {marked}",
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
        let series: Vec<Arc<UnitSeries>> = machines.iter().map(|m| self.unit_series(m)).collect();
        if self.memo().len() > machines.len() {
            let known: std::collections::HashSet<&str> =
                machines.iter().map(|m| m.info.nkey.as_str()).collect();
            self.memo().retain(|nkey, _| known.contains(nkey.as_str()));
        }
        // Room for everything still to come, not only the units: a String that outgrows a
        // ~16 MB buffer at the last families (the gateway's counters, the agents' metrics) is
        // reallocated and copied into fresh pages, which made a 100 x 200 scrape 27 ms instead
        // of 13 (cbus-bench compare, 2026-12-02). Agents' metrics are a few KiB each.
        out.reserve(
            series
                .iter()
                .map(|s| {
                    s.state.len()
                        + s.restarts.len()
                        + s.start_time.len()
                        + s.units.len()
                        + s.info.len()
                })
                .sum::<usize>()
                + 64 * 1024
                + machines.len() * 8 * 1024,
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
        family(
            &mut out,
            "cbus_systemd_units",
            "gauge",
            "Units per active state (node_exporter's node_systemd_units), over the filtered units.",
        );
        for s in &series {
            out.push_str(&s.units);
        }
        family(
            &mut out,
            "cbus_systemd_unit_info",
            "gauge",
            "Always 1; the unit's load, active and sub state as labels (systemd_exporter's systemd_unit_info).",
        );
        for s in &series {
            out.push_str(&s.info);
        }
        crate::stats::render(&mut out);
        agents::append_agent_metrics(&mut out, machines);
        out
    }
}

fn render_unit_series(m: &Machine) -> UnitSeries {
    let host = esc(&m.info.hostname);
    let mut s = UnitSeries {
        generation: m.units_generation(),
        host: m.info.hostname.clone(),
        state: String::with_capacity(m.units().len() * STATES.len() * 100),
        ..Default::default()
    };
    let mut by_state: BTreeMap<&str, u64> = STATES.iter().map(|st| (*st, 0)).collect();
    for u in m.units().values() {
        *by_state.entry(u.active.as_str()).or_default() += 1;
    }
    for (state, n) in by_state {
        let _ = writeln!(
            s.units,
            "cbus_systemd_units{{host=\"{host}\",state=\"{}\"}} {n}",
            esc(state)
        );
    }
    for (name, u) in m.units() {
        let (name, kind) = (esc(name), esc(unit_type(name)));
        let _ = writeln!(
            s.info,
            "cbus_systemd_unit_info{{host=\"{host}\",name=\"{name}\",type=\"{kind}\",load_state=\"{}\",active_state=\"{}\",sub_state=\"{}\"}} 1",
            esc(&u.load),
            esc(&u.active),
            esc(&u.sub)
        );
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
fn esc(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(v);
    }
    std::borrow::Cow::Owned(
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n"),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::Unit;
    use cbus_protocol::presence::{AgentInfo, PresenceKind};
    use std::collections::BTreeMap;

    pub(crate) fn machine(host: &str, metrics: &str) -> Machine {
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
        let out = Metrics::default().render(&[m], cbus_protocol::presence::now_ms());
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
        assert!(out.contains("cbus_systemd_units{host=\"h1\",state=\"failed\"} 1"));
        assert!(out.contains("cbus_systemd_units{host=\"h1\",state=\"active\"} 1"));
        assert!(out.contains("cbus_systemd_units{host=\"h1\",state=\"inactive\"} 0"));
        assert!(out.contains("cbus_systemd_unit_info{host=\"h1\",name=\"x.service\",type=\"service\",load_state=\"\",active_state=\"failed\",sub_state=\"\"} 1"));
        assert!(out.contains(&format!(
            "cbus_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn cached_unit_series_follow_changes() {
        let metrics = Metrics::default();
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
        assert!(metrics
            .render(&[&m], now)
            .contains(&line("h1", "active", 1)));
        // A second scrape reuses what the first rendered.
        let first = metrics.unit_series(&m);
        assert!(Arc::ptr_eq(&first, &metrics.unit_series(&m)));
        if let Some(u) = m.units_mut().get_mut("x.service") {
            u.active = "failed".into();
        }
        let out = metrics.render(&[&m], now);
        assert!(out.contains(&line("h1", "failed", 1)), "{out}");
        assert!(out.contains(&line("h1", "active", 0)), "{out}");
        m.info.hostname = "h2".into();
        let out = metrics.render(&[&m], now);
        assert!(out.contains(&line("h2", "failed", 1)), "{out}");
        assert!(!out.contains("host=\"h1\""), "{out}");
    }

    #[test]
    fn a_renamed_machine_drops_its_metrics_series() {
        let metrics = Metrics::default();
        let mut m = machine("h1", "");
        metrics.prepare(&m);
        let first = metrics.unit_series(&m);
        assert!(Arc::ptr_eq(&first, &metrics.unit_series(&m)), "kept");
        m.info.hostname = "other".into();
        assert!(
            !Arc::ptr_eq(&first, &metrics.unit_series(&m)),
            "a new hostname drops them"
        );
    }

    #[test]
    fn series_of_machines_that_left_are_forgotten() {
        let metrics = Metrics::default();
        let (a, b) = (machine("a", ""), machine("b", ""));
        metrics.render(&[&a, &b], 0);
        assert_eq!(metrics.memo().len(), 2);
        metrics.render(&[&a], 0);
        assert_eq!(metrics.memo().len(), 1);
    }

    #[test]
    fn escapes() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
