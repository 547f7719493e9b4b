//! The fleet's state, kept current by NATS traffic so that neither a scrape nor a browser ever
//! waits on a machine.
//!
//! Per machine: the agent's info and presence state, its systemd units (one ListUnits plus
//! targeted `get`s when the machine joins or restarts, then PropertiesChanged payloads and
//! UnitNew/UnitRemoved from the signal stream), and the agent's own metrics text. Machines that
//! stop heartbeating turn unresponsive by time alone ([`Cache::tick`]).
//!
//! Every visible change is also published as a [`Change`] through the [`Router`], to the
//! WebSocket sessions that follow its machine; they turn it into deltas. Changes are published
//! while the cache is still locked, so sessions see them in the order they were applied.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use crate::changes::{ChangeReceiver, Interest, Router};
use crate::metrics::UnitSeries;
use crate::objects::ObjectChange;
use cbus_client::fleet::AgentStatus;
use cbus_protocol::presence::{AgentInfo, AgentState, PresenceEvent, PresenceKind};
use regex::Regex;
use serde::Serialize;
use serde_json::{json, Value};

/// systemd's interface names.
pub const UNIT_IFACE: &str = "org.freedesktop.systemd1.Unit";
pub const SERVICE_IFACE: &str = "org.freedesktop.systemd1.Service";
/// Unit properties the cache follows, on [`UNIT_IFACE`].
pub const UNIT_PROPS: [&str; 6] = [
    "ActiveState",
    "SubState",
    "LoadState",
    "Description",
    "StateChangeTimestamp",
    "ActiveEnterTimestamp",
];

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
}

/// One machine.
#[derive(Debug, Clone)]
pub struct Machine {
    pub info: AgentInfo,
    pub last_event: PresenceKind,
    pub last_seen_ms: u64,
    /// unit name -> state; changed only through [`Machine::units_mut`].
    units: BTreeMap<String, Unit>,
    /// The units' `/metrics` series, rendered once per change of the units.
    pub(crate) unit_series: OnceLock<Arc<UnitSeries>>,
    /// object path -> unit name, to map signals to units
    pub paths: HashMap<String, String>,
    /// Whether a ListUnits has been applied since the agent (re)started.
    pub units_loaded: bool,
    pub agent_metrics: String,
    /// The state last published, to notice transitions.
    reported: AgentState,
}

impl Machine {
    pub fn new(info: AgentInfo, last_event: PresenceKind, last_seen_ms: u64) -> Machine {
        let mut m = Machine {
            info,
            last_event,
            last_seen_ms,
            units: BTreeMap::new(),
            unit_series: OnceLock::new(),
            paths: HashMap::new(),
            units_loaded: false,
            agent_metrics: String::new(),
            reported: AgentState::Running,
        };
        m.reported = m.state(presence_now());
        m
    }

    /// unit name -> state.
    pub fn units(&self) -> &BTreeMap<String, Unit> {
        &self.units
    }

    /// The units, to change them; what was rendered of them is dropped.
    pub fn units_mut(&mut self) -> &mut BTreeMap<String, Unit> {
        self.unit_series = OnceLock::new();
        &mut self.units
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
            Duration::from_millis(now_ms.saturating_sub(self.last_seen_ms)),
        )
    }

    /// The machine as a fan-out target.
    pub fn status(&self, now_ms: u64) -> AgentStatus {
        AgentStatus {
            info: self.info.clone(),
            state: self.state(now_ms),
            last_seen_ms: self.last_seen_ms,
        }
    }

    /// The row clients see.
    pub fn row(&self, now_ms: u64) -> MachineRow {
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
        }
    }

    fn unit_row(&self, name: &str, u: &Unit) -> UnitRow {
        UnitRow {
            machine: self.info.nkey.clone(),
            host: self.info.hostname.clone(),
            name: name.to_owned(),
            unit: u.clone(),
        }
    }
}

fn presence_now() -> u64 {
    cbus_protocol::presence::now_ms()
}

/// A machine as sent to WebSocket clients.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineRow {
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
}

/// A unit with the machine it runs on, as sent to WebSocket clients (a compact array, see
/// [`UNIT_COLUMNS`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UnitRow {
    pub machine: String,
    pub host: String,
    pub name: String,
    pub unit: Unit,
}

/// The column schema of unit rows: name and type of each array element.
pub const UNIT_COLUMNS: [(&str, &str); 11] = [
    ("machine", "nkey"),
    ("host", "string"),
    ("name", "string"),
    ("type", "string"),
    ("description", "string"),
    ("load", "string"),
    ("active", "string"),
    ("sub", "string"),
    ("since_us", "timestamp_us|null"),
    ("restarts", "u32|null"),
    ("path", "object_path"),
];

impl UnitRow {
    pub fn to_json(&self) -> Value {
        json!([
            self.machine,
            self.host,
            self.name,
            unit_type(&self.name),
            self.unit.description,
            self.unit.load,
            self.unit.active,
            self.unit.sub,
            self.unit.since_us,
            self.unit.restarts,
            self.unit.path,
        ])
    }
}

/// `nginx.service` -> `service`.
pub fn unit_type(name: &str) -> &str {
    name.rsplit_once('.').map(|(_, t)| t).unwrap_or("")
}

/// Something clients may want to hear about.
#[derive(Debug, Clone)]
pub enum Change {
    /// A machine appeared or its info or state changed.
    Machine(MachineRow),
    /// Units of one machine changed; `replace` means `rows` is the machine's full list.
    Units {
        machine: String,
        rows: Vec<UnitRow>,
        removed: Vec<String>,
        replace: bool,
    },
    /// A followed object changed ([`crate::objects`]).
    Object(ObjectChange),
}

/// Which units are followed and exported.
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

/// What a presence event means for the caller: whether the machine's units must be (re)loaded.
#[derive(Debug, PartialEq, Eq)]
pub enum Join {
    /// First time seen.
    New,
    /// A new agent process (new start time, or a hello), or its bus came back: reload.
    Restarted,
    /// Nothing to reload.
    Known,
}

/// A property fetch the caller should make because a signal only invalidated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub machine: String,
    pub unit: String,
    pub path: String,
    pub interface: &'static str,
    pub property: &'static str,
}

/// Shared cache; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<RwLock<BTreeMap<String, Machine>>>,
    pub filter: Arc<UnitFilter>,
    changes: Router,
}

impl Cache {
    pub fn new(filter: UnitFilter) -> Self {
        Cache {
            inner: Arc::new(RwLock::new(BTreeMap::new())),
            filter: Arc::new(filter),
            changes: Router::default(),
        }
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Machine>> {
        // A panic while holding the lock leaves consistent maps (every update is one insert),
        // so a poisoned lock is still usable.
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Machine>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver of the changes `interest` selects from now on, queueing at most `capacity`.
    pub fn subscribe(&self, interest: Interest, capacity: usize) -> ChangeReceiver {
        self.changes.subscribe(interest, capacity)
    }

    /// Publishes a change; nobody listening is fine. Callers that changed the maps call it
    /// before unlocking them, so changes reach sessions in the order they were applied.
    pub fn emit(&self, change: Change) {
        self.changes.publish(change);
    }

    /// Records a presence event seen at `seen_ms` (the listener's or the server's clock).
    pub fn presence(&self, ev: PresenceEvent, seen_ms: u64) -> Join {
        let now = presence_now();
        let mut m = self.write();
        let (join, row) = match m.get_mut(&ev.agent.nkey) {
            Some(machine) => {
                // Signals may have been missed while the machine was silent: a machine that
                // comes back is reloaded like one that restarted.
                let returning =
                    machine.state(now) != AgentState::Running && ev.event != PresenceKind::Goodbye;
                let restarted = machine.info.started_at_ms != ev.agent.started_at_ms
                    || (ev.event == PresenceKind::Hello
                        && machine.last_event != PresenceKind::Hello)
                    || (!machine.info.bus_connected && ev.agent.bus_connected)
                    || returning;
                let before = machine.row(now);
                if machine.info.hostname != ev.agent.hostname {
                    // Its /metrics series carry the old name in their labels.
                    machine.unit_series = OnceLock::new();
                }
                machine.info = ev.agent;
                machine.last_event = ev.event;
                machine.last_seen_ms = machine.last_seen_ms.max(seen_ms);
                if restarted {
                    machine.units_loaded = false;
                }
                let row = machine.row(now);
                machine.reported = row.state;
                // Heartbeats only move last_seen: not worth a delta each.
                let visible = MachineRow {
                    last_seen_ms: before.last_seen_ms,
                    ..row.clone()
                } != before;
                (
                    if restarted {
                        Join::Restarted
                    } else {
                        Join::Known
                    },
                    visible.then_some(row),
                )
            }
            None => {
                let machine = Machine::new(ev.agent, ev.event, seen_ms);
                let row = machine.row(now);
                m.insert(machine.info.nkey.clone(), machine);
                (Join::New, Some(row))
            }
        };
        if let Some(row) = row {
            self.emit(Change::Machine(row));
        }
        join
    }

    /// Publishes state transitions that happen by time alone (a machine turning unresponsive).
    pub fn tick(&self, now_ms: u64) {
        let mut m = self.write();
        for machine in m.values_mut() {
            let state = machine.state(now_ms);
            if state != machine.reported {
                machine.reported = state;
                self.emit(Change::Machine(machine.row(now_ms)));
            }
        }
    }

    /// Replaces a machine's units with a ListUnits result (`a(ssssssouso)` as JSON), keeping
    /// what signals already told about units that are still there.
    pub fn load_units(&self, nkey: &str, list: &Value) {
        let now = presence_now();
        let mut m = self.write();
        let Some(machine) = m.get_mut(nkey) else {
            return;
        };
        let mut units = BTreeMap::new();
        let mut paths = HashMap::new();
        for u in list.as_array().into_iter().flatten() {
            let field = |i: usize| u.get(i).and_then(Value::as_str).unwrap_or("").to_owned();
            let name = field(0);
            // A not-found unit is one that something merely asked about: nothing to follow.
            if name.is_empty() || !self.filter.allows(&name) || field(2) == "not-found" {
                continue;
            }
            let old = machine.units.get(&name);
            let path = field(6);
            paths.insert(path.clone(), name.clone());
            units.insert(
                name,
                Unit {
                    description: field(1),
                    load: field(2),
                    active: field(3),
                    sub: field(4),
                    path,
                    since_us: old.and_then(|o| o.since_us),
                    active_enter_us: old.and_then(|o| o.active_enter_us),
                    restarts: old.and_then(|o| o.restarts),
                },
            );
        }
        *machine.units_mut() = units;
        machine.paths = paths;
        machine.units_loaded = true;
        let rows = machine
            .units
            .iter()
            .map(|(n, u)| machine.unit_row(n, u))
            .collect();
        let row = machine.row(now);
        self.emit(Change::Units {
            machine: nkey.to_owned(),
            rows,
            removed: Vec::new(),
            replace: true,
        });
        self.emit(Change::Machine(row));
    }

    /// Applies property values (`name -> value` as the agent returns them, `{t,v}` or plain)
    /// to units of one machine, in one change.
    pub fn patch_units(&self, nkey: &str, patches: &[(String, BTreeMap<String, Value>)]) {
        let mut m = self.write();
        let Some(machine) = m.get_mut(nkey) else {
            return;
        };
        let mut rows = Vec::new();
        for (name, props) in patches {
            let Some(unit) = machine.units_mut().get_mut(name) else {
                continue;
            };
            if apply(unit, props) {
                let unit = unit.clone();
                rows.push(machine.unit_row(name, &unit));
            }
        }
        if !rows.is_empty() {
            self.emit(Change::Units {
                machine: nkey.to_owned(),
                rows,
                removed: Vec::new(),
                replace: false,
            });
        }
    }

    /// Applies a PropertiesChanged signal (`[iface, {prop: {t, v}}, [invalidated]]`) on a unit
    /// path. Returns the followed properties that were only invalidated, to fetch; `None` when
    /// the path is no unit the cache holds (on a machine whose units are loaded).
    pub fn properties_changed(&self, nkey: &str, path: &str, args: &Value) -> Option<Vec<Fetch>> {
        let iface = args.get(0).and_then(Value::as_str).unwrap_or("");
        let followed: &[&'static str] = match iface {
            UNIT_IFACE => &UNIT_PROPS,
            SERVICE_IFACE => &["NRestarts"],
            _ => return Some(Vec::new()),
        };
        let mut m = self.write();
        let Some(machine) = m.get_mut(nkey) else {
            return Some(Vec::new());
        };
        let Some(name) = machine.paths.get(path).cloned() else {
            return if machine.units_loaded {
                None
            } else {
                Some(Vec::new())
            };
        };
        let Some(unit) = machine.units_mut().get_mut(&name) else {
            return Some(Vec::new());
        };
        let mut props = BTreeMap::new();
        if let Some(changed) = args.get(1).and_then(Value::as_object) {
            for (k, v) in changed {
                props.insert(k.clone(), v.clone());
            }
        }
        let fetch = args
            .get(2)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|p| followed.iter().find(|f| **f == p))
            .map(|p| Fetch {
                machine: nkey.to_owned(),
                unit: name.clone(),
                path: path.to_owned(),
                interface: if iface == UNIT_IFACE {
                    UNIT_IFACE
                } else {
                    SERVICE_IFACE
                },
                property: p,
            })
            .collect();
        let changed = apply(unit, &props).then(|| unit.clone());
        let row = changed.map(|unit| machine.unit_row(&name, &unit));
        if let Some(row) = row {
            self.emit(Change::Units {
                machine: nkey.to_owned(),
                rows: vec![row],
                removed: Vec::new(),
                replace: false,
            });
        }
        Some(fetch)
    }

    /// A `UnitNew(id, path)` signal: whether the unit is worth asking systemd about (followed,
    /// not known yet, on a machine whose units are loaded). Nothing is added until systemd
    /// says the unit is loaded ([`Cache::add_unit`]): a UnitNew for a unit that does not exist
    /// comes and goes with every read of it.
    pub fn wants_unit(&self, nkey: &str, name: &str) -> bool {
        if !self.filter.allows(name) {
            return false;
        }
        let m = self.read();
        m.get(nkey)
            .is_some_and(|machine| machine.units_loaded && !machine.units.contains_key(name))
    }

    /// Adds (or refreshes) one unit from a ListUnits-style row (`(ssssssouso)` as JSON).
    /// Returns whether it is followed.
    pub fn add_unit(&self, nkey: &str, row: &Value) -> bool {
        let field = |i: usize| row.get(i).and_then(Value::as_str).unwrap_or("").to_owned();
        let name = field(0);
        if name.is_empty() || !self.filter.allows(&name) || field(2) == "not-found" {
            return false;
        }
        let mut m = self.write();
        let Some(machine) = m.get_mut(nkey) else {
            return false;
        };
        let path = field(6);
        let old = machine.units.get(&name).cloned().unwrap_or_default();
        let unit = Unit {
            description: field(1),
            load: field(2),
            active: field(3),
            sub: field(4),
            path: path.clone(),
            ..old
        };
        machine.paths.insert(path, name.clone());
        machine.units_mut().insert(name.clone(), unit.clone());
        let row = machine.unit_row(&name, &unit);
        self.emit(Change::Units {
            machine: nkey.to_owned(),
            rows: vec![row],
            removed: Vec::new(),
            replace: false,
        });
        true
    }

    /// A `UnitRemoved(id, path)` signal: systemd unloaded the unit.
    pub fn unit_removed(&self, nkey: &str, name: &str) {
        let mut m = self.write();
        let Some(machine) = m.get_mut(nkey) else {
            return;
        };
        let Some(unit) = machine.units_mut().remove(name) else {
            return;
        };
        machine.paths.remove(&unit.path);
        self.emit(Change::Units {
            machine: nkey.to_owned(),
            rows: Vec::new(),
            removed: vec![name.to_owned()],
            replace: false,
        });
    }

    pub fn set_agent_metrics(&self, nkey: &str, text: String) {
        if let Some(machine) = self.write().get_mut(nkey) {
            machine.agent_metrics = text;
        }
    }

    /// A consistent copy for rendering.
    pub fn snapshot(&self) -> Vec<Machine> {
        self.read().values().cloned().collect()
    }

    /// Calls `f` with the machines under the read lock (no copy).
    pub fn with_machines<R>(&self, f: impl FnOnce(&BTreeMap<String, Machine>) -> R) -> R {
        f(&self.read())
    }

    /// Calls `f` on each machine in turn, holding the read lock for one machine at a time, so
    /// that updates get in between (the lock lets waiting writers go first).
    pub fn each_machine(&self, mut f: impl FnMut(&Machine)) {
        let nkeys: Vec<String> = self.read().keys().cloned().collect();
        for nkey in nkeys {
            if let Some(m) = self.read().get(&nkey) {
                f(m);
            }
        }
    }

    pub fn machine_rows(&self, now_ms: u64) -> Vec<MachineRow> {
        self.read().values().map(|m| m.row(now_ms)).collect()
    }

    /// Units of the machines `keep_machine` accepts, whose names `keep_unit` accepts.
    pub fn unit_rows(
        &self,
        keep_machine: impl Fn(&str) -> bool,
        keep_unit: impl Fn(&str) -> bool,
    ) -> Vec<UnitRow> {
        let m = self.read();
        m.values()
            .filter(|m| keep_machine(&m.info.nkey))
            .flat_map(|machine| {
                machine
                    .units
                    .iter()
                    .filter(|(n, _)| keep_unit(n))
                    .map(|(n, u)| machine.unit_row(n, u))
            })
            .collect()
    }

    /// Fan-out targets: the named machines (unknown nkeys are returned separately), or all.
    pub fn targets(&self, nkeys: Option<&[String]>) -> (Vec<AgentStatus>, Vec<String>) {
        let now = presence_now();
        let m = self.read();
        match nkeys {
            None => (m.values().map(|x| x.status(now)).collect(), Vec::new()),
            Some(list) => {
                let mut found = Vec::new();
                let mut unknown = Vec::new();
                for n in list {
                    match m.get(n) {
                        Some(x) => found.push(x.status(now)),
                        None => unknown.push(n.clone()),
                    }
                }
                (found, unknown)
            }
        }
    }

    /// The units of a machine that are services (for NRestarts).
    pub fn unit_names(&self, nkey: &str) -> Vec<(String, String)> {
        self.read()
            .get(nkey)
            .map(|m| {
                m.units
                    .iter()
                    .map(|(n, u)| (n.clone(), u.path.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The machines that are running now.
    pub fn running_nkeys(&self) -> Vec<String> {
        let now = presence_now();
        self.read()
            .values()
            .filter(|m| m.state(now) == AgentState::Running)
            .map(|m| m.info.nkey.clone())
            .collect()
    }

    pub fn hostname(&self, nkey: &str) -> Option<String> {
        self.read().get(nkey).map(|m| m.info.hostname.clone())
    }
}

/// The value of a property as the agent returns it: `{"t": sig, "v": value}` in signals and
/// getall, the plain value from `get`.
fn plain(v: &Value) -> &Value {
    match v {
        Value::Object(o) if o.contains_key("t") && o.contains_key("v") => &o["v"],
        other => other,
    }
}

/// `t` values come as decimal strings (or numbers up to 2^53).
fn as_u64(v: &Value) -> Option<u64> {
    match plain(v) {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// Applies known properties to a unit; returns whether anything changed.
fn apply(unit: &mut Unit, props: &BTreeMap<String, Value>) -> bool {
    let before = unit.clone();
    for (k, v) in props {
        let text = || plain(v).as_str().map(str::to_owned);
        match k.as_str() {
            "ActiveState" => unit.active = text().unwrap_or_default(),
            "SubState" => unit.sub = text().unwrap_or_default(),
            "LoadState" => unit.load = text().unwrap_or_default(),
            "Description" => unit.description = text().unwrap_or_default(),
            "StateChangeTimestamp" => unit.since_us = as_u64(v).filter(|t| *t > 0),
            "ActiveEnterTimestamp" => unit.active_enter_us = as_u64(v).filter(|t| *t > 0),
            "NRestarts" => unit.restarts = as_u64(v).map(|n| n.min(u64::from(u32::MAX)) as u32),
            _ => {}
        }
    }
    *unit != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(nkey: &str, started: u64) -> AgentInfo {
        AgentInfo {
            nkey: nkey.into(),
            hostname: format!("host-{nkey}"),
            version: "0.1.0".into(),
            bus: "system".into(),
            started_at_ms: started,
            heartbeat_ms: 1000,
            bus_connected: true,
            labels: BTreeMap::new(),
        }
    }

    fn ev(kind: PresenceKind, nkey: &str, started: u64) -> PresenceEvent {
        PresenceEvent {
            event: kind,
            sent_at_ms: 0,
            agent: info(nkey, started),
        }
    }

    fn cache() -> Cache {
        Cache::new(UnitFilter::new(".+", DEFAULT_EXCLUDE).unwrap())
    }

    #[test]
    fn joins_and_restarts() {
        let c = cache();
        let now = presence_now();
        assert_eq!(c.presence(ev(PresenceKind::Hello, "A", 1), now), Join::New);
        assert_eq!(
            c.presence(ev(PresenceKind::Heartbeat, "A", 1), now),
            Join::Known
        );
        assert_eq!(
            c.presence(ev(PresenceKind::Heartbeat, "A", 2), now),
            Join::Restarted
        );
        assert_eq!(
            c.presence(ev(PresenceKind::Goodbye, "A", 2), now),
            Join::Known
        );
        assert_eq!(
            c.presence(ev(PresenceKind::Hello, "A", 2), now),
            Join::Restarted
        );
        // Silent for long, then heard again with the same start time: reloaded too.
        c.presence(ev(PresenceKind::Heartbeat, "B", 1), now - 60_000);
        assert_eq!(
            c.presence(ev(PresenceKind::Heartbeat, "B", 1), now),
            Join::Restarted
        );
    }

    #[test]
    fn a_renamed_machine_drops_its_metrics_series() {
        let c = cache();
        let now = presence_now();
        c.presence(ev(PresenceKind::Hello, "A", 1), now);
        let cached = |c: &Cache| c.with_machines(|m| m["A"].unit_series.get().is_some());
        c.each_machine(crate::metrics::prepare);
        assert!(cached(&c));
        c.presence(ev(PresenceKind::Heartbeat, "A", 1), now);
        assert!(cached(&c), "a heartbeat keeps them");
        let mut renamed = ev(PresenceKind::Heartbeat, "A", 1);
        renamed.agent.hostname = "other".into();
        c.presence(renamed, now);
        assert!(!cached(&c), "a new hostname drops them");
    }

    /// Machines known to the cache, to reload them all (after the gateway's own reconnect).
    #[test]
    fn all_nkeys() {
        let c = cache();
        c.presence(ev(PresenceKind::Hello, "A", 1), presence_now());
        assert_eq!(c.running_nkeys(), vec!["A".to_owned()]);
    }

    #[test]
    fn units_follow_signals_and_publish_changes() {
        let c = cache();
        let mut rx = c.subscribe(Interest::everything(), 64);
        let now = presence_now();
        c.presence(ev(PresenceKind::Hello, "A", 1), now);
        let list = json!([
            [
                "a.service",
                "A",
                "loaded",
                "active",
                "running",
                "",
                "/u/a",
                0,
                "",
                "/"
            ],
            ["b.mount", "B", "loaded", "active", "mounted", "", "/u/b", 0, "", "/"],
        ]);
        c.load_units("A", &list);
        let m = c.snapshot();
        assert_eq!(m[0].units().len(), 1, "mounts are excluded by default");
        let fetch = c
            .properties_changed(
                "A",
                "/u/a",
                &json!([UNIT_IFACE, {"ActiveState": {"t":"s","v":"inactive"},
                "StateChangeTimestamp": {"t":"t","v":"1700000000000000"}}, ["SubState", "Foo"]]),
            )
            .unwrap();
        assert_eq!(fetch.len(), 1);
        assert_eq!(fetch[0].property, "SubState");
        let machines = c.snapshot();
        let u = &machines[0].units()["a.service"];
        assert_eq!(u.active, "inactive");
        assert_eq!(u.since_us, Some(1_700_000_000_000_000));
        c.patch_units(
            "A",
            &[(
                "a.service".into(),
                BTreeMap::from([("NRestarts".into(), json!(3))]),
            )],
        );
        assert_eq!(c.snapshot()[0].units()["a.service"].restarts, Some(3));
        assert!(c.wants_unit("A", "c.service"));
        assert!(c.add_unit(
            "A",
            &json!([
                "c.service",
                "C",
                "loaded",
                "active",
                "running",
                "",
                "/u/c",
                0,
                "",
                "/"
            ])
        ));
        assert!(!c.wants_unit("A", "c.service"));
        assert!(!c.wants_unit("A", "d.scope"));
        c.unit_removed("A", "c.service");
        assert!(!c.snapshot()[0].units().contains_key("c.service"));

        let mut kinds = Vec::new();
        while let Some(Ok(ch)) = rx.try_recv() {
            kinds.push(match &*ch {
                Change::Machine(_) => "machine",
                Change::Units { replace: true, .. } => "replace",
                Change::Units { removed, .. } if !removed.is_empty() => "removed",
                Change::Units { .. } => "units",
                Change::Object(_) => "object",
            });
        }
        assert_eq!(
            kinds,
            ["machine", "replace", "machine", "units", "units", "units", "removed"]
        );
    }

    #[test]
    fn silence_turns_unresponsive_once() {
        let c = cache();
        let now = presence_now();
        c.presence(ev(PresenceKind::Hello, "A", 1), now);
        let mut rx = c.subscribe(Interest::everything(), 64);
        c.tick(now + 500);
        assert!(rx.try_recv().is_none());
        c.tick(now + 10_000);
        match rx.try_recv().and_then(Result::ok).as_deref() {
            Some(Change::Machine(row)) => assert_eq!(row.state, AgentState::Unresponsive),
            other => panic!("{other:?}"),
        }
        c.tick(now + 20_000);
        assert!(rx.try_recv().is_none());
        c.tick(now + 25 * 3600 * 1000);
        match rx.try_recv().and_then(Result::ok).as_deref() {
            Some(Change::Machine(row)) => assert_eq!(row.state, AgentState::Gone),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unit_rows_are_compact() {
        let row = UnitRow {
            machine: "U".into(),
            host: "h".into(),
            name: "x.service".into(),
            unit: Unit {
                active: "active".into(),
                since_us: Some(5),
                ..Default::default()
            },
        };
        let v = row.to_json();
        assert_eq!(v.as_array().unwrap().len(), UNIT_COLUMNS.len());
        assert_eq!(v[3], "service");
        assert_eq!(v[8], 5);
        assert_eq!(v[9], Value::Null);
    }
}
