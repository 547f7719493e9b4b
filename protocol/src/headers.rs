//! NATS header names used on signals and requests, and a safe way to fill them.
//!
//! async-nats panics when a header value holds CR or LF; values here often come from D-Bus peers
//! (error messages, names), so every value goes through [`set`].

use async_nats::HeaderMap;

/// The agent's nkey.
pub const NKEY: &str = "NKey";
/// The signal sender's unique name (`:1.7`).
pub const SENDER: &str = "Sender";
/// The well-known names the sender owns, as the agent's owner table says when the signal is read:
/// space-separated (a bus name never holds a space), sorted, at most [`MAX_SENDER_NAMES`]; absent
/// when it owns none. The sender's unique name comes from the bus and cannot be forged by a local
/// user, and no local user can own `org.freedesktop.systemd1`, so [`sender_owns`] is how a
/// consumer tells systemd's own signals from forgeries (`busctl emit` by any user).
pub const SENDER_NAME: &str = "Sender-Name";
/// The most well-known names listed in [`SENDER_NAME`].
pub const MAX_SENDER_NAMES: usize = 16;
/// The object path.
pub const PATH: &str = "Path";
/// The interface.
pub const INTERFACE: &str = "Interface";
/// The signal or method name.
pub const MEMBER: &str = "Member";
/// The D-Bus signature of the body.
pub const SIGNATURE: &str = "Signature";
/// The agent's hostname.
pub const HOSTNAME: &str = "Hostname";
/// Who sent a request (`user@host` of the CLI, or the gateway's client), for the agent's audit log.
pub const REQUESTER: &str = "Cbus-Requester";

/// Inserts `value` with CR and LF replaced by spaces.
pub fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    let clean: String = if value.contains(['\r', '\n']) {
        value.replace(['\r', '\n'], " ")
    } else {
        value.to_owned()
    };
    match clean.parse::<async_nats::HeaderValue>() {
        Ok(v) => headers.insert(name, v),
        Err(_) => tracing::debug!(name, "header value refused after sanitizing; left out"),
    }
}

/// Reads a header as text.
pub fn get<'a>(headers: Option<&'a HeaderMap>, name: &'static str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// The well-known names listed in a signal's [`SENDER_NAME`] header.
pub fn sender_names(headers: Option<&HeaderMap>) -> impl Iterator<Item = &str> {
    get(headers, SENDER_NAME)
        .unwrap_or_default()
        .split(' ')
        .filter(|n| !n.is_empty())
        .take(MAX_SENDER_NAMES)
}

/// Whether the agent saw the signal's sender own the well-known `name` (see [`SENDER_NAME`]).
pub fn sender_owns(headers: Option<&HeaderMap>, name: &str) -> bool {
    sender_names(headers).any(|n| n == name)
}

/// The [`SENDER_NAME`] value for a sender that owns `names`.
pub fn sender_names_value<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let mut names: Vec<&str> = names.into_iter().filter(|n| !n.contains(' ')).collect();
    names.sort_unstable();
    names.dedup();
    names.truncate(MAX_SENDER_NAMES);
    names.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_names_round_trip() {
        let mut h = HeaderMap::new();
        let value = sender_names_value(["org.b", "org.freedesktop.systemd1", "org.b", "bad name"]);
        set(&mut h, SENDER_NAME, &value);
        assert_eq!(
            sender_names(Some(&h)).collect::<Vec<_>>(),
            ["org.b", "org.freedesktop.systemd1"]
        );
        assert!(sender_owns(Some(&h), "org.freedesktop.systemd1"));
        assert!(!sender_owns(Some(&h), "org.freedesktop"));
        assert!(!sender_owns(None, "org.b"));
    }

    #[test]
    fn crlf_is_sanitized() {
        let mut h = HeaderMap::new();
        set(&mut h, MEMBER, "a\r\nb");
        assert_eq!(get(Some(&h), MEMBER), Some("a  b"));
    }
}
