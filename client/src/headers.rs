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

/// Why a signal is not taken as its machine's word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalRefused {
    #[error("not a cbus signal subject")]
    Subject,
    #[error("the NKey header names {claimed}, another machine than the subject")]
    NkeyMismatch { claimed: String },
    #[error("not sent by the owner of {0}")]
    NotFromOwner(&'static str),
}

/// The machine a signal is from: the `<nkey>` token of its subject
/// (`dbus.signals.<nkey>.<sender>.<path>`), which NATS permissions tie to the agent that
/// published it. A `NKey` header naming another machine makes it a forgery.
pub fn signal_machine<'a>(
    subject: &'a str,
    headers: Option<&HeaderMap>,
) -> Result<&'a str, SignalRefused> {
    let nkey = cbus_protocol::subject::signal_nkey(subject).ok_or(SignalRefused::Subject)?;
    match get(headers, NKEY) {
        Some(claimed) if claimed != nkey => Err(SignalRefused::NkeyMismatch {
            claimed: claimed.to_owned(),
        }),
        _ => Ok(nkey),
    }
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
    fn signal_machine_is_the_subjects() {
        let a = "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7";
        let b = "UCZR2FMXVH2LW2J3GXYZWTM4U6V7RWIZ6XNWHN3PSD3OBPB4GEEEPB4B";
        let subject = format!("dbus.signals.{a}._3a1_2e1.-");
        assert_eq!(signal_machine(&subject, None), Ok(a));
        let mut h = HeaderMap::new();
        set(&mut h, NKEY, a);
        assert_eq!(signal_machine(&subject, Some(&h)), Ok(a));
        set(&mut h, NKEY, b);
        assert!(matches!(
            signal_machine(&subject, Some(&h)),
            Err(SignalRefused::NkeyMismatch { .. })
        ));
        assert_eq!(
            signal_machine("dbus.presence.x", None),
            Err(SignalRefused::Subject)
        );
    }

    #[test]
    fn crlf_is_sanitized() {
        let mut h = HeaderMap::new();
        set(&mut h, MEMBER, "a\r\nb");
        assert_eq!(get(Some(&h), MEMBER), Some("a  b"));
    }
}
