//! Fleet aggregates for the dashboard's overview and unit views: machines counted by state,
//! units counted by active state, the failed units with the machines they failed on, and one
//! row per unit name with its counts, filtered and paged. A browser following a thousand
//! machines gets these few kilobytes instead of 200,000 unit rows.
//!
//! Computed from the store on demand (one machine under the read lock at a time); the
//! WebSocket `fleet` subscription sends a fresh one at most every throttle interval, and only
//! when the store changed.

use std::collections::{BTreeMap, HashMap};

use regex::Regex;
use serde::Serialize;

use crate::model::Machine;

/// Units listed in `failed` at most.
pub(crate) const MAX_FAILED_UNITS: usize = 100;
/// Machines listed per failed unit at most (`count` says how many there are).
pub(crate) const MAX_FAILED_MACHINES: usize = 50;
/// Rows per page at most.
pub(crate) const MAX_PAGE: usize = 500;

/// What a `fleet` subscription asks for.
#[derive(Debug, Clone, Default)]
pub(crate) struct Query {
    /// Unit names to count (glob compiled); all when absent.
    pub unit: Option<Regex>,
    /// Only machines with this label `key=value`.
    pub label: Option<(String, String)>,
    pub offset: usize,
    pub limit: usize,
    /// Failed units listed, at most (capped by [`MAX_FAILED_UNITS`]).
    pub failed_limit: usize,
    /// Machines listed per failed unit, at most (capped by [`MAX_FAILED_MACHINES`]).
    pub failed_machines: usize,
}

/// One machine a unit failed on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct FailedOn {
    pub machine: String,
    pub host: String,
    pub since_us: Option<u64>,
}

/// A unit that failed somewhere.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Failed {
    pub unit: String,
    /// Machines it failed on, all of them (not only those listed).
    pub count: usize,
    /// The earliest `since_us` among them.
    pub since_us: Option<u64>,
    /// The machines it failed on, earliest first, at most [`MAX_FAILED_MACHINES`].
    pub machines: Vec<FailedOn>,
}

/// One unit across the fleet.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct UnitCounts {
    pub unit: String,
    pub machines: usize,
    /// active state -> machines
    pub states: BTreeMap<String, usize>,
}

/// The aggregate a `fleet` snapshot carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Summary {
    /// Machines counted (after the label filter).
    pub machines_total: usize,
    /// Machine state (running, unresponsive, stopped, gone, maintenance) -> machines.
    pub machines: BTreeMap<String, usize>,
    /// System state: `running` (no failed unit) or `degraded` -> machines whose units are
    /// loaded.
    pub system: BTreeMap<String, usize>,
    /// Active state -> units, over all machines counted.
    pub units: BTreeMap<String, usize>,
    /// Failed units, most machines first, at most [`MAX_FAILED_UNITS`].
    pub failed: Vec<Failed>,
    /// How many failed units there are in all.
    pub failed_total: usize,
    /// Unit names matching the query, in all.
    pub rows_total: usize,
    pub offset: usize,
    /// One page of unit names, sorted by name.
    pub rows: Vec<UnitCounts>,
}

/// Adds machines one at a time (so the store's lock is held for one machine at a time).
#[derive(Default)]
pub(crate) struct Builder {
    summary: Summary,
    per_unit: BTreeMap<String, BTreeMap<String, usize>>,
    failed: HashMap<String, Vec<FailedOn>>,
}

impl Builder {
    pub(crate) fn add(&mut self, m: &Machine, q: &Query, now_ms: u64) {
        if let Some((k, v)) = &q.label {
            if m.info.labels.get(k) != Some(v) {
                return;
            }
        }
        let s = &mut self.summary;
        s.machines_total += 1;
        // A machine under maintenance counts there, whatever its presence says: it is expected
        // away, and the operator looks for the others.
        let state = if m.maintenance(now_ms).is_some() {
            "maintenance".to_owned()
        } else {
            m.state(now_ms).as_str().to_owned()
        };
        *s.machines.entry(state).or_default() += 1;
        let mut degraded = false;
        for (name, u) in m.units() {
            if q.unit.as_ref().is_some_and(|re| !re.is_match(name)) {
                continue;
            }
            bump(&mut s.units, &u.active);
            let states = match self.per_unit.get_mut(name.as_str()) {
                Some(s) => s,
                None => self.per_unit.entry(name.to_string()).or_default(),
            };
            bump(states, &u.active);
            if u.active == "failed" {
                degraded = true;
                self.failed
                    .entry(name.to_string())
                    .or_default()
                    .push(FailedOn {
                        machine: m.info.nkey.clone(),
                        host: m.info.hostname.clone(),
                        since_us: u.since_us,
                    });
            }
        }
        if m.units_loaded {
            let sys = if degraded { "degraded" } else { "running" };
            *s.system.entry(sys.to_owned()).or_default() += 1;
        }
    }

    pub(crate) fn finish(mut self, q: &Query) -> Summary {
        let mut s = self.summary;
        s.rows_total = self.per_unit.len();
        s.offset = q.offset;
        let limit = q.limit.min(MAX_PAGE);
        s.rows = std::mem::take(&mut self.per_unit)
            .into_iter()
            .skip(q.offset)
            .take(limit)
            .map(|(unit, states)| UnitCounts {
                unit,
                machines: states.values().sum(),
                states,
            })
            .collect();
        s.failed_total = self.failed.len();
        let mut failed: Vec<Failed> = self
            .failed
            .into_iter()
            .map(|(unit, mut machines)| {
                // Unknown `since` last.
                machines.sort_by_key(|f| (f.since_us.is_none(), f.since_us));
                let count = machines.len();
                let since_us = machines.first().and_then(|f| f.since_us);
                machines.truncate(q.failed_machines.min(MAX_FAILED_MACHINES));
                Failed {
                    unit,
                    count,
                    since_us,
                    machines,
                }
            })
            .collect();
        failed.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.unit.cmp(&b.unit)));
        failed.truncate(q.failed_limit.min(MAX_FAILED_UNITS));
        s.failed = failed;
        s
    }
}

fn bump(map: &mut BTreeMap<String, usize>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Unit;
    use cbus_protocol::presence::{now_ms, AgentInfo, PresenceKind};

    fn machine(nkey: &str, role: &str, units: &[(&str, &str, u64)]) -> Machine {
        let info = AgentInfo {
            nkey: nkey.into(),
            hostname: format!("host-{nkey}"),
            version: "0".into(),
            bus: "system".into(),
            started_at_ms: 1,
            heartbeat_ms: 60_000,
            bus_connected: true,
            labels: BTreeMap::from([("role".to_owned(), role.to_owned())]),
            rtt_ms: None,
        };
        let mut m = Machine::new(info, PresenceKind::Hello, now_ms());
        for (name, active, since) in units {
            let u = Unit {
                active: (*active).into(),
                since_us: Some(*since),
                ..Unit::default()
            };
            m.units_mut().insert((*name).into(), u);
        }
        m.units_loaded = true;
        m
    }

    fn summary(ms: &[Machine], q: &Query) -> Summary {
        let mut b = Builder::default();
        for m in ms {
            b.add(m, q, now_ms());
        }
        b.finish(q)
    }

    #[test]
    fn counts_failed_list_and_pages() {
        let ms = [
            machine(
                "A",
                "web",
                &[("a.service", "active", 1), ("b.service", "failed", 9)],
            ),
            machine(
                "B",
                "web",
                &[("a.service", "failed", 5), ("b.service", "failed", 3)],
            ),
            machine(
                "C",
                "db",
                &[("a.service", "active", 1), ("c.service", "inactive", 1)],
            ),
        ];
        let q = Query {
            limit: 2,
            failed_limit: MAX_FAILED_UNITS,
            failed_machines: 1,
            ..Query::default()
        };
        let s = summary(&ms, &q);
        assert_eq!(s.machines_total, 3);
        assert_eq!(s.machines.get("running"), Some(&3));
        assert_eq!(s.system.get("degraded"), Some(&2));
        assert_eq!(s.system.get("running"), Some(&1));
        assert_eq!(s.units.get("failed"), Some(&3));
        assert_eq!(s.failed_total, 2);
        assert_eq!(s.failed[0].unit, "b.service");
        assert_eq!(s.failed[0].count, 2);
        assert_eq!(s.failed[0].since_us, Some(3));
        assert_eq!(s.failed[0].machines[0].machine, "B");
        assert_eq!(
            s.failed[0].machines.len(),
            1,
            "failed_machines bounds the list"
        );
        assert_eq!(s.rows_total, 3);
        assert_eq!(s.rows.len(), 2);
        assert_eq!(s.rows[0].unit, "a.service");
        assert_eq!(s.rows[0].states.get("active"), Some(&2));
        assert_eq!(s.rows[0].machines, 3);

        let q = Query {
            failed_limit: 1,
            failed_machines: 50,
            ..Query::default()
        };
        let s = summary(&ms, &q);
        assert_eq!((s.failed.len(), s.failed_total), (1, 2), "failed_limit");

        let q = Query {
            label: Some(("role".into(), "db".into())),
            offset: 1,
            limit: 10,
            ..Query::default()
        };
        let s = summary(&ms, &q);
        assert_eq!(s.machines_total, 1);
        assert_eq!(s.failed_total, 0);
        assert_eq!(s.rows_total, 2);
        assert_eq!(s.rows[0].unit, "c.service");
    }
}
