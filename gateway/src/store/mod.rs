//! The fleet's state, shared by every task, so that neither a scrape nor a browser ever waits
//! on a machine.
//!
//! The followers ([`crate::follow`], [`crate::systemd`]) feed it with typed updates: presence
//! events, ListUnits rows, unit property values. Machines that stop heartbeating turn
//! unresponsive by time alone ([`Store::tick`]). The store knows nothing of NATS, D-Bus
//! variants or JSON.
//!
//! Every visible change is also published as a [`Change`] through the change hub, to the
//! WebSocket sessions that follow its machine; they turn it into deltas. Changes are published
//! while the store is still locked, so sessions see them in the order they were applied.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use cbus_client::fleet::{AgentStatus, Maintenance};
use cbus_client::systemd::Unit as Listed;
use cbus_protocol::presence::{now_ms, AgentState, PresenceEvent, PresenceKind};

mod marks;
mod rows;

use crate::changes::{Change, Router};

/// A unit's object path, active state and StateChangeTimestamp ([`Store::unit_state`]).
pub(crate) type UnitState = (String, String, Option<u64>);
use crate::intern::Text;
use crate::model::{Machine, MachineRow, SystemInfo, Unit, UnitFilter, UnitProp};

/// What a presence event means for the caller: whether the machine's units must be (re)loaded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Join {
    /// First time seen.
    New,
    /// A new agent process (new start time, or a hello), or its bus came back: reload.
    Restarted,
    /// Nothing to reload.
    Known,
}

/// What became of property values reported for a unit's object path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum UnitAt {
    /// They were applied to this unit; `failed_changed` when it entered or left `failed` (the
    /// manager's SystemState may have changed with it); `unread` when it was never read in
    /// full and may be read now ([`crate::model::is_readable`]).
    Unit {
        name: String,
        failed_changed: bool,
        unread: bool,
    },
    /// The machine's units are loaded and none has that path: systemd reports a unit the store
    /// does not follow (yet).
    Unfollowed,
    /// Unknown machine, or its units are not loaded yet: nothing to do.
    Ignored,
}

/// Shared fleet state; cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    inner: Arc<RwLock<BTreeMap<String, Machine>>>,
    /// Maintenance marks of machines not seen yet, applied when they appear. Locked only while
    /// `inner` is write-locked, so the two never deadlock.
    early_marks: Arc<Mutex<HashMap<String, Maintenance>>>,
    filter: Arc<UnitFilter>,
    changes: Router,
    /// Moves with every change published, so aggregates are computed again only when needed.
    version: Arc<AtomicU64>,
}

impl Store {
    /// A store that publishes its changes through `changes`.
    pub(crate) fn new(filter: UnitFilter, changes: Router) -> Self {
        Store {
            inner: Arc::new(RwLock::new(BTreeMap::new())),
            early_marks: Arc::default(),
            filter: Arc::new(filter),
            changes,
            version: Arc::default(),
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

    /// Callers that changed the maps call it before unlocking them, so changes reach sessions
    /// in the order they were applied.
    fn emit(&self, change: Change) {
        self.version.fetch_add(1, Ordering::Relaxed);
        self.changes.publish(change);
    }

    /// A number that moves whenever a change is published.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Whether a unit is followed at all: the filter, and not one that something merely asked
    /// about (`not-found`: nothing to follow).
    fn follows(&self, unit: &Listed) -> bool {
        !unit.name.is_empty() && self.filter.allows(&unit.name) && !unit.is_not_found()
    }

    /// Records a presence event seen at `seen_ms` (the listener's or the server's clock).
    pub(crate) fn presence(&self, ev: PresenceEvent, seen_ms: u64) -> Join {
        let now = now_ms();
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
                let mut machine = Machine::new(ev.agent, ev.event, seen_ms);
                machine.mark = self.early_marks().remove(&machine.info.nkey);
                machine.reported_maintenance = machine.maintenance(now).is_some();
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

    /// Publishes state transitions that happen by time alone (a machine turning unresponsive,
    /// a maintenance mark expiring).
    pub(crate) fn tick(&self, now_ms: u64) {
        let mut m = self.write();
        for machine in m.values_mut() {
            let state = machine.state(now_ms);
            let maintenance = machine.maintenance(now_ms).is_some();
            if state != machine.reported || maintenance != machine.reported_maintenance {
                machine.reported = state;
                machine.reported_maintenance = maintenance;
                self.emit(Change::Machine(machine.row(now_ms)));
            }
        }
    }

    /// Replaces a machine's units with a ListUnits result asked for after `mark`
    /// ([`crate::model::signal_mark`]), keeping what signals told about units that are still
    /// there (and their states, when a signal came after the list was asked for).
    pub(crate) fn replace_units(&self, nkey: &str, list: Vec<Listed>, mark: u64) {
        let now = now_ms();
        // Words shared before the lock is taken.
        let list: Vec<(Text, Unit)> = list
            .into_iter()
            .filter(|u| self.follows(u))
            .map(listed)
            .collect();
        let mut m = self.write();
        let Some(machine) = m.get_mut(nkey) else {
            return;
        };
        // Collected at once (sorted, then built with full nodes; of two rows of one name the
        // last counts, as inserting them in turn would).
        let units = list
            .into_iter()
            .map(|(name, unit)| {
                let unit = with_signalled(machine.units().get(&name), unit, mark);
                (name, unit)
            })
            .collect();
        machine.set_units(units);
        machine.units_loaded = true;
        let rows = machine
            .units()
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

    /// Applies property values read from one machine by requests made after `mark`
    /// ([`crate::model::signal_mark`]), in one change.
    pub(crate) fn patch_units(&self, nkey: &str, patches: &[(String, Vec<UnitProp>)], mark: u64) {
        let mut m = self.write();
        let Some(machine) = m.get_mut(nkey) else {
            return;
        };
        let mut rows = Vec::new();
        for (name, props) in patches {
            let Some(unit) = machine.units_mut().get_mut(name.as_str()) else {
                continue;
            };
            if unit.apply_read(props, mark).shown {
                let unit = unit.clone();
                rows.push(machine.unit_row(&Text::from(name.as_str()), &unit));
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

    /// Applies property values reported for the unit at an object path (a PropertiesChanged).
    pub(crate) fn patch_unit_at(&self, nkey: &str, path: &str, props: &[UnitProp]) -> UnitAt {
        let mut m = self.write();
        let Some(machine) = m.get_mut(nkey) else {
            return UnitAt::Ignored;
        };
        let Some(name) = machine.unit_at(path).cloned() else {
            return if machine.units_loaded {
                UnitAt::Unfollowed
            } else {
                UnitAt::Ignored
            };
        };
        let Some(unit) = machine.units_mut().get_mut(&name) else {
            return UnitAt::Ignored;
        };
        let was_failed = unit.active == "failed";
        let applied = unit.apply_signal(props);
        let failed_changed = was_failed != (unit.active == "failed");
        let unread = !unit.detail.read && crate::model::is_readable(&unit.active);
        if applied.shown {
            let unit = unit.clone();
            let row = machine.unit_row(&name, &unit);
            self.emit(Change::Units {
                machine: nkey.to_owned(),
                rows: vec![row],
                removed: Vec::new(),
                replace: false,
            });
        }
        UnitAt::Unit {
            name: name.to_string(),
            failed_changed,
            unread,
        }
    }

    /// Records what the machine's systemd manager reported; a new system state is a visible
    /// change of the machine's row.
    pub(crate) fn set_system(&self, nkey: &str, update: impl FnOnce(&mut SystemInfo)) {
        let mut m = self.write();
        if let Some(machine) = m.get_mut(nkey) {
            let before = machine.system.state.clone();
            update(&mut machine.system);
            if machine.system.state != before {
                self.emit(Change::Machine(machine.row(now_ms())));
            }
        }
    }

    /// The machine's units were read in full (or refreshed) as of `at_ms`.
    pub(crate) fn synced(&self, nkey: &str, at_ms: u64) {
        if let Some(machine) = self.write().get_mut(nkey) {
            machine.synced_ms = Some(at_ms);
        }
    }

    /// A `UnitNew(id, path)` signal: whether the unit is worth asking systemd about (followed,
    /// not known yet, on a machine whose units are loaded). Nothing is added until systemd
    /// says the unit is loaded ([`Store::add_unit`]): a UnitNew for a unit that does not exist
    /// comes and goes with every read of it.
    pub(crate) fn wants_unit(&self, nkey: &str, name: &str) -> bool {
        if !self.filter.allows(name) {
            return false;
        }
        let m = self.read();
        m.get(nkey)
            .is_some_and(|machine| machine.units_loaded && !machine.units().contains_key(name))
    }

    /// Adds (or refreshes) one unit from a ListUnits-style row. Returns whether it is followed.
    pub(crate) fn add_unit(&self, nkey: &str, u: Listed) -> bool {
        if !self.follows(&u) {
            return false;
        }
        let (name, unit) = listed(u);
        let mut m = self.write();
        let Some(machine) = m.get_mut(nkey) else {
            return false;
        };
        let unit = with_signalled(machine.units().get(&name), unit, 0);
        machine.insert_unit(name.clone(), unit.clone());
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
    pub(crate) fn unit_removed(&self, nkey: &str, name: &str) {
        let mut m = self.write();
        let Some(machine) = m.get_mut(nkey) else {
            return;
        };
        if machine.remove_unit(name).is_none() {
            return;
        }
        self.emit(Change::Units {
            machine: nkey.to_owned(),
            rows: Vec::new(),
            removed: vec![name.to_owned()],
            replace: false,
        });
    }

    pub(crate) fn set_agent_metrics(&self, nkey: &str, text: String) {
        if let Some(machine) = self.write().get_mut(nkey) {
            machine.agent_metrics = text;
        }
    }

    /// Calls `f` with the machines under the read lock (no copy).
    pub(crate) fn with_machines<R>(&self, f: impl FnOnce(&BTreeMap<String, Machine>) -> R) -> R {
        f(&self.read())
    }

    /// Calls `f` on each machine in turn, holding the read lock for one machine at a time, so
    /// that updates get in between (the lock lets waiting writers go first).
    pub(crate) fn each_machine(&self, mut f: impl FnMut(&Machine)) {
        let nkeys: Vec<String> = self.read().keys().cloned().collect();
        for nkey in nkeys {
            if let Some(m) = self.read().get(&nkey) {
                f(m);
            }
        }
    }

    pub(crate) fn machine_rows(&self, now_ms: u64) -> Vec<MachineRow> {
        self.read().values().map(|m| m.row(now_ms)).collect()
    }

    /// Fan-out targets: the named machines (unknown nkeys are returned separately), or all.
    pub(crate) fn targets(&self, nkeys: Option<&[String]>) -> (Vec<AgentStatus>, Vec<String>) {
        let now = now_ms();
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

    /// One machine as a fan-out target.
    pub(crate) fn target(&self, nkey: &str) -> Option<AgentStatus> {
        self.read().get(nkey).map(|m| m.status(now_ms()))
    }

    /// (object path, active state, StateChangeTimestamp) of one unit.
    pub(crate) fn unit_state(&self, nkey: &str, name: &str) -> Option<UnitState> {
        let m = self.read();
        let u = m.get(nkey)?.units().get(name)?;
        Some((u.path(name).into_owned(), u.active.to_string(), u.since_us))
    }

    /// (name, object path, active state) of a machine's units, once they are loaded.
    pub(crate) fn loaded_units(&self, nkey: &str) -> Option<Vec<(String, String, String)>> {
        let m = self.read();
        let machine = m.get(nkey).filter(|m| m.units_loaded)?;
        Some(
            machine
                .units()
                .iter()
                .map(|(n, u)| (n.to_string(), u.path(n).into_owned(), u.active.to_string()))
                .collect(),
        )
    }

    /// The machines that are running now.
    pub(crate) fn running_nkeys(&self) -> Vec<String> {
        let now = now_ms();
        self.read()
            .values()
            .filter(|m| m.state(now) == AgentState::Running)
            .map(|m| m.info.nkey.clone())
            .collect()
    }

    pub(crate) fn hostname(&self, nkey: &str) -> Option<String> {
        self.read().get(nkey).map(|m| m.info.hostname.clone())
    }
}

/// A unit listed by a request made after `mark`, with what signals and reads told of it before
/// (`old`), which ListUnits does not carry; a signal after `mark` is newer than the list.
fn with_signalled(old: Option<&Unit>, new: Unit, mark: u64) -> Unit {
    match old {
        None => new,
        Some(o) => {
            let listed = if o.signalled > mark {
                Unit {
                    odd_path: new.odd_path,
                    ..o.clone()
                }
            } else {
                new
            };
            let mut u = Unit {
                since_us: o.since_us,
                active_enter_us: o.active_enter_us,
                restarts: o.restarts,
                detail: o.detail.clone(),
                signalled: o.signalled,
                ..listed
            };
            if !crate::model::is_pinned(&u.active) {
                u.detail.tasks_current = None;
            }
            u
        }
    }
}

/// A unit as ListUnits describes it (what signals add comes on top), and its name.
fn listed(u: Listed) -> (Text, Unit) {
    let name = Text::from(u.name);
    let mut unit = Unit {
        description: u.description.into(),
        load: u.load.into(),
        active: u.active.into(),
        sub: u.sub.into(),
        ..Default::default()
    };
    unit.set_path(&name, &u.path);
    (name, unit)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::changes::Interest;
    use crate::model::DEFAULT_EXCLUDE;
    use cbus_protocol::presence::AgentInfo;

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
            rtt_ms: None,
        }
    }

    pub(crate) fn ev(kind: PresenceKind, nkey: &str, started: u64) -> PresenceEvent {
        PresenceEvent {
            event: kind,
            sent_at_ms: 0,
            agent: info(nkey, started),
        }
    }

    pub(crate) fn store() -> (Store, Router) {
        let router = Router::default();
        let s = Store::new(
            UnitFilter::new(".+", DEFAULT_EXCLUDE).unwrap(),
            router.clone(),
        );
        (s, router)
    }

    fn listing(name: &str, active: &str, path: &str) -> Listed {
        Listed {
            name: name.into(),
            description: name.to_uppercase(),
            load: "loaded".into(),
            active: active.into(),
            sub: "running".into(),
            path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn joins_and_restarts() {
        let (c, _) = store();
        let now = now_ms();
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

    /// Machines known to the store, to reload them all (after the gateway's own reconnect).
    #[test]
    fn all_nkeys() {
        let (c, _) = store();
        c.presence(ev(PresenceKind::Hello, "A", 1), now_ms());
        assert_eq!(c.running_nkeys(), vec!["A".to_owned()]);
    }

    #[test]
    fn unit_rows_by_prefix_are_the_names_that_start_with_it() {
        let (c, _) = store();
        c.presence(ev(PresenceKind::Hello, "A", 1), now_ms());
        let names = ["a.service", "ab.service", "b.service", "ssh.service"];
        let list = names.iter().map(|n| listing(n, "active", "/u")).collect();
        c.replace_units("A", list, crate::model::signal_mark());
        let rows = |prefix: &str| -> Vec<String> {
            let rows = c.unit_rows(|_| true, prefix, |n| !n.ends_with("b.service"));
            rows.into_iter().map(|r| r.name.to_string()).collect()
        };
        assert_eq!(rows("a"), ["a.service"], "the filter still applies");
        assert_eq!(rows(""), ["a.service", "ssh.service"]);
        assert_eq!(rows("ssh."), ["ssh.service"]);
        assert!(rows("z").is_empty());
    }

    #[test]
    fn units_follow_updates_and_publish_changes() {
        let (c, router) = store();
        let mut rx = router.subscribe(Interest::everything(), 64);
        let now = now_ms();
        c.presence(ev(PresenceKind::Hello, "A", 1), now);
        c.replace_units(
            "A",
            vec![
                listing("a.service", "active", "/u/a"),
                listing("b.mount", "active", "/u/b"),
            ],
            crate::model::signal_mark(),
        );
        let units = |c: &Store| c.with_machines(|m| m["A"].units().clone());
        assert_eq!(units(&c).len(), 1, "mounts are excluded by default");
        assert_eq!(
            c.patch_unit_at(
                "A",
                "/u/a",
                &[
                    UnitProp::ActiveState("inactive".into()),
                    UnitProp::StateChangeTimestamp(Some(1_700_000_000_000_000))
                ]
            ),
            UnitAt::Unit {
                name: "a.service".into(),
                failed_changed: false,
                unread: false,
            }
        );
        assert_eq!(c.patch_unit_at("A", "/u/x", &[]), UnitAt::Unfollowed);
        assert_eq!(c.patch_unit_at("B", "/u/a", &[]), UnitAt::Ignored);
        let u = &units(&c)["a.service"];
        assert_eq!(u.active, "inactive");
        assert_eq!(u.since_us, Some(1_700_000_000_000_000));
        c.patch_units(
            "A",
            &[("a.service".into(), vec![UnitProp::NRestarts(Some(3))])],
            crate::model::signal_mark(),
        );
        assert_eq!(units(&c)["a.service"].restarts, Some(3));
        assert!(c.wants_unit("A", "c.service"));
        assert!(c.add_unit("A", listing("c.service", "active", "/u/c")));
        assert!(!c.wants_unit("A", "c.service"));
        assert!(!c.wants_unit("A", "d.scope"));
        let mut not_found = listing("e.service", "inactive", "/u/e");
        not_found.load = "not-found".into();
        assert!(!c.add_unit("A", not_found));
        c.unit_removed("A", "c.service");
        assert!(!units(&c).contains_key("c.service"));

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

    /// systemd's paths are derived from the names, other reported paths kept: signals find
    /// their unit either way, and rows show the path the machine reported.
    #[test]
    fn signals_find_units_by_the_path_their_machine_reported() {
        let (c, _) = store();
        c.presence(ev(PresenceKind::Hello, "A", 1), now_ms());
        let usual = cbus_client::systemd::unit_path("a.service");
        c.replace_units(
            "A",
            vec![
                listing("a.service", "active", &usual),
                listing("b.service", "active", "/u/b"),
            ],
            crate::model::signal_mark(),
        );
        let failed = [UnitProp::ActiveState("failed".into())];
        for (path, name) in [(usual.as_str(), "a.service"), ("/u/b", "b.service")] {
            assert!(
                matches!(c.patch_unit_at("A", path, &failed), UnitAt::Unit { name: n, .. } if n == name),
                "{path}"
            );
            let (at, active, _) = c.unit_state("A", name).unwrap();
            assert_eq!((at.as_str(), active.as_str()), (path, "failed"));
        }
        let b_usual = cbus_client::systemd::unit_path("b.service");
        assert_eq!(c.patch_unit_at("A", &b_usual, &failed), UnitAt::Unfollowed);
        let paths: Vec<String> = c
            .unit_rows(|_| true, "", |_| true)
            .iter()
            .map(|r| r.unit.path(&r.name).into_owned())
            .collect();
        assert_eq!(paths, [usual.as_str(), "/u/b"]);
        let loaded = c.loaded_units("A").unwrap();
        assert_eq!(
            loaded[1],
            ("b.service".into(), "/u/b".into(), "failed".into())
        );
        // Listed again at systemd's path, then removed: found by that, then by nothing.
        assert!(c.add_unit("A", listing("b.service", "active", &b_usual)));
        assert!(matches!(
            c.patch_unit_at("A", &b_usual, &[]),
            UnitAt::Unit { .. }
        ));
        assert_eq!(c.patch_unit_at("A", "/u/b", &[]), UnitAt::Unfollowed);
        c.unit_removed("A", "b.service");
        assert_eq!(c.patch_unit_at("A", &b_usual, &[]), UnitAt::Unfollowed);
    }

    #[test]
    fn a_list_or_read_from_before_a_signal_does_not_undo_it() {
        let (c, _) = store();
        c.presence(ev(PresenceKind::Hello, "A", 1), now_ms());
        c.replace_units(
            "A",
            vec![listing("a.service", "active", "/u/a")],
            crate::model::signal_mark(),
        );
        let mark = crate::model::signal_mark();
        // A signal arrives while a ListUnits and reads asked for before it are under way.
        let at = c.patch_unit_at(
            "A",
            "/u/a",
            &[
                UnitProp::ActiveState("failed".into()),
                UnitProp::NRestarts(Some(2)),
            ],
        );
        assert!(matches!(
            at,
            UnitAt::Unit {
                failed_changed: true,
                unread: true,
                ..
            }
        ));
        c.replace_units("A", vec![listing("a.service", "active", "/u/a")], mark);
        c.patch_units(
            "A",
            &[(
                "a.service".into(),
                vec![UnitProp::NRestarts(Some(1)), UnitProp::TasksMax(Some(9))],
            )],
            mark,
        );
        let u = c.with_machines(|m| m["A"].units()["a.service"].clone());
        assert_eq!((u.active.as_str(), u.restarts), ("failed", Some(2)));
        assert_eq!(u.detail.tasks_max, Some(9), "unsignalled values are taken");
    }

    #[test]
    fn silence_turns_unresponsive_once() {
        let (c, router) = store();
        let now = now_ms();
        c.presence(ev(PresenceKind::Hello, "A", 1), now);
        let mut rx = router.subscribe(Interest::everything(), 64);
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
}
