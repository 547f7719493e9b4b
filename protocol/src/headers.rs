//! NATS header names used on signals and requests, and a safe way to fill them.
//!
//! async-nats panics when a header value holds CR or LF; values here often come from D-Bus peers
//! (error messages, names), so every value goes through [`set`].

use async_nats::HeaderMap;

/// The agent's nkey.
pub const NKEY: &str = "NKey";
/// The signal sender's unique name (`:1.7`).
pub const SENDER: &str = "Sender";
/// The well-known name the sender owns, when the agent knows one.
pub const SENDER_NAME: &str = "Sender-Name";
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_is_sanitized() {
        let mut h = HeaderMap::new();
        set(&mut h, MEMBER, "a\r\nb");
        assert_eq!(get(Some(&h), MEMBER), Some("a  b"));
    }
}
