//! Validation of D-Bus names and object paths, per the D-Bus specification.
//!
//! Subjects and requests carry names that come from the network; validating them here means the
//! agent never hands zbus a string it would reject with a less helpful message, and the CLI can
//! refuse a typo before anything is sent.

use crate::error::NameError;

const MAX_NAME_LEN: usize = 255;

/// A unique (`:1.42`) or well-known (`org.freedesktop.systemd1`) bus name.
pub fn validate_bus_name(name: &str) -> Result<(), NameError> {
    let bad = |reason: &'static str| NameError::BusName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("longer than 255 bytes"));
    }
    let (unique, body) = match name.strip_prefix(':') {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let elements: Vec<&str> = body.split('.').collect();
    if elements.len() < 2 {
        return Err(bad("needs at least two elements separated by '.'"));
    }
    for element in elements {
        if element.is_empty() {
            return Err(bad("has an empty element"));
        }
        if !element
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad("elements may only contain [A-Za-z0-9_-]"));
        }
        if !unique && element.as_bytes()[0].is_ascii_digit() {
            return Err(bad(
                "elements of a well-known name must not start with a digit",
            ));
        }
    }
    Ok(())
}

/// An interface name such as `org.freedesktop.systemd1.Unit`.
pub fn validate_interface(name: &str) -> Result<(), NameError> {
    let bad = |reason: &'static str| NameError::Interface {
        name: name.to_owned(),
        reason,
    };
    if name.len() > MAX_NAME_LEN {
        return Err(bad("longer than 255 bytes"));
    }
    let elements: Vec<&str> = name.split('.').collect();
    if elements.len() < 2 {
        return Err(bad("needs at least two elements separated by '.'"));
    }
    for element in elements {
        if !is_identifier(element) {
            return Err(bad("elements must match [A-Za-z_][A-Za-z0-9_]*"));
        }
    }
    Ok(())
}

/// A method, property or signal name such as `ActiveState`.
pub fn validate_member(name: &str) -> Result<(), NameError> {
    if name.len() > MAX_NAME_LEN || !is_identifier(name) {
        return Err(NameError::Member {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// An object path such as `/org/freedesktop/systemd1/unit/nginx_2eservice` or `/`.
pub fn validate_object_path(path: &str) -> Result<(), NameError> {
    let bad = |reason: &'static str| NameError::ObjectPath {
        path: path.to_owned(),
        reason,
    };
    if path == "/" {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(bad("must start with '/'"));
    };
    for element in rest.split('/') {
        if element.is_empty() {
            return Err(bad("has an empty element or a trailing '/'"));
        }
        if !element
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(bad("elements may only contain [A-Za-z0-9_]"));
        }
    }
    Ok(())
}

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphabetic() || b == b'_' => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Splits `[IFACE.]MEMBER` as users type it (`org.freedesktop.systemd1.Unit.ActiveState` or
/// `ActiveState`) into an optional interface and the member, validating both.
pub fn split_member(spec: &str) -> Result<(Option<String>, String), NameError> {
    match spec.rsplit_once('.') {
        Some((iface, member)) => {
            validate_interface(iface)?;
            validate_member(member)?;
            Ok((Some(iface.to_owned()), member.to_owned()))
        }
        None => {
            validate_member(spec)?;
            Ok((None, spec.to_owned()))
        }
    }
}

/// The object path systemd gives a unit: `nginx.service` -> `/org/freedesktop/systemd1/unit/nginx_2eservice`.
/// systemd escapes a leading digit too, unlike [`crate::token::escape`].
pub fn systemd_unit_path(unit: &str) -> String {
    let mut out = String::from("/org/freedesktop/systemd1/unit/");
    if unit.is_empty() {
        out.push('_');
        return out;
    }
    for (i, byte) in unit.bytes().enumerate() {
        if byte.is_ascii_alphabetic() || (i > 0 && byte.is_ascii_digit()) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("_{byte:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_names() {
        for ok in [
            ":1.42",
            "org.freedesktop.systemd1",
            "a.b_c-d",
            ":1.0",
            "com.x-y.z_1",
        ] {
            assert!(validate_bus_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "org", "org..x", "1org.x", "org.x.", ":1", "a b.c", "a.b/c",
        ] {
            assert!(validate_bus_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        for ok in ["/", "/a", "/org/freedesktop/systemd1/unit/a_2eb"] {
            assert!(validate_object_path(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "//", "/a/", "/a-b", "/a//b"] {
            assert!(validate_object_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn member_split() {
        assert_eq!(
            split_member("org.freedesktop.systemd1.Unit.ActiveState").unwrap(),
            (
                Some("org.freedesktop.systemd1.Unit".into()),
                "ActiveState".into()
            )
        );
        assert_eq!(split_member("Get").unwrap(), (None, "Get".into()));
        assert!(split_member("a.1b").is_err());
        assert!(split_member("x.Get").is_err());
    }

    #[test]
    fn unit_paths() {
        assert_eq!(
            systemd_unit_path("nginx.service"),
            "/org/freedesktop/systemd1/unit/nginx_2eservice"
        );
        assert_eq!(
            systemd_unit_path("getty@tty1.service"),
            "/org/freedesktop/systemd1/unit/getty_40tty1_2eservice"
        );
        assert_eq!(
            systemd_unit_path("1x.service"),
            "/org/freedesktop/systemd1/unit/_31x_2eservice"
        );
    }
}
