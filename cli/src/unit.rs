//! systemd unit names as users type them, checked before anything is sent.
//!
//! Like systemctl, a name without a unit type means a service (`nginx` is `nginx.service`).
//! Names are validated against systemd's rules so a typo is a usage error (exit 2) here rather
//! than a `not-found` from every machine.

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
const MAX_LEN: usize = 255;

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

/// The full unit name for `name`: validated, with `.service` added when it has no type.
pub fn mangle(name: &str) -> Result<String, UnitNameError> {
    let bad = |reason| UnitNameError::Invalid {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
    {
        return Err(bad("unit names may only contain [A-Za-z0-9:-_.\\@]"));
    }
    let full = if has_type(name) {
        name.to_owned()
    } else {
        format!("{name}.service")
    };
    if full.len() > MAX_LEN {
        return Err(bad("longer than 255 bytes"));
    }
    let (prefix, _) = full.rsplit_once('.').ok_or_else(|| bad("no unit type"))?;
    if prefix.is_empty() || prefix.starts_with('@') {
        return Err(bad("needs a name before the type"));
    }
    if prefix.ends_with('@') {
        return Err(bad(
            "is a template; give an instance (name@instance.service)",
        ));
    }
    Ok(full)
}

/// A `cbus units` pattern: globs pass through; a plain name gets `.service` like [`mangle`].
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

#[cfg(test)]
mod tests {
    use super::*;

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
        }
        assert!(mangle(&"a".repeat(300)).is_err());
        assert_eq!(pattern("cbus-*").unwrap(), "cbus-*");
        assert_eq!(pattern("nginx").unwrap(), "nginx.service");
        assert!(pattern("a/*").is_err());
    }
}
