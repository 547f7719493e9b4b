//! NATS header names used on signals and requests, and the rules for their values.
//!
//! Values here often come from D-Bus peers (error messages, names), and a NATS client may refuse
//! (async-nats panics on) a value with CR or LF, so every value goes through [`sanitize`] first.
//! Putting values into a header map is the client crate's (`cbus_client::headers`).

use std::borrow::Cow;

/// The agent's nkey.
pub const NKEY: &str = "NKey";
/// The signal sender's unique name (`:1.7`).
pub const SENDER: &str = "Sender";
/// The well-known names the sender owns, as the agent's owner table says when the signal is read:
/// space-separated (a bus name never holds a space), sorted, at most [`MAX_SENDER_NAMES`]; absent
/// when it owns none. The sender's unique name comes from the bus and cannot be forged by a local
/// user, and no local user can own `org.freedesktop.systemd1`, so [`sender_names`] owning it is
/// how a consumer tells systemd's own signals from forgeries (`busctl emit` by any user).
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

/// `value` with CR and LF replaced by spaces.
pub fn sanitize(value: &str) -> Cow<'_, str> {
    if value.contains(['\r', '\n']) {
        Cow::Owned(value.replace(['\r', '\n'], " "))
    } else {
        Cow::Borrowed(value)
    }
}

/// The well-known names a [`SENDER_NAME`] value lists.
pub fn sender_names(value: Option<&str>) -> impl Iterator<Item = &str> {
    value
        .unwrap_or_default()
        .split(' ')
        .filter(|n| !n.is_empty())
        .take(MAX_SENDER_NAMES)
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
        let value = sender_names_value(["org.b", "org.freedesktop.systemd1", "org.b", "bad name"]);
        assert_eq!(
            sender_names(Some(&value)).collect::<Vec<_>>(),
            ["org.b", "org.freedesktop.systemd1"]
        );
        assert_eq!(sender_names(None).count(), 0);
    }

    #[test]
    fn crlf_is_sanitized() {
        assert_eq!(sanitize("a\r\nb"), "a  b");
        assert!(matches!(sanitize("ab"), Cow::Borrowed("ab")));
    }
}
