//! The unit properties the store follows, read from what systemd sends with the client's
//! variant rule (`cbus_client::systemd`), as the fleet model's [`UnitProp`]s.
//!
//! Which of them systemd signals is its introspection's `EmitsChangedSignal` (systemd 252,
//! checked with `busctl introspect` on a unit): ActiveState, SubState, the timestamps,
//! NRestarts, a timer's LastTriggerUSec and a mount's Type emit PropertiesChanged; LoadState and
//! a service's Type are constant until a daemon-reload; UnitFileState, TasksCurrent, TasksMax, a
//! socket's NAccepted / NConnections / NRefused and the Manager's SystemState change without
//! any signal, so they are read on load and refreshed ([`super::refresh`]).

use cbus_client::systemd::{as_u64, unvariant, PropertiesChanged, SERVICE, UNIT};
use serde_json::Value;

use crate::intern::Text;
use crate::model::{is_pinned, unit_type, UnitProp};

pub(super) const SOCKET: &str = "org.freedesktop.systemd1.Socket";
pub(super) const TIMER: &str = "org.freedesktop.systemd1.Timer";
pub(super) const MOUNT: &str = "org.freedesktop.systemd1.Mount";

/// Unit properties followed through PropertiesChanged, on [`UNIT`].
const UNIT_PROPS: [&str; 6] = [
    "ActiveState",
    "SubState",
    "LoadState",
    "Description",
    "StateChangeTimestamp",
    "ActiveEnterTimestamp",
];
/// Service properties followed through PropertiesChanged, on [`SERVICE`].
const SERVICE_PROPS: [&str; 1] = ["NRestarts"];
const TIMER_PROPS: [&str; 1] = ["LastTriggerUSec"];
const MOUNT_PROPS: [&str; 1] = ["Type"];

/// A `u` property, as node_exporter reads it.
fn as_u32(v: &Value) -> Option<u32> {
    as_u64(v).and_then(|n| u32::try_from(n).ok())
}

/// Label-like values (a Type, a UnitFileState) are a word in systemd; an agent's longer one is
/// cut here, so a hostile machine cannot make every scrape carry its megabytes.
const WORD_MAX: usize = 64;

pub(super) fn word(v: &Value) -> String {
    let s = unvariant(v).as_str().unwrap_or_default();
    match s.char_indices().nth(WORD_MAX) {
        Some((end, _)) => s[..end].to_owned(),
        None => s.to_owned(),
    }
}

/// What to read of a unit (interface, property) with targeted gets: everything signals do not
/// bring (`full`, on load and for a new unit), or only what changes without a signal (a
/// refresh). A refresh reads only units in a pinned state (reading an object loads its unit;
/// these systemd cannot unload meanwhile), and those are the ones whose counts move.
pub(super) fn reads(name: &str, active: &str, full: bool) -> Vec<(&'static str, &'static str)> {
    let kind = unit_type(name);
    let pinned = is_pinned(active);
    let mut r = Vec::new();
    if full {
        r.push((UNIT, "StateChangeTimestamp"));
        r.push((UNIT, "UnitFileState"));
        if active == "active" {
            r.push((UNIT, "ActiveEnterTimestamp"));
        }
        match kind {
            "service" => r.extend([
                (SERVICE, "NRestarts"),
                (SERVICE, "Type"),
                (SERVICE, "TasksMax"),
            ]),
            "mount" => r.push((MOUNT, "Type")),
            "timer" => r.push((TIMER, "LastTriggerUSec")),
            _ => {}
        }
    } else if !pinned {
        return r;
    }
    match kind {
        "service" if pinned => r.push((SERVICE, "TasksCurrent")),
        "socket" => r.extend([
            (SOCKET, "NAccepted"),
            (SOCKET, "NConnections"),
            (SOCKET, "NRefused"),
        ]),
        _ => {}
    }
    r
}

/// A property value the store follows; `None` for other properties.
pub(super) fn unit_prop(name: &str, v: &Value) -> Option<UnitProp> {
    let text = || Text::from(unvariant(v).as_str().unwrap_or_default());
    // 0 means "never" for systemd's timestamps.
    let timestamp = || as_u64(v).filter(|t| *t > 0);
    Some(match name {
        "ActiveState" => UnitProp::ActiveState(text()),
        "SubState" => UnitProp::SubState(text()),
        "LoadState" => UnitProp::LoadState(text()),
        "Description" => UnitProp::Description(text()),
        "StateChangeTimestamp" => UnitProp::StateChangeTimestamp(timestamp()),
        "ActiveEnterTimestamp" => UnitProp::ActiveEnterTimestamp(timestamp()),
        "NRestarts" => UnitProp::NRestarts(as_u64(v).map(|n| n.min(u64::from(u32::MAX)) as u32)),
        "Type" => UnitProp::Type(word(v).into()),
        "UnitFileState" => UnitProp::UnitFileState(word(v).into()),
        // systemd's "no value" for counts is u64::MAX (no cgroup, no limit): node_exporter
        // leaves such a series out, so does cbus.
        "TasksCurrent" => UnitProp::TasksCurrent(as_u64(v).filter(|n| *n != u64::MAX)),
        "TasksMax" => UnitProp::TasksMax(as_u64(v).filter(|n| *n != u64::MAX)),
        "NAccepted" => UnitProp::NAccepted(as_u32(v)),
        "NConnections" => UnitProp::NConnections(as_u32(v)),
        "NRefused" => UnitProp::NRefused(as_u32(v)),
        // 0 (never triggered) is a value here: node_exporter exports it as 0.
        "LastTriggerUSec" => UnitProp::LastTriggerUSec(as_u64(v)),
        _ => return None,
    })
}

/// What a unit's PropertiesChanged means for the store.
#[derive(Debug, PartialEq)]
pub(super) struct UnitChange {
    pub interface: &'static str,
    /// Followed values it carries.
    pub changed: Vec<UnitProp>,
    /// Followed properties it only invalidated: they must be read back.
    pub invalidated: Vec<&'static str>,
}

/// The followed part of a PropertiesChanged; `None` for interfaces the store does not follow.
pub(super) fn unit_change(signal: &PropertiesChanged) -> Option<UnitChange> {
    let (interface, followed): (&'static str, &[&'static str]) = match signal.interface.as_str() {
        UNIT => (UNIT, &UNIT_PROPS),
        SERVICE => (SERVICE, &SERVICE_PROPS),
        TIMER => (TIMER, &TIMER_PROPS),
        MOUNT => (MOUNT, &MOUNT_PROPS),
        _ => return None,
    };
    Some(UnitChange {
        interface,
        changed: signal
            .changed
            .iter()
            .filter(|(k, _)| followed.contains(&k.as_str()))
            .filter_map(|(k, v)| unit_prop(k, v))
            .collect(),
        invalidated: signal
            .invalidated
            .iter()
            .filter_map(|p| followed.iter().find(|f| **f == p).copied())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_unwrap_as_the_agent_sends_them() {
        assert_eq!(
            unit_prop("ActiveState", &json!({"t": "s", "v": "inactive"})),
            Some(UnitProp::ActiveState("inactive".into()))
        );
        assert_eq!(
            unit_prop(
                "StateChangeTimestamp",
                &json!({"t":"t","v":"1700000000000000"})
            ),
            Some(UnitProp::StateChangeTimestamp(Some(1_700_000_000_000_000)))
        );
        assert_eq!(
            unit_prop("ActiveEnterTimestamp", &json!(0)),
            Some(UnitProp::ActiveEnterTimestamp(None))
        );
        assert_eq!(
            unit_prop("NRestarts", &json!(3)),
            Some(UnitProp::NRestarts(Some(3)))
        );
        assert_eq!(unit_prop("Foo", &json!(3)), None);
        let max = json!({"t": "t", "v": u64::MAX.to_string()});
        assert_eq!(
            unit_prop("TasksCurrent", &max),
            Some(UnitProp::TasksCurrent(None))
        );
        assert_eq!(
            unit_prop("TasksMax", &json!({"t": "t", "v": "28908"})),
            Some(UnitProp::TasksMax(Some(28908)))
        );
        assert_eq!(
            unit_prop("LastTriggerUSec", &json!({"t": "t", "v": "0"})),
            Some(UnitProp::LastTriggerUSec(Some(0)))
        );
        assert_eq!(
            unit_prop("Type", &json!({"t": "s", "v": "oneshot"})),
            Some(UnitProp::Type("oneshot".into()))
        );
    }

    #[test]
    fn reads_by_kind_and_state() {
        let full = reads("a.service", "active", true);
        for p in [
            "StateChangeTimestamp",
            "UnitFileState",
            "ActiveEnterTimestamp",
            "NRestarts",
        ] {
            assert!(full.iter().any(|(_, q)| *q == p), "{p}");
        }
        assert!(full.contains(&(SERVICE, "TasksCurrent")));
        let stopped = reads("a.service", "inactive", true);
        assert!(!stopped
            .iter()
            .any(|(_, q)| *q == "TasksCurrent" || *q == "ActiveEnterTimestamp"));
        assert_eq!(
            reads("a.service", "active", false),
            [(SERVICE, "TasksCurrent")]
        );
        assert!(
            reads("a.service", "inactive", false).is_empty(),
            "loads nothing"
        );
        assert_eq!(reads("a.socket", "active", false).len(), 3);
        assert!(reads("a.timer", "active", false).is_empty(), "signalled");
        assert!(reads("a.timer", "active", true).contains(&(TIMER, "LastTriggerUSec")));
        assert_eq!(word(&json!("x".repeat(1000))).len(), WORD_MAX);
    }

    #[test]
    fn only_followed_properties_count() {
        let args = json!([UNIT, {"ActiveState": {"t":"s","v":"inactive"},
            "StateChangeTimestamp": {"t":"t","v":"1700000000000000"}}, ["SubState", "Foo"]]);
        let c = unit_change(&PropertiesChanged::from_args(&args).unwrap()).unwrap();
        assert_eq!(c.interface, UNIT);
        assert_eq!(c.changed.len(), 2);
        assert_eq!(c.invalidated, ["SubState"]);
        let other = PropertiesChanged::from_args(&json!(["org.x.Other", {}, []])).unwrap();
        assert!(unit_change(&other).is_none());
    }
}
