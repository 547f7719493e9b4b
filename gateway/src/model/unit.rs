//! A unit as the gateway knows it: its state, what systemd's property values do to it, and
//! which units are followed. Its words are [`Text`]s, shared between units
//! ([`crate::intern`]), and its object path is derived from its name unless the machine
//! reported another.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use cbus_client::systemd::unit_path;
use regex::Regex;

use crate::intern::Text;

/// One unit's state. Its words are [`Text`]s, shared with every other unit that has the same
/// ones (a fleet's units mostly do).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unit {
    pub description: Text,
    pub load: Text,
    pub active: Text,
    pub sub: Text,
    /// The object path the machine reported for the unit (ListUnits) when it is not the one
    /// systemd gives the unit's name ([`Unit::path`]); `None` for that one, which is derived
    /// from the name instead of kept: every unit on a real systemd.
    pub odd_path: Option<Box<str>>,
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
    pub kind: Text,
    /// UnitFileState (`enabled`, `static`, `disabled`…); empty while unknown.
    pub unit_file_state: Text,
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
    ActiveState(Text),
    SubState(Text),
    LoadState(Text),
    Description(Text),
    /// Microseconds since the epoch; `None` for 0 (never) or an unreadable value.
    StateChangeTimestamp(Option<u64>),
    ActiveEnterTimestamp(Option<u64>),
    NRestarts(Option<u32>),
    /// A service's or mount's `Type`.
    Type(Text),
    UnitFileState(Text),
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
    /// The unit's object path, given its name: the one the machine reported, which is
    /// systemd's for the name ([`unit_path`]) unless [`Unit::odd_path`] says otherwise.
    pub fn path(&self, name: &str) -> Cow<'_, str> {
        match &self.odd_path {
            Some(path) => Cow::Borrowed(path),
            None => Cow::Owned(unit_path(name)),
        }
    }

    /// Records `path` as the object path the machine reported for the unit `name`: kept only
    /// when it is not systemd's for that name.
    pub(crate) fn set_path(&mut self, name: &str, path: &str) {
        self.odd_path = (unit_path(name) != path).then(|| path.into());
    }

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
