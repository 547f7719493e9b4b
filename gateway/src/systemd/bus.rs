//! systemd's D-Bus API as the gateway uses it: Manager calls, and the values agents relay
//! turned into the fleet model's types (ListUnits rows, unit property values, PropertiesChanged
//! payloads).

use cbus_client::fleet::Query;
use cbus_protocol::{Op, Request};
use serde_json::{json, Value};

use crate::model::{UnitListing, UnitProp};

/// systemd's bus name, manager object and interfaces.
pub(crate) const SYSTEMD: &str = "org.freedesktop.systemd1";
pub(crate) const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER_IFACE: &str = "org.freedesktop.systemd1.Manager";
pub(crate) const UNIT_IFACE: &str = "org.freedesktop.systemd1.Unit";
pub(crate) const SERVICE_IFACE: &str = "org.freedesktop.systemd1.Service";
/// Unit properties the store follows, on [`UNIT_IFACE`].
const UNIT_PROPS: [&str; 6] = [
    "ActiveState",
    "SubState",
    "LoadState",
    "Description",
    "StateChangeTimestamp",
    "ActiveEnterTimestamp",
];
/// Service properties the store follows, on [`SERVICE_IFACE`].
const SERVICE_PROPS: [&str; 1] = ["NRestarts"];

/// A systemd Manager method call with a known signature.
pub(crate) fn manager_call(method: &str, args: Value, signature: &str) -> Query {
    Query {
        destination: SYSTEMD.into(),
        path: SYSTEMD_PATH.into(),
        op: Op::Call,
        member: Some(method.into()),
        request: Request {
            interface: Some(MANAGER_IFACE.into()),
            args: Some(args),
            signature: Some(signature.into()),
            ..Default::default()
        },
    }
}

/// `StartUnit`/`StopUnit`/`RestartUnit` with mode "replace".
pub(crate) fn unit_job(method: &str, unit: &str) -> Query {
    manager_call(method, json!([unit, "replace"]), "ss")
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

/// A property value the store follows; `None` for other properties.
pub(crate) fn unit_prop(name: &str, v: &Value) -> Option<UnitProp> {
    let text = || plain(v).as_str().unwrap_or_default().to_owned();
    Some(match name {
        "ActiveState" => UnitProp::ActiveState(text()),
        "SubState" => UnitProp::SubState(text()),
        "LoadState" => UnitProp::LoadState(text()),
        "Description" => UnitProp::Description(text()),
        "StateChangeTimestamp" => UnitProp::StateChangeTimestamp(as_u64(v).filter(|t| *t > 0)),
        "ActiveEnterTimestamp" => UnitProp::ActiveEnterTimestamp(as_u64(v).filter(|t| *t > 0)),
        "NRestarts" => UnitProp::NRestarts(as_u64(v).map(|n| n.min(u64::from(u32::MAX)) as u32)),
        _ => return None,
    })
}

/// One ListUnits row (`(ssssssouso)` as JSON).
pub(crate) fn listing(row: &Value) -> UnitListing {
    let field = |i: usize| row.get(i).and_then(Value::as_str).unwrap_or("").to_owned();
    UnitListing {
        name: field(0),
        description: field(1),
        load: field(2),
        active: field(3),
        sub: field(4),
        path: field(6),
    }
}

/// The rows of a ListUnits or ListUnitsByPatterns reply (`[a(ssssssouso)]` as JSON).
pub(crate) fn list_units(reply: &Value) -> Option<Vec<UnitListing>> {
    let rows = reply.get(0)?;
    Some(rows.as_array().into_iter().flatten().map(listing).collect())
}

/// A PropertiesChanged signal on a unit's object.
#[derive(Debug, PartialEq)]
pub(crate) struct PropertiesChanged {
    pub interface: &'static str,
    /// Followed values it carries.
    pub changed: Vec<UnitProp>,
    /// Followed properties it only invalidated: they must be read back.
    pub invalidated: Vec<&'static str>,
}

/// Parses a PropertiesChanged payload (`[iface, {prop: {t, v}}, [invalidated]]`); `None` for
/// interfaces whose properties the store does not follow.
pub(crate) fn properties_changed(args: &Value) -> Option<PropertiesChanged> {
    let (interface, followed): (&'static str, &[&'static str]) =
        match args.get(0).and_then(Value::as_str)? {
            UNIT_IFACE => (UNIT_IFACE, &UNIT_PROPS),
            SERVICE_IFACE => (SERVICE_IFACE, &SERVICE_PROPS),
            _ => return None,
        };
    let changed = args
        .get(1)
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| unit_prop(k, v))
        .collect();
    let invalidated = args
        .get(2)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter_map(|p| followed.iter().find(|f| **f == p).copied())
        .collect();
    Some(PropertiesChanged {
        interface,
        changed,
        invalidated,
    })
}

/// A glob matching exactly `name` (ListUnitsByPatterns takes fnmatch patterns).
pub(crate) fn glob_literal(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '*' | '?' | '[' | ']') {
            out.push('[');
            out.push(c);
            out.push(']');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_jobs_replace() {
        let q = unit_job("RestartUnit", "nginx.service");
        assert_eq!(q.member.as_deref(), Some("RestartUnit"));
        assert_eq!(q.request.args, Some(json!(["nginx.service", "replace"])));
        assert_eq!(q.request.signature.as_deref(), Some("ss"));
        assert!(q.request.check_for(Op::Call).is_ok());
    }

    #[test]
    fn globs() {
        assert_eq!(glob_literal("a*b?[c]"), "a[*]b[?][[]c[]]");
    }

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
    fn signals_and_lists_parse() {
        let pc = properties_changed(
            &json!([UNIT_IFACE, {"ActiveState": {"t":"s","v":"inactive"},
            "StateChangeTimestamp": {"t":"t","v":"1700000000000000"}}, ["SubState", "Foo"]]),
        )
        .unwrap();
        assert_eq!(pc.interface, UNIT_IFACE);
        assert_eq!(pc.changed.len(), 2);
        assert_eq!(pc.invalidated, ["SubState"]);
        assert!(properties_changed(&json!(["org.x.Other", {}, []])).is_none());
        let rows = list_units(&json!([[[
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
        ]]]))
        .unwrap();
        assert_eq!(rows[0].name, "a.service");
        assert_eq!(rows[0].path, "/u/a");
        assert_eq!(rows[0].sub, "running");
    }
}
