//! Unit names and the units systemd lists.
//!
//! A name is checked here before anything is sent, by systemd's rules (`unit_name_is_valid`):
//! a typo is then a usage error rather than a `not-found` from every machine, and a name systemd
//! could never have never reaches it. Like systemctl, a name without a unit type means a
//! service ([`mangle`]: `nginx` is `nginx.service`).

use serde::Serialize;
use serde_json::Value;

/// Unit types systemd knows (the suffix after the last dot).
pub const TYPES: &[&str] = &[
    "service",
    "socket",
    "target",
    "device",
    "mount",
    "automount",
    "swap",
    "timer",
    "path",
    "slice",
    "scope",
];

/// The longest unit name, in bytes: systemd's `UNIT_NAME_MAX` is 256 including the C string's
/// NUL.
pub const UNIT_NAME_MAX: usize = 255;

/// Why a unit name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitNameError {
    #[error("invalid unit name {name:?}: {reason}")]
    Invalid { name: String, reason: &'static str },
}

fn has_type(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, suffix)| TYPES.contains(&suffix))
}

fn valid_chars(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
}

/// Checks a full unit name (`nginx.service`, `getty@tty1.service`): the characters systemd
/// allows, at most [`UNIT_NAME_MAX`] bytes, a known type, a name before it, and not a template
/// (`getty@.service` names no unit to act on).
pub fn validate(name: &str) -> Result<(), UnitNameError> {
    let bad = |reason| UnitNameError::Invalid {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if !valid_chars(name) {
        return Err(bad("unit names may only contain [A-Za-z0-9:-_.\\@]"));
    }
    if name.len() > UNIT_NAME_MAX {
        return Err(bad("longer than 255 bytes"));
    }
    if !has_type(name) {
        return Err(bad("no unit type (.service, .timer, ...)"));
    }
    let (prefix, _) = name.rsplit_once('.').ok_or_else(|| bad("no unit type"))?;
    if prefix.is_empty() || prefix.starts_with('@') {
        return Err(bad("needs a name before the type"));
    }
    if prefix.ends_with('@') {
        return Err(bad(
            "is a template; give an instance (name@instance.service)",
        ));
    }
    Ok(())
}

/// The interface of a unit's type that has the unit's `Result` (`success`, `exit-code`,
/// `timeout`, ...), e.g. `org.freedesktop.systemd1.Service` for `nginx.service`; `None` for
/// types without one (targets, devices, slices).
pub fn result_interface(name: &str) -> Option<&'static str> {
    Some(match name.rsplit_once('.')?.1 {
        "service" => "org.freedesktop.systemd1.Service",
        "socket" => "org.freedesktop.systemd1.Socket",
        "mount" => "org.freedesktop.systemd1.Mount",
        "automount" => "org.freedesktop.systemd1.Automount",
        "swap" => "org.freedesktop.systemd1.Swap",
        "timer" => "org.freedesktop.systemd1.Timer",
        "path" => "org.freedesktop.systemd1.Path",
        "scope" => "org.freedesktop.systemd1.Scope",
        _ => return None,
    })
}

/// The full unit name for `name` as a user typed it: `.service` added when it has no type,
/// then [`validate`]d.
pub fn mangle(name: &str) -> Result<String, UnitNameError> {
    let full = if name.is_empty() || has_type(name) {
        name.to_owned()
    } else {
        format!("{name}.service")
    };
    // The error names what was typed, not the mangled name.
    validate(&full).map_err(
        |UnitNameError::Invalid { reason, .. }| UnitNameError::Invalid {
            name: name.to_owned(),
            reason,
        },
    )?;
    Ok(full)
}

/// A `ListUnitsByPatterns` pattern as a user typed it: globs pass through; a plain name is
/// [`mangle`]d.
pub fn pattern(p: &str) -> Result<String, UnitNameError> {
    if p.contains(['*', '?', '[']) {
        if p.chars().any(|c| c.is_control() || c == '/') {
            return Err(UnitNameError::Invalid {
                name: p.to_owned(),
                reason: "patterns may not contain '/' or control characters",
            });
        }
        return Ok(p.to_owned());
    }
    mangle(p)
}

/// A pattern matching exactly `name` (`ListUnitsByPatterns` takes fnmatch patterns).
pub fn exact_pattern(name: &str) -> String {
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

/// The object path of a unit (`nginx.service` is `/org/freedesktop/systemd1/unit/nginx_2eservice`).
pub fn unit_path(name: &str) -> String {
    cbus_protocol::names::systemd_unit_path(name)
}

/// One unit as `ListUnits` and `ListUnitsByPatterns` list it: a `(ssssssouso)` row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Unit {
    pub name: String,
    pub description: String,
    /// LoadState: `loaded`, `not-found`, `masked`, ...
    pub load: String,
    /// ActiveState: `active`, `inactive`, `failed`, ...
    pub active: String,
    /// SubState: `running`, `dead`, ...
    pub sub: String,
    /// The unit this one follows (`""` for none).
    pub following: String,
    /// The unit's object path.
    pub path: String,
    /// The queued job's id, 0 for none.
    pub job_id: u32,
    pub job_type: String,
    /// The queued job's object path (`/` for none).
    pub job_path: String,
}

impl Unit {
    /// The unit of one row; `None` for a row without a name.
    pub fn from_row(row: &Value) -> Option<Unit> {
        let text = |i: usize| row.get(i).and_then(Value::as_str).unwrap_or("").to_owned();
        let name = text(0);
        if name.is_empty() {
            return None;
        }
        Some(Unit {
            name,
            description: text(1),
            load: text(2),
            active: text(3),
            sub: text(4),
            following: text(5),
            path: text(6),
            job_id: row
                .get(7)
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
                .unwrap_or(0),
            job_type: text(8),
            job_path: text(9),
        })
    }

    /// systemd has no such unit: something merely asked about it (nothing to follow).
    pub fn is_not_found(&self) -> bool {
        self.load == "not-found"
    }

    pub fn is_active(&self) -> bool {
        self.active == "active"
    }

    pub fn is_failed(&self) -> bool {
        self.active == "failed"
    }

    pub fn is_service(&self) -> bool {
        self.name.ends_with(".service")
    }
}

/// The units of an `a(ssssssouso)` array, sorted by name; rows without a name are skipped.
pub fn unit_rows(list: &Value) -> Vec<Unit> {
    let mut units: Vec<Unit> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Unit::from_row)
        .collect();
    units.sort_by(|a, b| a.name.cmp(&b.name));
    units
}

/// The units of a `ListUnits`/`ListUnitsByPatterns` reply value (its out-arguments,
/// `[a(ssssssouso)]`), sorted by name.
pub fn units_of_reply(value: &Value) -> Vec<Unit> {
    value.get(0).map(unit_rows).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names() {
        assert_eq!(mangle("nginx").unwrap(), "nginx.service");
        assert_eq!(mangle("nginx.service").unwrap(), "nginx.service");
        assert_eq!(mangle("basic.target").unwrap(), "basic.target");
        assert_eq!(mangle("getty@tty1").unwrap(), "getty@tty1.service");
        assert_eq!(mangle("foo.bar").unwrap(), "foo.bar.service");
        for bad in [
            "",
            "a b",
            "x/y.service",
            "getty@.service",
            ".service",
            "@x.service",
        ] {
            assert!(mangle(bad).is_err(), "{bad}");
            assert!(validate(bad).is_err(), "{bad}");
        }
        assert!(mangle(&"a".repeat(300)).is_err());
        assert_eq!(pattern("cbus-*").unwrap(), "cbus-*");
        assert_eq!(pattern("nginx").unwrap(), "nginx.service");
        assert!(pattern("a/*").is_err());
        assert!(validate("nginx").is_err(), "a full name has a type");
        assert_eq!(
            result_interface("a.service"),
            Some("org.freedesktop.systemd1.Service")
        );
        assert_eq!(result_interface("basic.target"), None);
    }

    #[test]
    fn the_longest_name_is_255_bytes() {
        let name = |len: usize| format!("{}.service", "a".repeat(len - ".service".len()));
        assert!(validate(&name(UNIT_NAME_MAX)).is_ok());
        assert!(validate(&name(UNIT_NAME_MAX + 1)).is_err());
        assert_eq!(mangle(&"a".repeat(UNIT_NAME_MAX - 8)).unwrap().len(), 255);
        assert!(mangle(&"a".repeat(UNIT_NAME_MAX - 7)).is_err());
    }

    #[test]
    fn exact_patterns() {
        assert_eq!(exact_pattern("a*b?[c]"), "a[*]b[?][[]c[]]");
    }

    #[test]
    fn list_units_reply_is_parsed_and_sorted() {
        let v = json!([[
            [
                "b.service",
                "B",
                "loaded",
                "active",
                "running",
                "",
                "/org/freedesktop/systemd1/unit/b_2eservice",
                3,
                "start",
                "/org/freedesktop/systemd1/job/3"
            ],
            [
                "a.service",
                "A",
                "not-found",
                "inactive",
                "dead",
                "",
                "/org/freedesktop/systemd1/unit/a_2eservice",
                0,
                "",
                "/"
            ],
            ["", "nameless", "loaded", "active", "running", "", "/", 0, "", "/"]
        ]]);
        let units = units_of_reply(&v);
        assert_eq!(units.len(), 2);
        assert_eq!(units[0].name, "a.service");
        assert_eq!(units[0].sub, "dead");
        assert!(units[0].is_not_found() && !units[0].is_active());
        assert_eq!(units[1].path, "/org/freedesktop/systemd1/unit/b_2eservice");
        assert_eq!(units[1].job_id, 3);
        assert!(units[1].is_active() && units[1].is_service());
        assert!(units_of_reply(&json!(null)).is_empty());
        assert_eq!(unit_path("b.service"), units[1].path);
    }
}
