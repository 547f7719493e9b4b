//! The fleet's state, kept current by NATS traffic so that nothing asks D-Bus during a scrape.
//!
//! Per machine: the agent's info and presence state, its systemd units (one ListUnits when the
//! machine joins or restarts, then PropertiesChanged deltas from the signal stream), and the
//! agent's own metrics text. Machines that stop heartbeating turn unresponsive by time alone.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cbus_protocol::presence::{AgentInfo, AgentState, PresenceEvent, PresenceKind};
use regex::Regex;
use serde_json::Value;

/// One unit's state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unit {
    pub description: String,
    pub load: String,
    pub active: String,
    pub sub: String,
    /// ActiveEnterTimestamp in microseconds, when a signal told us.
    pub active_enter_us: Option<u64>,
    pub restarts: Option<u32>,
}

/// One machine.
#[derive(Debug, Clone)]
pub struct Machine {
    pub info: AgentInfo,
    pub last_event: PresenceKind,
    pub last_seen_ms: u64,
    /// unit name -> state
    pub units: BTreeMap<String, Unit>,
    /// object path -> unit name, to map signals to units
    pub paths: BTreeMap<String, String>,
    pub agent_metrics: String,
}

impl Machine {
    pub fn state(&self, now_ms: u64) -> AgentState {
        AgentState::derive(
            self.last_event,
            Duration::from_millis(self.info.heartbeat_ms.max(1)),
            Duration::from_millis(now_ms.saturating_sub(self.last_seen_ms)),
        )
    }
}

/// Which units are exported.
#[derive(Debug, Clone)]
pub struct UnitFilter {
    include: Regex,
    exclude: Regex,
}

/// node_exporter's systemd collector excludes these by default.
pub const DEFAULT_EXCLUDE: &str = r".+\.(automount|device|mount|scope|slice)";

impl UnitFilter {
    pub fn new(include: &str, exclude: &str) -> Result<Self, regex::Error> {
        // Anchored, as node_exporter does.
        Ok(UnitFilter {
            include: Regex::new(&format!("^(?:{include})$"))?,
            exclude: Regex::new(&format!("^(?:{exclude})$"))?,
        })
    }

    pub fn allows(&self, unit: &str) -> bool {
        self.include.is_match(unit) && !self.exclude.is_match(unit)
    }
}

/// Shared cache; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<RwLock<BTreeMap<String, Machine>>>,
    pub filter: Arc<UnitFilter>,
}

/// What a presence event means for the caller: whether the machine's units must be (re)loaded.
#[derive(Debug, PartialEq, Eq)]
pub enum Join {
    New,
    Restarted,
    Known,
}

impl Cache {
    pub fn new(filter: UnitFilter) -> Self {
        Cache {
            inner: Arc::new(RwLock::new(BTreeMap::new())),
            filter: Arc::new(filter),
        }
    }

    /// Records a presence event seen at `seen_ms`.
    pub fn presence(&self, ev: PresenceEvent, seen_ms: u64) -> Join {
        let Ok(mut m) = self.inner.write() else {
            return Join::Known;
        };
        match m.get_mut(&ev.agent.nkey) {
            Some(machine) => {
                let restarted = machine.info.started_at_ms != ev.agent.started_at_ms;
                machine.info = ev.agent;
                machine.last_event = ev.event;
                machine.last_seen_ms = machine.last_seen_ms.max(seen_ms);
                if restarted {
                    Join::Restarted
                } else {
                    Join::Known
                }
            }
            None => {
                m.insert(
                    ev.agent.nkey.clone(),
                    Machine {
                        info: ev.agent,
                        last_event: ev.event,
                        last_seen_ms: seen_ms,
                        units: BTreeMap::new(),
                        paths: BTreeMap::new(),
                        agent_metrics: String::new(),
                    },
                );
                Join::New
            }
        }
    }

    /// Replaces a machine's units with a ListUnits result (`a(ssssssouso)` as JSON).
    pub fn load_units(&self, nkey: &str, list: &Value) {
        let Ok(mut m) = self.inner.write() else {
            return;
        };
        let Some(machine) = m.get_mut(nkey) else {
            return;
        };
        machine.units.clear();
        machine.paths.clear();
        for u in list.as_array().into_iter().flatten() {
            let field = |i: usize| u.get(i).and_then(Value::as_str).unwrap_or("").to_owned();
            let name = field(0);
            if !self.filter.allows(&name) {
                continue;
            }
            machine.paths.insert(field(6), name.clone());
            machine.units.insert(
                name,
                Unit {
                    description: field(1),
                    load: field(2),
                    active: field(3),
                    sub: field(4),
                    active_enter_us: None,
                    restarts: None,
                },
            );
        }
    }

    /// Applies a PropertiesChanged signal (`[iface, {prop: {t, v}}, [invalidated]]`).
    /// Returns whether a known unit changed.
    pub fn properties_changed(&self, nkey: &str, path: &str, args: &Value) -> bool {
        let Ok(mut m) = self.inner.write() else {
            return false;
        };
        let Some(machine) = m.get_mut(nkey) else {
            return false;
        };
        let Some(name) = machine.paths.get(path).cloned() else {
            return false;
        };
        let Some(unit) = machine.units.get_mut(&name) else {
            return false;
        };
        let Some(changed) = args.get(1).and_then(Value::as_object) else {
            return false;
        };
        let text = |k: &str| {
            changed
                .get(k)
                .and_then(|v| v.get("v"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let before = unit.clone();
        if let Some(v) = text("ActiveState") {
            unit.active = v;
        }
        if let Some(v) = text("SubState") {
            unit.sub = v;
        }
        if let Some(v) = text("LoadState") {
            unit.load = v;
        }
        if let Some(v) = text("ActiveEnterTimestamp").and_then(|s| s.parse().ok()) {
            unit.active_enter_us = Some(v);
        }
        if let Some(v) = changed
            .get("NRestarts")
            .and_then(|v| v.get("v"))
            .and_then(Value::as_u64)
        {
            unit.restarts = Some(v as u32);
        }
        *unit != before
    }

    pub fn set_agent_metrics(&self, nkey: &str, text: String) {
        if let Ok(mut m) = self.inner.write() {
            if let Some(machine) = m.get_mut(nkey) {
                machine.agent_metrics = text;
            }
        }
    }

    /// A consistent copy for rendering.
    pub fn snapshot(&self) -> Vec<Machine> {
        self.inner
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn nkeys(&self) -> HashSet<String> {
        self.inner
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}
