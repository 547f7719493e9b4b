//! The unit properties the store follows, read from what systemd sends with the client's
//! variant rule (`cbus_client::systemd`), as the fleet model's [`UnitProp`]s.

use cbus_client::systemd::{as_u64, unvariant, PropertiesChanged, SERVICE, UNIT};
use serde_json::Value;

use crate::model::UnitProp;

/// Unit properties the store follows, on [`UNIT`].
const UNIT_PROPS: [&str; 6] = [
    "ActiveState",
    "SubState",
    "LoadState",
    "Description",
    "StateChangeTimestamp",
    "ActiveEnterTimestamp",
];
/// Service properties the store follows, on [`SERVICE`].
const SERVICE_PROPS: [&str; 1] = ["NRestarts"];

/// A property value the store follows; `None` for other properties.
pub(super) fn unit_prop(name: &str, v: &Value) -> Option<UnitProp> {
    let text = || unvariant(v).as_str().unwrap_or_default().to_owned();
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
        _ => return None,
    };
    Some(UnitChange {
        interface,
        changed: signal
            .changed
            .iter()
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
