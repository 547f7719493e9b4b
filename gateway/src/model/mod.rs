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

use crate::intern::Text;

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
    units: BTreeMap<Text, Unit>,
    /// Moves whenever `units` may have changed.
    units_generation: u64,
    /// object path -> unit name of the units whose path is not systemd's for their name
    /// ([`Unit::odd_path`]), to map signals to units ([`Machine::unit_at`]); the others' paths
    /// are derived from their names, so this is empty for a real systemd.
    odd_paths: HashMap<Box<str>, Text>,
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
            odd_paths: HashMap::new(),
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
    pub fn units(&self) -> &BTreeMap<Text, Unit> {
        &self.units
    }

    /// The units, to change them; the units' generation moves on. Units added or removed
    /// here are found by their path only if it is systemd's for their name: the store adds
    /// and removes them with [`Machine::set_units`], [`Machine::insert_unit`] and
    /// [`Machine::remove_unit`], which keep the other paths.
    pub fn units_mut(&mut self) -> &mut BTreeMap<Text, Unit> {
        self.units_generation = next_generation();
        &mut self.units
    }

    /// Replaces the units (a map built at once, so its nodes are full).
    pub(crate) fn set_units(&mut self, units: BTreeMap<Text, Unit>) {
        self.odd_paths = units
            .iter()
            .filter_map(|(name, u)| Some((u.odd_path.clone()?, name.clone())))
            .collect();
        *self.units_mut() = units;
    }

    /// Adds a unit, or replaces the one of that name.
    pub(crate) fn insert_unit(&mut self, name: Text, unit: Unit) {
        if let Some(path) = &unit.odd_path {
            self.odd_paths.insert(path.clone(), name.clone());
        }
        if let Some(old) = self.units_mut().insert(name, unit) {
            self.forget_path(&old);
        }
    }

    /// Removes a unit.
    pub(crate) fn remove_unit(&mut self, name: &str) -> Option<Unit> {
        let unit = self.units_mut().remove(name)?;
        self.forget_path(&unit);
        Some(unit)
    }

    /// Drops `old`'s entry in `odd_paths` unless the path now belongs to a unit.
    fn forget_path(&mut self, old: &Unit) {
        let Some(path) = &old.odd_path else {
            return;
        };
        let taken = self.odd_paths.get(path).is_some_and(|n| {
            self.units
                .get(n)
                .is_some_and(|u| u.odd_path.as_ref() == Some(path))
        });
        if !taken {
            self.odd_paths.remove(path);
        }
    }

    /// The name of the unit at an object path: the unit that reported it as its path, else
    /// the unit the path names by systemd's escaping
    /// ([`cbus_protocol::token::systemd_unit_of_path`]) unless that unit reported another.
    pub(crate) fn unit_at(&self, path: &str) -> Option<&Text> {
        if let Some((name, _)) = self
            .odd_paths
            .get(path)
            .and_then(|n| self.units.get_key_value(n))
            .filter(|(_, u)| u.odd_path.as_deref() == Some(path))
        {
            return Some(name);
        }
        let name = cbus_protocol::token::systemd_unit_of_path(path)?;
        let (name, u) = self.units.get_key_value(name.as_str())?;
        u.odd_path.is_none().then_some(name)
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

    pub(crate) fn unit_row(&self, name: &Text, u: &Unit) -> UnitRow {
        UnitRow {
            machine: self.info.nkey.clone(),
            host: self.info.hostname.clone(),
            name: name.clone(),
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
    pub name: Text,
    pub unit: Unit,
}

#[cfg(test)]
mod tests {
    use cbus_client::systemd::unit_path;
    use proptest::prelude::*;

    use super::*;

    fn machine() -> Machine {
        let info = AgentInfo {
            nkey: "U".into(),
            hostname: "h".into(),
            version: "0".into(),
            bus: "system".into(),
            started_at_ms: 1,
            heartbeat_ms: 1000,
            bus_connected: true,
            labels: BTreeMap::new(),
            rtt_ms: None,
        };
        Machine::new(info, PresenceKind::Hello, 0)
    }

    /// A unit named `name` that the machine reported at `path`.
    fn at(name: &str, path: &str) -> (Text, Unit) {
        let mut u = Unit::default();
        u.set_path(name, path);
        (name.into(), u)
    }

    #[test]
    fn changing_units_moves_the_generation() {
        let mut m = machine();
        let other = machine();
        assert_ne!(m.units_generation(), other.units_generation());
        let g = m.units_generation();
        let _ = m.units();
        assert_eq!(m.units_generation(), g);
        m.units_mut();
        assert_ne!(m.units_generation(), g);
    }

    #[test]
    fn units_are_found_by_the_path_they_reported() {
        let mut m = machine();
        m.set_units(BTreeMap::from([
            at("nginx.service", &unit_path("nginx.service")),
            at("getty@tty1.service", &unit_path("getty@tty1.service")),
            // Not systemd's paths for these names: kept, and found by them alone.
            at("odd.service", "/u/odd"),
            at(
                "upper.service",
                "/org/freedesktop/systemd1/unit/upper_2Eservice",
            ),
            at("empty.service", ""),
        ]));
        let name = |m: &Machine, path: &str| m.unit_at(path).map(Text::to_string);
        assert_eq!(
            name(&m, "/org/freedesktop/systemd1/unit/nginx_2eservice").as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            name(&m, "/org/freedesktop/systemd1/unit/getty_40tty1_2eservice").as_deref(),
            Some("getty@tty1.service")
        );
        assert_eq!(name(&m, "/u/odd").as_deref(), Some("odd.service"));
        assert_eq!(name(&m, &unit_path("odd.service")), None);
        assert_eq!(
            name(&m, "/org/freedesktop/systemd1/unit/upper_2Eservice").as_deref(),
            Some("upper.service")
        );
        assert_eq!(name(&m, &unit_path("upper.service")), None);
        assert_eq!(name(&m, "").as_deref(), Some("empty.service"));
        assert_eq!(name(&m, &unit_path("missing.service")), None);
        assert_eq!(name(&m, "/org/freedesktop/systemd1/unit/x_2"), None);
        assert_eq!(
            m.odd_paths.len(),
            3,
            "only the paths that are not systemd's are kept"
        );

        // A unit listed again at another path, or removed, leaves no stale path behind.
        let (n, u) = at("odd.service", &unit_path("odd.service"));
        m.insert_unit(n, u);
        assert_eq!(name(&m, "/u/odd"), None);
        assert_eq!(
            name(&m, &unit_path("odd.service")).as_deref(),
            Some("odd.service")
        );
        let (n, u) = at("nginx.service", "/u/nginx");
        m.insert_unit(n, u);
        assert_eq!(name(&m, &unit_path("nginx.service")), None);
        assert_eq!(name(&m, "/u/nginx").as_deref(), Some("nginx.service"));
        assert!(m.remove_unit("nginx.service").is_some());
        assert_eq!(name(&m, "/u/nginx"), None);
        assert!(m.remove_unit("nginx.service").is_none());
        assert_eq!(m.odd_paths.len(), 2);
    }

    #[test]
    fn two_units_claiming_one_path_stay_consistent() {
        let mut m = machine();
        // A hostile machine reports another unit's path for a unit.
        m.set_units(BTreeMap::from([
            at("a.service", "/u/x"),
            at("b.service", "/u/x"),
            at("c.service", &unit_path("d.service")),
            at("d.service", &unit_path("d.service")),
        ]));
        let owner = m.unit_at("/u/x").map(Text::to_string);
        assert!(matches!(owner.as_deref(), Some("a.service" | "b.service")));
        assert!(m.unit_at(&unit_path("d.service")).is_some());
        // Removing the one the entry does not name keeps the other's.
        let other = if owner.as_deref() == Some("a.service") {
            "b.service"
        } else {
            "a.service"
        };
        m.remove_unit(other);
        assert_eq!(m.unit_at("/u/x").map(Text::to_string), owner);
    }

    fn unit_names() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9@_.:-]{1,40}\\.(service|socket|timer|mount)",
            "\\PC{1,30}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// systemd's path of any unit name is kept as nothing, read back as itself, and
        /// leads back to the unit.
        #[test]
        fn systemd_paths_are_derived(name in unit_names()) {
            let path = unit_path(&name);
            let (n, u) = at(&name, &path);
            prop_assert_eq!(&u.odd_path, &None);
            prop_assert_eq!(u.path(&name), path.as_str());
            let mut m = machine();
            m.insert_unit(n, u);
            prop_assert_eq!(m.unit_at(&path).map(Text::as_str), Some(name.as_str()));
            prop_assert!(m.odd_paths.is_empty());
        }

        /// Any other path a machine reports is kept, read back, and leads to the unit; the
        /// path systemd would have given it does not.
        #[test]
        fn other_paths_are_kept(name in unit_names(), path in "(/[A-Za-z0-9_]{0,12}){0,5}|\\PC{0,40}") {
            prop_assume!(path != unit_path(&name));
            let (n, u) = at(&name, &path);
            prop_assert_eq!(u.path(&name), path.as_str());
            let mut m = machine();
            m.insert_unit(n, u);
            prop_assert_eq!(m.unit_at(&path).map(Text::as_str), Some(name.as_str()));
            prop_assert_eq!(m.unit_at(&unit_path(&name)), None);
            m.remove_unit(&name);
            prop_assert!(m.odd_paths.is_empty());
            prop_assert_eq!(m.unit_at(&path), None);
        }
    }
}
