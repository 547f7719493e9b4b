//! What every NATS reader in the gateway shares: subscribing with a typed error, and the two
//! trust rules for signals.
//!
//! Signals are claims, not facts: any local user on a host can emit any signal on its system bus
//! (`busctl emit`), and an agent can put anything in its headers. So a signal's machine is the
//! `<nkey>` token of its subject, which the server's permissions tie to the publishing agent
//! ([`signal_machine`]), and its sender is the unique name the bus set, or a well-known name the
//! agent saw it own ([`sent_by`]). The rules are `cbus_client`'s; here they are counted
//! (`cbus_gateway_dropped_total`).

use async_nats::HeaderMap;
use cbus_client::headers::{self, SignalRefused};

use crate::stats::{self, Dropped};

/// Why a subscription could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("no subject for {what}: {source}")]
    Subject {
        what: &'static str,
        #[source]
        source: cbus_protocol::SubjectError,
    },
    #[error("cannot subscribe to {subject}: {source}")]
    Refused {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
}

/// Subscribes to `subject`.
pub(crate) async fn subscribe(
    client: &async_nats::Client,
    subject: &str,
) -> Result<async_nats::Subscriber, SubscribeError> {
    client
        .subscribe(subject.to_owned())
        .await
        .map_err(|source| SubscribeError::Refused {
            subject: subject.to_owned(),
            source,
        })
}

/// The machine a signal is from (`cbus_client::headers::signal_machine`: the subject's
/// `<nkey>`, not contradicted by the `NKey` header); `None`, counted, for a forgery.
pub(crate) fn signal_machine<'a>(subject: &'a str, h: Option<&HeaderMap>) -> Option<&'a str> {
    headers::signal_machine(subject, h)
        .map_err(|e| refused(subject, &e))
        .ok()
}

/// Counts a signal that is not taken as its machine's word.
pub(crate) fn refused(subject: &str, e: &SignalRefused) {
    match e {
        SignalRefused::NkeyMismatch { .. } => stats::dropped(Dropped::NkeyMismatch),
        // Only systemd's signals are checked for their owner (`systemd_signal`).
        SignalRefused::NotFromOwner(_) => stats::dropped(Dropped::NotFromSystemd),
        SignalRefused::Subject => {}
    }
    tracing::debug!(%subject, reason = %e, "signal dropped");
}

/// Whether a signal was sent by `name`: its unique name, or a well-known name the agent saw
/// the sender own.
pub(crate) fn sent_by(h: Option<&HeaderMap>, name: &str) -> bool {
    headers::get(h, headers::SENDER) == Some(name) || headers::sender_owns(h, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_names_the_machine() {
        let nkey = format!("U{}", "A".repeat(55));
        let subject = format!("dbus.signals.{nkey}._1_2.org.x");
        assert_eq!(signal_machine(&subject, None), Some(nkey.as_str()));
        let mut h = HeaderMap::new();
        headers::set(&mut h, headers::NKEY, &nkey);
        assert_eq!(signal_machine(&subject, Some(&h)), Some(nkey.as_str()));
        headers::set(&mut h, headers::NKEY, "Uother");
        assert_eq!(signal_machine(&subject, Some(&h)), None);
        assert_eq!(signal_machine("dbus.signals.bad.x.y", None), None);
    }
}
