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
use regex::Regex;
use serde::Serialize;

/// One unit's state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unit {
    pub description: String,
    pub load: String,
    pub active: String,
    pub sub: String,
    /// The unit's object path (from ListUnits).
    pub path: String,
    /// StateChangeTimestamp in microseconds since the epoch: "since" in the dashboard.
    pub since_us: Option<u64>,
    /// ActiveEnterTimestamp in microseconds, for `cbus_systemd_unit_start_time_seconds`.
    pub active_enter_us: Option<u64>,
    /// NRestarts, for services.
    pub restarts: Option<u32>,
    /// What only `/metrics` shows: a change here is no delta for WebSocket clients.
    pub detail: UnitDetail,
    /// The [`signal_mark`] of the last signal applied to the unit, so that a read answered
    /// from before it does not undo it.
    pub signalled: u64,
}

/// Signals applied so far, over all machines.
static SIGNALS: AtomicU64 = AtomicU64::new(0);

/// A mark to take before reading properties: values read are newer than the signals applied
/// before it, and maybe older than those after ([`Unit::apply_read`]).
pub(crate) fn signal_mark() -> u64 {
    SIGNALS.load(Ordering::Relaxed)
}

/// The unit properties behind node_exporter's and systemd_exporter's other unit series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnitDetail {
    /// A service's or mount's `Type` (`simple`, `oneshot`, `tmpfs`…): node_exporter's `type`
    /// label; empty for other units and while unknown.
    pub kind: String,
    /// UnitFileState (`enabled`, `static`, `disabled`…); empty while unknown.
    pub unit_file_state: String,
    /// A service's TasksCurrent; `None` when unknown or when systemd has no count (no cgroup).
    pub tasks_current: Option<u64>,
    /// A service's TasksMax; `None` when unknown or unlimited.
    pub tasks_max: Option<u64>,
    /// A socket's NAccepted, NConnections and NRefused.
    pub accepted: Option<u32>,
    pub connections: Option<u32>,
    pub refused: Option<u32>,
    /// A timer's LastTriggerUSec (0: never triggered).
    pub last_trigger_us: Option<u64>,
    /// Whether the unit's properties were read in full once ([`UnitProp::FullyRead`]); until
    /// then a unit that reaches a [readable](is_readable) state is read.
    pub read: bool,
}

/// A unit property value systemd reported, already unwrapped from its D-Bus variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UnitProp {
    ActiveState(String),
    SubState(String),
    LoadState(String),
    Description(String),
    /// Microseconds since the epoch; `None` for 0 (never) or an unreadable value.
    StateChangeTimestamp(Option<u64>),
    ActiveEnterTimestamp(Option<u64>),
    NRestarts(Option<u32>),
    /// A service's or mount's `Type`.
    Type(String),
    UnitFileState(String),
    /// `None` for systemd's "no value" (`u64::MAX`).
    TasksCurrent(Option<u64>),
    TasksMax(Option<u64>),
    NAccepted(Option<u32>),
    NConnections(Option<u32>),
    NRefused(Option<u32>),
    LastTriggerUSec(Option<u64>),
    /// Not a property: marks the end of a full read of the unit.
    FullyRead,
}

/// What applying property values did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// Anything changed.
    pub changed: bool,
    /// Something clients are shown changed (not only [`UnitDetail`]).
    pub shown: bool,
}

impl UnitProp {
    /// Whether systemd signals changes of it (PropertiesChanged carries it): the properties
    /// the gateway follows through signals. A service's Type is constant while loaded (a
    /// mount's is signalled, but either read is as new as any signal).
    fn is_signalled(&self) -> bool {
        !matches!(
            self,
            UnitProp::Type(_)
                | UnitProp::FullyRead
                | UnitProp::UnitFileState(_)
                | UnitProp::TasksCurrent(_)
                | UnitProp::TasksMax(_)
                | UnitProp::NAccepted(_)
                | UnitProp::NConnections(_)
                | UnitProp::NRefused(_)
        )
    }
}

impl Unit {
    /// Applies values a signal carried.
    pub(crate) fn apply_signal(&mut self, props: &[UnitProp]) -> Applied {
        let applied = self.apply(props);
        self.signalled = SIGNALS.fetch_add(1, Ordering::Relaxed) + 1;
        applied
    }

    /// Applies values read by a request made after `mark` ([`signal_mark`]): if a signal was
    /// applied since, it is newer than what the read answered for the signalled properties
    /// (systemd sends all of them with each change), so only the others are taken.
    pub(crate) fn apply_read(&mut self, props: &[UnitProp], mark: u64) -> Applied {
        if self.signalled <= mark {
            return self.apply(props);
        }
        let unsignalled: Vec<UnitProp> = props
            .iter()
            .filter(|p| !p.is_signalled())
            .cloned()
            .collect();
        self.apply(&unsignalled)
    }

    /// Applies property values.
    pub(crate) fn apply(&mut self, props: &[UnitProp]) -> Applied {
        let before = self.clone();
        let d = &mut self.detail;
        for p in props {
            match p {
                UnitProp::Type(s) => d.kind.clone_from(s),
                UnitProp::UnitFileState(s) => d.unit_file_state.clone_from(s),
                UnitProp::TasksCurrent(n) => d.tasks_current = *n,
                UnitProp::TasksMax(n) => d.tasks_max = *n,
                UnitProp::NAccepted(n) => d.accepted = *n,
                UnitProp::NConnections(n) => d.connections = *n,
                UnitProp::NRefused(n) => d.refused = *n,
                UnitProp::LastTriggerUSec(t) => d.last_trigger_us = *t,
                UnitProp::FullyRead => d.read = true,
                _ => {}
            }
        }
        for p in props {
            match p {
                UnitProp::ActiveState(s) => self.active.clone_from(s),
                UnitProp::SubState(s) => self.sub.clone_from(s),
                UnitProp::LoadState(s) => self.load.clone_from(s),
                UnitProp::Description(s) => self.description.clone_from(s),
                UnitProp::StateChangeTimestamp(t) => self.since_us = *t,
                UnitProp::ActiveEnterTimestamp(t) => self.active_enter_us = *t,
                UnitProp::NRestarts(n) => self.restarts = *n,
                _ => {}
            }
        }
        // A unit that stopped has no cgroup, so no task count (systemd reports none); this
        // needs no read, and no later refresh finds it otherwise.
        if !is_pinned(&self.active) {
            self.detail.tasks_current = None;
        }
        let changed = *self != before;
        let shown = changed
            && Unit {
                detail: UnitDetail::default(),
                ..self.clone()
            } != Unit {
                detail: UnitDetail::default(),
                ..before
            };
        Applied { changed, shown }
    }
}

/// Active states in which systemd never unloads a unit, so reading its object loads nothing
/// (and in which a service has a cgroup, so tasks).
pub(crate) const PINNED_STATES: [&str; 4] = ["active", "reloading", "activating", "deactivating"];

pub(crate) fn is_pinned(active: &str) -> bool {
    PINNED_STATES.contains(&active)
}

/// States in which reading a unit's object loads nothing: the pinned ones, and `failed`
/// (systemd keeps failed units loaded unless `CollectMode=inactive-or-failed`; one collected
/// meanwhile comes back as a fresh `inactive` unit, which is not read again, so no load loop).
pub(crate) fn is_readable(active: &str) -> bool {
    is_pinned(active) || active == "failed"
}

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

/// The active states of a unit, as node_exporter exports them one-hot.
pub(crate) const UNIT_STATES: [&str; 6] = [
    "active",
    "activating",
    "deactivating",
    "inactive",
    "failed",
    "reloading",
];

/// `nginx.service` -> `service`.
pub(crate) fn unit_type(name: &str) -> &str {
    name.rsplit_once('.').map(|(_, t)| t).unwrap_or("")
}

/// Which units are followed and exported.
#[derive(Debug, Clone)]
pub(crate) struct UnitFilter {
    include: Regex,
    exclude: Regex,
}

/// node_exporter's systemd collector excludes these by default.
pub(crate) const DEFAULT_EXCLUDE: &str = r".+\.(automount|device|mount|scope|slice)";

impl UnitFilter {
    pub(crate) fn new(include: &str, exclude: &str) -> Result<Self, regex::Error> {
        // Anchored, as node_exporter does.
        Ok(UnitFilter {
            include: Regex::new(&format!("^(?:{include})$"))?,
            exclude: Regex::new(&format!("^(?:{exclude})$"))?,
        })
    }

    pub(crate) fn allows(&self, unit: &str) -> bool {
        self.include.is_match(unit) && !self.exclude.is_match(unit)
    }
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

    #[test]
    fn props_apply_and_say_whether_anything_changed() {
        let mut u = Unit::default();
        assert!(u.apply(&[UnitProp::ActiveState("active".into())]).shown);
        assert!(!u.apply(&[UnitProp::ActiveState("active".into())]).changed);
        assert!(u.apply(&[UnitProp::NRestarts(Some(3))]).shown);
        assert_eq!(u.restarts, Some(3));
        let mark = signal_mark();
        u.apply_signal(&[UnitProp::NRestarts(Some(4))]);
        let late = u.apply_read(
            &[
                UnitProp::NRestarts(Some(3)),
                UnitProp::UnitFileState("enabled".into()),
            ],
            mark,
        );
        assert_eq!(
            u.restarts,
            Some(4),
            "a read from before a signal does not undo it"
        );
        assert!(late.changed && u.detail.unit_file_state == "enabled");
        assert!(
            u.apply_read(&[UnitProp::NRestarts(Some(5))], signal_mark())
                .changed
        );
        let tasks = u.apply(&[UnitProp::TasksCurrent(Some(4))]);
        assert!(tasks.changed && !tasks.shown, "only /metrics shows tasks");
        assert!(u.apply(&[UnitProp::ActiveState("inactive".into())]).shown);
        assert_eq!(u.detail.tasks_current, None, "a stopped unit has no tasks");
    }
}
