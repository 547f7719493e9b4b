//! `/metrics` rendered from the fleet state: no NATS round trip during a scrape, so one stuck
//! machine can never slow Prometheus down. Names follow node_exporter's systemd collector with a
//! `host` label, so dashboards carry over; the agents' own metrics are appended with a `host`
//! label ([`agents`]).
//!
//! The bulk of a scrape is the units' series, so [`Metrics`] keeps each machine's, rendered,
//! until the machine's units generation ([`Machine::units_generation`]) or its hostname moves:
//! the fleet state knows nothing of what is rendered from it.

mod agents;
mod select;
mod system;
mod units;

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

use cbus_protocol::presence::AgentState;

use crate::model::Machine;
pub use select::Selection;
use units::UnitSeries;

/// How a per-machine agent family's value is read from a machine at a time (unix ms).
type AgentValue = fn(&Machine, u64) -> String;

/// Families the gateway writes itself besides `cbus_systemd_*` and `cbus_gateway_*`; agents
/// may not reuse any of them.
const OWN_FAMILIES: [&str; 5] = [
    "cbus_agent_up",
    "cbus_agent_maintenance",
    "cbus_agent_last_seen_timestamp_seconds",
    "cbus_build_info",
    "cbus_machine_cache_age_seconds",
];

/// Which unit families a selection wants, by [`units::FAMILIES`] index.
type Wanted = [bool; units::FAMILIES.len()];

fn wanted(sel: &Selection) -> Wanted {
    std::array::from_fn(|i| sel.wants(units::FAMILIES[i].0))
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

    /// The machine's unit series with the `wanted` families, rendered now if its units changed
    /// since they were last or if no scrape wanted them before.
    fn unit_series(&self, m: &Machine, wanted: &Wanted) -> Arc<UnitSeries> {
        let old = self
            .memo()
            .get(&m.info.nkey)
            .filter(|s| s.is_of(m))
            .cloned();
        if let Some(s) = old.as_ref().filter(|s| s.has(wanted)) {
            return Arc::clone(s);
        }
        let s = Arc::new(old.unwrap_or_default().with(m, wanted));
        self.memo().insert(m.info.nkey.clone(), Arc::clone(&s));
        s
    }

    /// Renders the machine's unit series that `sel` wants if its units changed since the last
    /// scrape, so that a following [`Metrics::render_selected`] finds them ready. Called for one
    /// machine at a time, it keeps the bulk of a scrape's work out of the one long hold of the
    /// store that `render` needs.
    pub(crate) fn prepare(&self, m: &Machine, sel: &Selection) {
        let wanted = wanted(sel);
        if sel.has_machine(&m.info.nkey) && wanted.contains(&true) {
            self.unit_series(m, &wanted);
        }
    }

    /// Prometheus text exposition (format 0.0.4) of the fleet: `machines` are all of it (the
    /// series of machines not among them are forgotten).
    pub fn render<M: Borrow<Machine>>(&self, machines: &[M], now_ms: u64) -> String {
        self.render_selected(machines, now_ms, &Selection::all())
    }

    /// [`Metrics::render`] of the families and the shard of machines `sel` asks for.
    pub fn render_selected<M: Borrow<Machine>>(
        &self,
        machines: &[M],
        now_ms: u64,
        sel: &Selection,
    ) -> String {
        if self.memo().len() > machines.len() {
            let known: std::collections::HashSet<&str> = machines
                .iter()
                .map(|m| m.borrow().info.nkey.as_str())
                .collect();
            self.memo().retain(|nkey, _| known.contains(nkey.as_str()));
        }
        let machines: Vec<&Machine> = machines
            .iter()
            .map(Borrow::borrow)
            .filter(|m| sel.has_machine(&m.info.nkey))
            .collect();
        let machines = machines.as_slice();
        let mut out = String::new();
        if sel.has_gateway() && sel.wants("cbus_build_info") {
            family(
                &mut out,
                "cbus_build_info",
                "gauge",
                "Always 1: the gateway's version.",
            );
            let _ = writeln!(
                out,
                "cbus_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            );
        }
        let agent_families: [(&str, &str, AgentValue); 3] = [
            (
                "cbus_agent_up",
                "1 when the agent heartbeats (running), 0 when unresponsive or stopped.",
                |m, now| u8::from(m.state(now) == AgentState::Running).to_string(),
            ),
            (
                "cbus_agent_maintenance",
                "1 while an operator's maintenance mark is in force (cbus maintenance on): the machine is expected away.",
                |m, now| u8::from(m.maintenance(now).is_some()).to_string(),
            ),
            (
                "cbus_agent_last_seen_timestamp_seconds",
                "When the agent was last heard from.",
                |m, _| format!("{:.3}", m.last_seen_ms as f64 / 1000.0),
            ),
        ];
        for (name, help, value) in agent_families {
            if !sel.wants(name) {
                continue;
            }
            family(&mut out, name, "gauge", help);
            for m in machines {
                let _ = writeln!(
                    out,
                    "{name}{{host=\"{}\",nkey=\"{}\"}} {}",
                    esc(&m.info.hostname),
                    esc(&m.info.nkey),
                    value(m, now_ms)
                );
            }
        }
        system::render(&mut out, machines, now_ms, sel);
        let wanted = wanted(sel);
        let series: Vec<Arc<UnitSeries>> = if wanted.contains(&true) {
            machines
                .iter()
                .map(|m| self.unit_series(m, &wanted))
                .collect()
        } else {
            Vec::new()
        };
        // Room for everything still to come, not only the units: a String that outgrows a
        // ~16 MB buffer at the last families (the gateway's counters, the agents' metrics) is
        // reallocated and copied into fresh pages, which made a 100 x 200 scrape 27 ms instead
        // of 13 (cbus-bench compare, 2026-12-02). Agents' metrics are a few KiB each.
        let agents_room = if sel.wants(select::AGENT_METRICS) {
            machines.len() * 8 * 1024
        } else {
            0
        };
        out.reserve(series.iter().map(|s| s.len(&wanted)).sum::<usize>() + 64 * 1024 + agents_room);
        for (i, (name, kind, help)) in units::FAMILIES.iter().enumerate() {
            if !wanted[i] {
                continue;
            }
            family(&mut out, name, kind, help);
            for s in &series {
                out.push_str(s.samples[i].as_deref().unwrap_or(""));
            }
        }
        if sel.has_gateway() && sel.wants(select::GATEWAY) {
            crate::stats::render(&mut out);
        }
        if sel.wants(select::AGENT_METRICS) {
            agents::append_agent_metrics(&mut out, machines);
        }
        out
    }
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
    use crate::model::{SystemInfo, Unit, UnitDetail};
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
                rtt_ms: None,
            },
            PresenceKind::Heartbeat,
            cbus_protocol::presence::now_ms(),
        );
        m.agent_metrics = metrics.into();
        m
    }

    /// A masked unit: not loaded, so left out of the per-unit series.
    fn masked() -> Unit {
        Unit {
            load: "masked".into(),
            active: "inactive".into(),
            ..Default::default()
        }
    }

    fn loaded(active: &str, kind: &str) -> Unit {
        Unit {
            load: "loaded".into(),
            active: active.into(),
            sub: "running".into(),
            detail: UnitDetail {
                kind: kind.into(),
                unit_file_state: "enabled".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn exposition_of_units() {
        let mut m = machine("h1", "");
        m.system = SystemInfo {
            state: "degraded".into(),
            version: "252.39-1~deb12u2".into(),
        };
        m.synced_ms = Some(1_000);
        let units = m.units_mut();
        units.insert(
            "x.service".into(),
            Unit {
                restarts: Some(2),
                ..loaded("failed", "oneshot")
            },
        );
        let mut y = Unit {
            active_enter_us: Some(1_500_000),
            ..loaded("active", "simple")
        };
        y.detail.tasks_current = Some(3);
        y.detail.tasks_max = Some(100);
        units.insert("y.service".into(), y);
        let mut sock = loaded("active", "");
        (
            sock.detail.accepted,
            sock.detail.connections,
            sock.detail.refused,
        ) = (Some(5), Some(1), Some(0));
        units.insert("z.socket".into(), sock);
        let mut timer = loaded("active", "");
        timer.detail.last_trigger_us = Some(2_000_000);
        units.insert("t.timer".into(), timer);
        units.insert("m.service".into(), masked());
        let out = Metrics::default().render(&[m], 11_000);
        for line in [
            "cbus_systemd_unit_state{host=\"h1\",name=\"x.service\",type=\"oneshot\",state=\"failed\"} 1",
            "cbus_systemd_unit_state{host=\"h1\",name=\"x.service\",type=\"oneshot\",state=\"active\"} 0",
            "cbus_systemd_unit_state{host=\"h1\",name=\"z.socket\",type=\"\",state=\"active\"} 1",
            "cbus_systemd_unit_restarts_total{host=\"h1\",name=\"x.service\"} 2",
            "cbus_systemd_unit_start_time_seconds{host=\"h1\",name=\"y.service\"} 1.500000",
            "cbus_systemd_unit_start_time_seconds{host=\"h1\",name=\"x.service\"} 0",
            "cbus_systemd_unit_tasks_current{host=\"h1\",name=\"y.service\"} 3",
            "cbus_systemd_unit_tasks_max{host=\"h1\",name=\"y.service\"} 100",
            "cbus_systemd_socket_accepted_connections_total{host=\"h1\",name=\"z.socket\"} 5",
            "cbus_systemd_socket_current_connections{host=\"h1\",name=\"z.socket\"} 1",
            "cbus_systemd_socket_refused_connections_total{host=\"h1\",name=\"z.socket\"} 0",
            "cbus_systemd_timer_last_trigger_seconds{host=\"h1\",name=\"t.timer\"} 2.000000",
            "cbus_systemd_units{host=\"h1\",state=\"active\"} 3",
            "cbus_systemd_units{host=\"h1\",state=\"failed\"} 1",
            "cbus_systemd_units{host=\"h1\",state=\"inactive\"} 0",
            "cbus_systemd_unit_info{host=\"h1\",name=\"y.service\",type=\"service\",service_type=\"simple\",mount_type=\"\",load_state=\"loaded\",active_state=\"active\",sub_state=\"running\",unit_file_state=\"enabled\"} 1",
            "cbus_systemd_unit_info{host=\"h1\",name=\"m.service\",type=\"service\",service_type=\"\",mount_type=\"\",load_state=\"masked\",active_state=\"inactive\",sub_state=\"\",unit_file_state=\"\"} 1",
            "cbus_systemd_system_running{host=\"h1\"} 0",
            "cbus_systemd_system_state{host=\"h1\",state=\"degraded\"} 1",
            "cbus_systemd_system_state{host=\"h1\",state=\"running\"} 0",
            "cbus_systemd_version{host=\"h1\",version=\"252.39-1~deb12u2\"} 252.39",
            "cbus_machine_cache_age_seconds{host=\"h1\"} 10.000",
            "cbus_agent_up{host=\"h1\",nkey=\"Uh1\"} 1",
        ] {
            assert!(out.contains(line), "{line} missing:\n{out}");
        }
        assert!(out.contains(&format!(
            "cbus_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        // node_exporter exports loaded units only; unit_info names the others.
        assert!(!out.contains("cbus_systemd_unit_state{host=\"h1\",name=\"m.service\""));
        for absent in [
            "tasks_current{host=\"h1\",name=\"x.service\"",
            "accepted_connections_total{host=\"h1\",name=\"y",
        ] {
            assert!(!out.contains(absent), "{absent}");
        }
    }

    #[test]
    fn machines_without_system_state_or_sync_leave_them_out() {
        let out = Metrics::default().render(&[machine("h1", "")], 0);
        assert!(!out.contains("cbus_systemd_system_running{"), "{out}");
        assert!(!out.contains("cbus_machine_cache_age_seconds{"), "{out}");
        assert!(!out.contains("cbus_systemd_version{"), "{out}");
    }

    #[test]
    fn cached_unit_series_follow_changes() {
        let metrics = Metrics::default();
        let mut m = machine("h1", "");
        m.units_mut()
            .insert("x.service".into(), loaded("active", "simple"));
        let line = |host: &str, state: &str, v: u8| {
            format!("cbus_systemd_unit_state{{host=\"{host}\",name=\"x.service\",type=\"simple\",state=\"{state}\"}} {v}")
        };
        let now = cbus_protocol::presence::now_ms();
        assert!(metrics
            .render(&[&m], now)
            .contains(&line("h1", "active", 1)));
        // A second scrape reuses what the first rendered.
        let all = wanted(&Selection::all());
        let first = metrics.unit_series(&m, &all);
        assert!(Arc::ptr_eq(&first, &metrics.unit_series(&m, &all)));
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
        let all = wanted(&Selection::all());
        metrics.prepare(&m, &Selection::all());
        let first = metrics.unit_series(&m, &all);
        assert!(Arc::ptr_eq(&first, &metrics.unit_series(&m, &all)), "kept");
        m.info.hostname = "other".into();
        assert!(
            !Arc::ptr_eq(&first, &metrics.unit_series(&m, &all)),
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

    fn fleet() -> Vec<Machine> {
        (0..40)
            .map(|i| {
                let mut m = machine(&format!("h{i}"), "# TYPE req_total counter\nreq_total 1\n");
                m.system.state = "running".into();
                let units = m.units_mut();
                units.insert("a.service".into(), loaded("failed", "simple"));
                units.insert("b.timer".into(), loaded("active", ""));
                units.insert("m.service".into(), masked());
                m
            })
            .collect()
    }

    /// The sample lines, sorted, without the gateway's own counters (other tests running in
    /// this process move them).
    fn sample_lines(text: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("cbus_gateway_"))
            .collect();
        lines.sort_unstable();
        lines
    }

    #[test]
    fn collect_renders_only_the_named_families() {
        let fleet = fleet();
        let metrics = Metrics::default();
        let all = metrics.render(&fleet, 0);
        assert!(!all.contains("cbus_systemd_unit_active_state"), "opt-in");
        let sel = Selection::parse(Some(
            "collect[]=cbus_systemd_unit_active_state&collect[]=cbus_agent_up",
        ))
        .unwrap();
        let out = metrics.render_selected(&fleet[..1], 0, &sel);
        assert_eq!(
            out,
            "# HELP cbus_agent_up 1 when the agent heartbeats (running), 0 when unresponsive or stopped.\n\
             # TYPE cbus_agent_up gauge\n\
             cbus_agent_up{host=\"h0\",nkey=\"Uh0\"} 1\n\
             # HELP cbus_systemd_unit_active_state Always 1: a loaded unit's ActiveState as the state label, one series per unit (the one-hot's 1s).\n\
             # TYPE cbus_systemd_unit_active_state gauge\n\
             cbus_systemd_unit_active_state{host=\"h0\",name=\"a.service\",state=\"failed\"} 1\n\
             cbus_systemd_unit_active_state{host=\"h0\",name=\"b.timer\",state=\"active\"} 1\n"
        );
        // The compact family is the one-hot's 1s, unit for unit.
        let ones: Vec<String> = all
            .lines()
            .filter(|l| l.starts_with("cbus_systemd_unit_state{host=\"h0\"") && l.ends_with(" 1"))
            .map(|l| l.replace("cbus_systemd_unit_state", "cbus_systemd_unit_active_state"))
            .map(|l| l.replace(",type=\"simple\"", "").replace(",type=\"\"", ""))
            .collect();
        let compact: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("cbus_systemd_unit_active_state{"))
            .collect();
        assert_eq!(ones, compact);
        // Every default family alone, together, is the default scrape.
        let mut names: Vec<&str> = all
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|f| match f.split(' ').next().unwrap() {
                f if f.starts_with("cbus_gateway_") => select::GATEWAY,
                "req_total" => select::AGENT_METRICS,
                f => f,
            })
            .collect();
        names.dedup();
        assert!(
            names.contains(&select::GATEWAY) && names.len() > 15,
            "{names:?}"
        );
        let mut each = String::new();
        for name in names {
            let sel = Selection::parse(Some(&format!("collect[]={name}"))).unwrap();
            each.push_str(&metrics.render_selected(&fleet, 0, &sel));
        }
        assert_eq!(sample_lines(&each), sample_lines(&all));
        // exclude[] is the default less those.
        let sel = Selection::parse(Some(
            "exclude[]=cbus_systemd_unit_state&exclude[]=agent_metrics",
        ))
        .unwrap();
        let out = metrics.render_selected(&fleet, 0, &sel);
        let expected: Vec<&str> = sample_lines(&all)
            .into_iter()
            .filter(|l| !l.starts_with("cbus_systemd_unit_state{") && !l.starts_with("req_total{"))
            .collect();
        assert_eq!(sample_lines(&out), expected);
    }

    #[test]
    fn shards_together_are_the_whole_scrape() {
        let fleet = fleet();
        let metrics = Metrics::default();
        let all = metrics.render(&fleet, 0);
        let mut union = Vec::new();
        let mut hosts_per_shard = Vec::new();
        for i in 0..3 {
            let sel = Selection::parse(Some(&format!("shards=3&shard={i}"))).unwrap();
            let out = metrics.render_selected(&fleet, 0, &sel);
            hosts_per_shard.push(out.matches("cbus_agent_up{").count());
            union.extend(sample_lines(&out).into_iter().map(str::to_owned));
            // The memo keeps every machine's series whichever shard was scraped last.
            assert_eq!(metrics.memo().len(), fleet.len());
        }
        union.sort_unstable();
        assert_eq!(union, sample_lines(&all), "each series once, in one shard");
        assert!(
            hosts_per_shard.iter().all(|n| *n > 0),
            "{hosts_per_shard:?}"
        );
    }

    #[test]
    fn escapes() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
