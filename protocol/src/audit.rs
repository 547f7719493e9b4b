//! The audit trail: one [`AuditEntry`] per remote set or call an agent received, allowed or
//! denied, published by that agent on its own subject [`crate::subject::audit`]
//! (`dbus.audit.<nkey>`) and kept by the JetStream stream [`crate::streams::audit_stream`].
//!
//! What an entry is worth (docs/security.md): the subject proves which machine wrote it (an
//! agent may publish only under its own nkey), and that machine's agent vouches for what it
//! did: op, destination, path, interface as resolved, member, the arguments' size and digest,
//! the policy's verdict, the result and the time. It cannot vouch for who asked: NATS does not
//! tell a subscriber who published a message, so `requester` (the `Cbus-Requester` header) and
//! `reply_to` (where the answer went) are the requester's claims. Arguments are never in an
//! entry, only their size and SHA-256: they may hold secrets.

use serde::{Deserialize, Serialize};

use crate::subject::Op;

/// The longest requester claim an entry keeps (longer ones are cut, on a char boundary).
pub const MAX_REQUESTER_CHARS: usize = 256;
/// The largest entry a reader accepts (and the audit stream stores): entries are well under
/// 4 KiB, since subjects are at most 1 KiB and the claims are cut.
pub const MAX_ENTRY_BYTES: usize = 16 * 1024;

/// What the policy said of a set or call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyVerdict {
    /// Allowed by a rule (or `--allow-all`).
    Allowed,
    /// A read-listed call, sent as a read.
    Read,
    /// Refused by the policy.
    Denied,
    /// The request failed before the policy was asked (bad arguments, no call slot, busy...).
    NotReached,
}

impl PolicyVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyVerdict::Allowed => "allowed",
            PolicyVerdict::Read => "read",
            PolicyVerdict::Denied => "denied",
            PolicyVerdict::NotReached => "not-reached",
        }
    }
}

/// One remote set or call, as the agent that received it saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When the agent finished with the request (Unix ms, the agent's clock).
    pub time_ms: u64,
    /// The agent's nkey; a reader takes the machine from the subject and drops an entry whose
    /// `nkey` disagrees.
    pub nkey: String,
    pub hostname: String,
    /// The `Cbus-Requester` header (`user@host` for the CLI): a claim. `None` when absent.
    #[serde(default)]
    pub requester: Option<String>,
    /// The request's reply subject (the requester's inbox): a claim too, but the answer went
    /// there.
    #[serde(default)]
    pub reply_to: Option<String>,
    /// Whether the request came on the agent's own subject or as a broadcast.
    pub broadcast: bool,
    pub op: Op,
    pub destination: String,
    pub path: String,
    /// As resolved by introspection, else as requested; `None` when neither is known.
    #[serde(default)]
    pub interface: Option<String>,
    pub member: String,
    /// Size of the arguments (`args` of a call, `value` of a set) as compact JSON with sorted
    /// object keys; `None` when the body could not be read.
    #[serde(default)]
    pub args_bytes: Option<u64>,
    /// SHA-256 of those bytes, 64 hex digits.
    #[serde(default)]
    pub args_sha256: Option<String>,
    pub policy: PolicyVerdict,
    /// `ok`, or the reply's error code (`access-denied`, `timeout`, ...).
    pub result: String,
}

/// `text` cut to [`MAX_REQUESTER_CHARS`] characters, control characters replaced.
pub fn bounded_claim(text: &str) -> String {
    text.chars()
        .take(MAX_REQUESTER_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl AuditEntry {
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("audit entries serialize")
    }

    /// Parses an entry, refusing anything larger than [`MAX_ENTRY_BYTES`].
    pub fn from_payload(payload: &[u8]) -> Result<AuditEntry, String> {
        if payload.len() > MAX_ENTRY_BYTES {
            return Err(format!(
                "audit entry of {} bytes is larger than {MAX_ENTRY_BYTES}",
                payload.len()
            ));
        }
        serde_json::from_slice(payload).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_are_bounded() {
        let e = AuditEntry {
            time_ms: 1,
            nkey: "U".into(),
            hostname: "h".into(),
            requester: Some(bounded_claim(&"x\n".repeat(1000))),
            reply_to: None,
            broadcast: false,
            op: Op::Call,
            destination: "org.a".into(),
            path: "/".into(),
            interface: None,
            member: "M".into(),
            args_bytes: Some(2),
            args_sha256: Some("ab".into()),
            policy: PolicyVerdict::Denied,
            result: "access-denied".into(),
        };
        let requester = e.requester.as_deref().unwrap();
        assert_eq!(requester.chars().count(), MAX_REQUESTER_CHARS);
        assert!(!requester.contains('\n'));
        let v: serde_json::Value = serde_json::from_slice(&e.to_payload()).unwrap();
        assert_eq!(v["policy"], "denied");
        assert_eq!(v["op"], "call");
        assert_eq!(AuditEntry::from_payload(&e.to_payload()).unwrap(), e);
        assert!(AuditEntry::from_payload(&vec![b' '; MAX_ENTRY_BYTES + 1]).is_err());
    }
}
