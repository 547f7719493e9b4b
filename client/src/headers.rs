//! NATS headers on the wire: the names and value rules are the contract's
//! ([`cbus_protocol::headers`], re-exported here), putting them into and reading them from an
//! async-nats [`HeaderMap`] is this module's.

use async_nats::HeaderMap;

pub use cbus_protocol::headers::*;

/// Inserts `value` with CR and LF replaced by spaces (async-nats panics on them).
pub fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    match sanitize(value).parse::<async_nats::HeaderValue>() {
        Ok(v) => headers.insert(name, v),
        Err(_) => tracing::debug!(name, "header value refused after sanitizing; left out"),
    }
}

/// Reads a header as text.
pub fn get<'a>(headers: Option<&'a HeaderMap>, name: &'static str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// The well-known names listed in a signal's [`SENDER_NAME`] header.
pub fn sender_names_of(headers: Option<&HeaderMap>) -> impl Iterator<Item = &str> {
    sender_names(get(headers, SENDER_NAME))
}

/// Whether the agent saw the signal's sender own the well-known `name` (see [`SENDER_NAME`]).
pub fn sender_owns(headers: Option<&HeaderMap>, name: &str) -> bool {
    sender_names_of(headers).any(|n| n == name)
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
            sender_names_of(Some(&h)).collect::<Vec<_>>(),
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
