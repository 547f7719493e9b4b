//! The fleet model: what the gateway knows of one machine and its units, with no locking, no
//! I/O and no idea of who reads it. The [`crate::store`] holds the machines and changes them;
//! `/metrics`, the WebSocket API and the followers only read or feed them.
//!
//! Units change only through [`Machine::units_mut`], which bumps the machine's
//! [`Machine::units_generation`]: whoever renders units (`/metrics`) keeps what it rendered
//! until that number moves, without the model knowing what was rendered.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cbus_client::fleet::{AgentStatus, Maintenance};
use cbus_protocol::presence::{AgentInfo, AgentState, PresenceKind};
use serde::Serialize;

mod unit;

pub use unit::Unit;
#[cfg(test)]
pub(crate) use unit::UnitDetail;
pub(crate) use unit::{
    is_pinned, is_readable, signal_mark, unit_type, UnitFilter, UnitProp, DEFAULT_EXCLUDE,
    UNIT_STATES,
};

/// What the gateway knows of a machine's systemd manager.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SystemInfo {
    /// The Manager's SystemState (`running`, `degraded`…); empty while unknown.
    pub state: String,
    /// The Manager's Version (`252.39-1~deb12u2`); empty while unknown.
    pub version: String,
}

/// The manager's SystemStates, as `cbus_systemd_system_state` exports them one-hot.
pub(crate) const SYSTEM_STATES: [&str; 7] = [
    "initializing",
    "starting",
    "running",
    "degraded",
    "maintenance",
    "stopping",
    "offline",
];

/// Generations are unique across machines: two machines' units never share one, so a renderer
/// keyed by machine cannot mistake a new machine for an old one.
static GENERATION: AtomicU64 = AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// One machine.
#[derive(Debug, Clone)]
pub struct Machine {
    pub info: AgentInfo,
    pub last_event: PresenceKind,
    pub last_seen_ms: u64,
    /// unit name -> state; changed only through [`Machine::units_mut`].
    units: BTreeMap<String, Unit>,
    /// Moves whenever `units` may have changed.
    units_generation: u64,
    /// object path -> unit name, to map signals to units
    pub(crate) paths: HashMap<String, String>,
    /// Whether a ListUnits has been applied since the agent (re)started.
    pub(crate) units_loaded: bool,
    pub(crate) agent_metrics: String,
    /// The state last published, to notice transitions.
    pub(crate) reported: AgentState,
    /// The operator's maintenance mark (`cbus maintenance on`), possibly expired: only
    /// [`Machine::maintenance`] says whether it counts.
    pub(crate) mark: Option<Maintenance>,
    /// Whether the mark counted when last published, to notice it expire.
    pub(crate) reported_maintenance: bool,
    /// The systemd manager's state and version.
    pub system: SystemInfo,
    /// When the units were last read in full (a load) or their unsignalled properties last
    /// refreshed; `None` before the first load.
    pub synced_ms: Option<u64>,
}

impl Machine {
    pub fn new(info: AgentInfo, last_event: PresenceKind, last_seen_ms: u64) -> Machine {
        let mut m = Machine {
            info,
            last_event,
            last_seen_ms,
            units: BTreeMap::new(),
            units_generation: next_generation(),
            paths: HashMap::new(),
            units_loaded: false,
            agent_metrics: String::new(),
            reported: AgentState::Running,
            mark: None,
            reported_maintenance: false,
            system: SystemInfo::default(),
            synced_ms: None,
        };
        m.reported = m.state(cbus_protocol::presence::now_ms());
        m
    }

    /// unit name -> state.
    pub fn units(&self) -> &BTreeMap<String, Unit> {
        &self.units
    }

    /// The units, to change them; the units' generation moves on.
    pub fn units_mut(&mut self) -> &mut BTreeMap<String, Unit> {
        self.units_generation = next_generation();
        &mut self.units
    }

    /// A number that changes whenever the units may have changed (and only then).
    pub fn units_generation(&self) -> u64 {
        self.units_generation
    }

    /// running / unresponsive / stopped from presence; `gone` once silent for longer than
    /// the registry keeps an entry.
    pub fn state(&self, now_ms: u64) -> AgentState {
        let silent = now_ms.saturating_sub(self.last_seen_ms);
        if silent > cbus_protocol::presence::REGISTRY_MAX_AGE.as_millis() as u64 {
            return AgentState::Gone;
        }
        AgentState::derive(
            self.last_event,
            Duration::from_millis(self.info.heartbeat_ms.max(1)),
            Duration::from_millis(silent),
        )
    }

    /// The maintenance mark in force at `now_ms`, if any.
    pub fn maintenance(&self, now_ms: u64) -> Option<&Maintenance> {
        self.mark.as_ref().filter(|m| m.active_at(now_ms))
    }

    /// The machine as a fan-out target.
    pub(crate) fn status(&self, now_ms: u64) -> AgentStatus {
        AgentStatus {
            info: self.info.clone(),
            state: self.state(now_ms),
            last_seen_ms: self.last_seen_ms,
            // The gateway asks the machines its clients chose; a mark is shown, not obeyed.
            maintenance: None,
        }
    }

    /// The row clients see.
    pub(crate) fn row(&self, now_ms: u64) -> MachineRow {
        MachineRow {
            nkey: self.info.nkey.clone(),
            hostname: self.info.hostname.clone(),
            version: self.info.version.clone(),
            bus: self.info.bus.clone(),
            bus_connected: self.info.bus_connected,
            labels: self.info.labels.clone(),
            started_at_ms: self.info.started_at_ms,
            heartbeat_ms: self.info.heartbeat_ms,
            state: self.state(now_ms),
            last_seen_ms: self.last_seen_ms,
            units: self.units.len(),
            units_loaded: self.units_loaded,
            maintenance: self.maintenance(now_ms).cloned(),
            system_state: (!self.system.state.is_empty()).then(|| self.system.state.clone()),
        }
    }

    pub(crate) fn unit_row(&self, name: &str, u: &Unit) -> UnitRow {
        UnitRow {
            machine: self.info.nkey.clone(),
            host: self.info.hostname.clone(),
            name: name.to_owned(),
            unit: u.clone(),
        }
    }
}

/// A machine as sent to WebSocket clients.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct MachineRow {
    pub nkey: String,
    pub hostname: String,
    pub version: String,
    pub bus: String,
    pub bus_connected: bool,
    pub labels: BTreeMap<String, String>,
    pub started_at_ms: u64,
    pub heartbeat_ms: u64,
    pub state: AgentState,
    pub last_seen_ms: u64,
    pub units: usize,
    pub units_loaded: bool,
    /// The maintenance mark in force (absent when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<Maintenance>,
    /// The systemd manager's SystemState (`running`, `degraded`…); absent while unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_state: Option<String>,
}

/// A unit with the machine it runs on, as sent to WebSocket clients (a compact array, see
/// `ws::outgoing::UNIT_COLUMNS`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UnitRow {
    pub machine: String,
    pub host: String,
    pub name: String,
    pub unit: Unit,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changing_units_moves_the_generation() {
        let info = AgentInfo {
            nkey: "U".into(),
            hostname: "h".into(),
            version: "0".into(),
            bus: "system".into(),
            started_at_ms: 1,
            heartbeat_ms: 1000,
            bus_connected: true,
            labels: BTreeMap::new(),
        };
        let mut m = Machine::new(info.clone(), PresenceKind::Hello, 0);
        let other = Machine::new(info, PresenceKind::Hello, 0);
        assert_ne!(m.units_generation(), other.units_generation());
        let g = m.units_generation();
        let _ = m.units();
        assert_eq!(m.units_generation(), g);
        m.units_mut();
        assert_ne!(m.units_generation(), g);
    }
}
