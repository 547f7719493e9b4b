//! The change hub: what changed in the fleet state or a followed object ([`Change`]), and the
//! router that hands each change to the sessions that follow it.
//!
//! A broadcast channel made every session wake for every change and filter it itself: 1,000
//! sessions at 10k unit changes/s were 10M receives/s, most of them thrown away
//! (docs/benchmarks.md). The router keeps, per machine, the sessions that follow it, so a change
//! costs what it is delivered to.
//!
//! Each session has a bounded queue. When it is full the change is dropped for that session and
//! the session is told it lagged ([`Lagged`]); it then throws away what is still queued (older
//! than what it dropped) and resends snapshots, which are taken after the drop and so include it.
//! Memory per session is bounded whatever its speed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::model::{MachineRow, UnitRow};

/// Something clients may want to hear about.
#[derive(Debug, Clone)]
pub(crate) enum Change {
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

/// A D-Bus object clients follow.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ObjectKey {
    pub machine: String,
    pub dest: String,
    pub path: String,
    pub interface: Option<String>,
}

/// A change of a followed object.
#[derive(Debug, Clone)]
pub(crate) struct ObjectChange {
    pub key: ObjectKey,
    pub kind: ObjectChangeKind,
}

#[derive(Debug, Clone)]
pub(crate) enum ObjectChangeKind {
    /// Loaded (or failed to load): clients send a fresh snapshot.
    Reset,
    /// Property values changed (`{"t","v"}` each).
    Props {
        interface: String,
        changed: Map<String, Value>,
    },
}

/// Which changes a session wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Interest {
    /// Machine rows (presence, info, state).
    pub machine_rows: bool,
    /// Unit and object changes of every machine.
    pub all_machines: bool,
    /// Unit and object changes of these machines (by nkey).
    pub machines: HashSet<String>,
}

impl Interest {
    /// Every change.
    #[cfg(test)]
    pub(crate) fn everything() -> Self {
        Interest {
            machine_rows: true,
            all_machines: true,
            machines: HashSet::new(),
        }
    }
}

/// Returned by [`ChangeReceiver::recv`] when changes were dropped for this session.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Lagged;

struct Route {
    tx: mpsc::Sender<Arc<Change>>,
    lagged: Arc<AtomicBool>,
    interest: Interest,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    routes: HashMap<u64, Route>,
    /// Sessions following one machine.
    by_machine: HashMap<String, HashSet<u64>>,
    all_machines: HashSet<u64>,
    machine_rows: HashSet<u64>,
}

impl Table {
    fn index(&mut self, id: u64, interest: &Interest) {
        if interest.machine_rows {
            self.machine_rows.insert(id);
        }
        if interest.all_machines {
            self.all_machines.insert(id);
        }
        for m in &interest.machines {
            self.by_machine.entry(m.clone()).or_default().insert(id);
        }
    }

    fn unindex(&mut self, id: u64, interest: &Interest) {
        self.machine_rows.remove(&id);
        self.all_machines.remove(&id);
        for m in &interest.machines {
            if let Some(set) = self.by_machine.get_mut(m) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_machine.remove(m);
                }
            }
        }
    }

    fn deliver(&self, id: u64, change: &Arc<Change>) {
        if let Some(route) = self.routes.get(&id) {
            if let Err(mpsc::error::TrySendError::Full(_)) = route.tx.try_send(change.clone()) {
                route.lagged.store(true, Ordering::Release);
            }
        }
    }
}

/// The routing table; cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Router {
    table: Arc<Mutex<Table>>,
}

impl Router {
    fn table(&self) -> MutexGuard<'_, Table> {
        // Every update leaves the maps consistent, so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver of the changes `interest` selects, queueing at most `capacity` of them.
    pub(crate) fn subscribe(&self, interest: Interest, capacity: usize) -> ChangeReceiver {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let lagged = Arc::new(AtomicBool::new(false));
        let mut t = self.table();
        let id = t.next_id;
        t.next_id += 1;
        t.index(id, &interest);
        t.routes.insert(
            id,
            Route {
                tx,
                lagged: lagged.clone(),
                interest,
            },
        );
        ChangeReceiver {
            id,
            rx,
            lagged,
            router: self.clone(),
        }
    }

    /// Hands a change to every session that follows it, without waiting for any.
    pub(crate) fn publish(&self, change: Change) {
        let t = self.table();
        let change = Arc::new(change);
        let machine = match &*change {
            Change::Machine(_) => {
                for id in &t.machine_rows {
                    t.deliver(*id, &change);
                }
                return;
            }
            Change::Units { machine, .. } => machine,
            Change::Object(o) => &o.key.machine,
        };
        for id in &t.all_machines {
            t.deliver(*id, &change);
        }
        for id in t.by_machine.get(machine).into_iter().flatten() {
            if !t.all_machines.contains(id) {
                t.deliver(*id, &change);
            }
        }
    }

    /// Sessions subscribed now.
    #[cfg(test)]
    pub(crate) fn sessions(&self) -> usize {
        self.table().routes.len()
    }
}

/// One session's end of the router; unsubscribes when dropped.
pub(crate) struct ChangeReceiver {
    id: u64,
    rx: mpsc::Receiver<Arc<Change>>,
    lagged: Arc<AtomicBool>,
    router: Router,
}

impl ChangeReceiver {
    /// The next change, or [`Lagged`] once after changes were dropped (what was still queued
    /// is discarded then: it is older than what was dropped).
    pub(crate) async fn recv(&mut self) -> Result<Arc<Change>, Lagged> {
        if self.take_lagged() {
            return Err(Lagged);
        }
        // Never closed: this receiver's own route holds the sender until drop.
        let change = self.rx.recv().await.ok_or(Lagged)?;
        if self.take_lagged() {
            return Err(Lagged);
        }
        Ok(change)
    }

    /// A change already queued, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Result<Arc<Change>, Lagged>> {
        if self.take_lagged() {
            return Some(Err(Lagged));
        }
        self.rx.try_recv().ok().map(Ok)
    }

    fn take_lagged(&mut self) -> bool {
        if !self.lagged.swap(false, Ordering::AcqRel) {
            return false;
        }
        while self.rx.try_recv().is_ok() {}
        true
    }

    /// What changes the session to follow other changes; usable while this receiver waits.
    pub(crate) fn interest_handle(&self) -> InterestHandle {
        InterestHandle {
            id: self.id,
            router: self.router.clone(),
        }
    }
}

/// Changes what one [`ChangeReceiver`] follows.
pub(crate) struct InterestHandle {
    id: u64,
    router: Router,
}

impl InterestHandle {
    /// Follows other changes from now on.
    pub(crate) fn set(&self, interest: Interest) {
        let mut t = self.router.table();
        let Some(old) = t.routes.get(&self.id).map(|r| r.interest.clone()) else {
            return;
        };
        if old == interest {
            return;
        }
        t.unindex(self.id, &old);
        t.index(self.id, &interest);
        if let Some(route) = t.routes.get_mut(&self.id) {
            route.interest = interest;
        }
    }
}

impl Drop for ChangeReceiver {
    fn drop(&mut self) {
        let mut t = self.router.table();
        if let Some(route) = t.routes.remove(&self.id) {
            t.unindex(self.id, &route.interest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MachineRow, UnitRow};

    fn units(machine: &str, name: &str) -> Change {
        Change::Units {
            machine: machine.into(),
            rows: vec![UnitRow {
                machine: machine.into(),
                host: "h".into(),
                name: name.into(),
                unit: Default::default(),
            }],
            removed: Vec::new(),
            replace: false,
        }
    }

    fn name(c: &Change) -> String {
        match c {
            Change::Units { rows, .. } => rows[0].name.to_string(),
            other => format!("{other:?}"),
        }
    }

    fn only(machine: &str) -> Interest {
        Interest {
            machines: HashSet::from([machine.to_owned()]),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn changes_reach_only_the_sessions_that_follow_the_machine() {
        let r = Router::default();
        let mut a = r.subscribe(only("A"), 8);
        let mut b = r.subscribe(only("B"), 8);
        let mut all = r.subscribe(Interest::everything(), 8);
        r.publish(units("A", "a1"));
        r.publish(units("B", "b1"));
        assert_eq!(name(&a.recv().await.unwrap()), "a1");
        assert!(a.try_recv().is_none());
        assert_eq!(name(&b.recv().await.unwrap()), "b1");
        assert_eq!(name(&all.recv().await.unwrap()), "a1");
        assert_eq!(name(&all.recv().await.unwrap()), "b1");

        // A session that also names a machine it follows via all_machines gets it once.
        a.interest_handle().set(Interest {
            all_machines: true,
            ..only("A")
        });
        r.publish(units("A", "a2"));
        assert_eq!(name(&a.recv().await.unwrap()), "a2");
        assert!(a.try_recv().is_none());
        assert_eq!(name(&all.recv().await.unwrap()), "a2");

        drop(b);
        assert_eq!(r.sessions(), 2);
        r.publish(units("B", "b2"));
        assert_eq!(name(&all.recv().await.unwrap()), "b2");
    }

    #[tokio::test]
    async fn a_full_queue_reports_lagged_once_and_discards_older_changes() {
        let r = Router::default();
        let mut s = r.subscribe(only("A"), 2);
        for i in 0..5 {
            r.publish(units("A", &format!("u{i}")));
        }
        assert!(matches!(s.recv().await, Err(Lagged)));
        assert!(
            s.try_recv().is_none(),
            "queued changes older than the drop are gone"
        );
        r.publish(units("A", "u5"));
        assert_eq!(name(&s.recv().await.unwrap()), "u5");
    }

    #[tokio::test]
    async fn machine_rows_go_to_those_who_asked() {
        let r = Router::default();
        let mut units_only = r.subscribe(only("A"), 8);
        let mut rows = r.subscribe(
            Interest {
                machine_rows: true,
                ..Default::default()
            },
            8,
        );
        r.publish(Change::Machine(MachineRow {
            nkey: "A".into(),
            hostname: "a".into(),
            version: "0".into(),
            bus: "system".into(),
            bus_connected: true,
            labels: Default::default(),
            started_at_ms: 1,
            heartbeat_ms: 1000,
            state: cbus_protocol::presence::AgentState::Running,
            last_seen_ms: 1,
            units: 0,
            units_loaded: false,
            maintenance: None,
            system_state: None,
        }));
        assert!(units_only.try_recv().is_none());
        assert!(matches!(
            rows.try_recv(),
            Some(Ok(c)) if matches!(*c, Change::Machine(_))
        ));
    }
}
