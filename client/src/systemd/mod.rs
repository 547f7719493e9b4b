//! systemd over cbus, for every requester: the CLI's `units`, `status` and `start|stop|...`
//! and the gateway's unit cache ask the same Manager methods, read the same `ListUnits` rows,
//! check unit names by the same rules and trust the same signals. They used to do each of these
//! on their own, and had drifted (a call with a signature and one without, three `ListUnits`
//! parsers, two variant rules, two length limits).
//!
//! - [`manager`]: Manager method calls and property reads as [`Query`](crate::fleet::Query)s, always with a
//!   signature, so an agent never has to introspect systemd to type the arguments.
//! - [`unit`](mod@unit): unit names (validation, `nginx` meaning `nginx.service`) and the typed
//!   [`Unit`] row of a `ListUnits` reply.
//! - [`rollout`]: rolling operations planned without I/O (batch as a running counter, the
//!   `--max-fail` threshold, the order machines are taken in).
//! - [`signals`]: the signal subjects to subscribe to, which signals are systemd's own, and
//!   the Manager signals (`UnitNew`, `UnitRemoved`, `JobRemoved`, `Reloading`) and units'
//!   `PropertiesChanged` decoded.
//!
//! Values inside replies are read with the codec's one variant rule
//! ([`cbus_protocol::codec::unvariant`], re-exported here).

pub mod manager;
pub mod rollout;
pub mod signals;
pub mod unit;

pub use cbus_protocol::codec::{as_u64, unvariant};
pub use manager::{
    get_property, list_unit, list_units, list_units_by_patterns, manager_call, subscribe, unit_job,
    unit_properties, UnitJob,
};
pub use signals::{
    manager_signals, systemd_signal, unit_signals, JobRemoved, JobResult, ManagerSignal,
    PropertiesChanged,
};
pub use unit::{
    exact_pattern, mangle, pattern, result_interface, unit_path, unit_rows, units_of_reply,
    validate, Unit, UnitNameError, TYPES, UNIT_NAME_MAX,
};

/// systemd's bus name.
pub const DESTINATION: &str = "org.freedesktop.systemd1";
/// The Manager object.
pub const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
/// Where unit objects live (one element below per unit, bus-label escaped).
pub const UNIT_PATH: &str = "/org/freedesktop/systemd1/unit";
/// The Manager interface.
pub const MANAGER: &str = "org.freedesktop.systemd1.Manager";
/// The interface every unit object has.
pub const UNIT: &str = "org.freedesktop.systemd1.Unit";
/// The interface of service units.
pub const SERVICE: &str = "org.freedesktop.systemd1.Service";
/// The interface of job objects.
pub const JOB: &str = "org.freedesktop.systemd1.Job";

/// A property of a `GetAll` reply (`{name: {"t": sig, "v": value}}`), unwrapped.
pub fn prop<'a>(props: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    props.get(name).map(unvariant)
}

/// A text property of a `GetAll` reply; empty when missing or not text.
pub fn prop_str(props: &serde_json::Value, name: &str) -> String {
    prop(props, name)
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
        .to_owned()
}
