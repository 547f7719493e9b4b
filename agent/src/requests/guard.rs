//! What a set or call may do: the policy's verdict, whether looking it up may start a service,
//! and the audit line and entry every remote set and call leaves.

use cbus_client::headers;
use cbus_protocol::audit::{self, AuditEntry, PolicyVerdict};
use cbus_protocol::codec;
use cbus_protocol::envelope::{ErrorBody, ErrorCode, Request};
use cbus_protocol::subject::{Op, RequestSubject, Target};
use sha2::Digest as _;

use super::{Outcome, RequestServer, Start};
use crate::policy::{Action, Verdict};

impl RequestServer {
    /// Whether looking a member up for a set or call may start the destination's service: only
    /// when the policy could allow the write, so a denied call never activates anything.
    pub(super) fn lookup_start(
        &self,
        op: Op,
        dest: &str,
        iface: Option<&str>,
        member: &str,
    ) -> Start {
        if self.policy.may_allow(op, dest, iface, member) {
            Start::Allowed
        } else {
            Start::Never
        }
    }

    /// The policy's verdict on a set or call with its arguments (converted already, so argument
    /// patterns see exactly what D-Bus will). Read-listed calls are sent as reads.
    pub(super) fn check_policy(
        &self,
        op: Op,
        dest: &str,
        iface: &str,
        member: &str,
        args: &[zvariant::Value<'_>],
        audit: &mut Audit,
    ) -> Result<Start, ErrorBody> {
        let texts: Vec<Option<&str>> = args
            .iter()
            .map(|v| match v {
                zvariant::Value::Str(s) => Some(s.as_str()),
                zvariant::Value::ObjectPath(p) => Some(p.as_str()),
                _ => None,
            })
            .collect();
        let verdict = self.policy.check(&Action {
            op,
            destination: dest,
            interface: iface,
            member,
            args: &texts,
        });
        let result = match &verdict {
            Verdict::Read => Ok(Start::Never),
            Verdict::Allowed => Ok(Start::Allowed),
            Verdict::Denied(why) => Err(ErrorBody::new(
                ErrorCode::AccessDenied,
                format!(
                    "the agent's policy does not allow {op} of {iface}.{member} on {dest} ({why})"
                ),
            )),
        };
        audit.verdict = Some(verdict);
        result
    }
}

/// Who asked, as far as the agent can tell: both are the requester's claims (NATS does not
/// tell a subscriber who published a message).
#[derive(Debug, Clone, Default)]
pub(super) struct Asker {
    /// The `Cbus-Requester` header, cut to `audit::MAX_REQUESTER_CHARS`.
    pub(super) requester: Option<String>,
    /// The reply subject, cut the same way.
    pub(super) reply_to: Option<String>,
}

impl Asker {
    pub(super) fn of(msg: &async_nats::Message) -> Asker {
        Asker {
            requester: headers::get(msg.headers.as_ref(), headers::REQUESTER)
                .map(audit::bounded_claim),
            reply_to: msg.reply.as_deref().map(audit::bounded_claim),
        }
    }
}

/// What the audit log says of one set or call.
pub(super) struct Audit {
    /// The interface as resolved (or as requested, when resolving failed).
    pub(super) interface: Option<String>,
    /// `None` when the request failed before the policy was asked (bad arguments...).
    pub(super) verdict: Option<Verdict>,
}

impl Audit {
    /// A set or call that never reached the policy.
    pub(super) fn unreached(interface: Option<String>) -> Audit {
        Audit {
            interface,
            verdict: None,
        }
    }
}

impl RequestServer {
    /// One log line and one published entry per remote set or call, allowed or not. Arguments
    /// are described by size and digest only: they may hold secrets (a password property), and
    /// they are the requester's text, of any size. `r` is `None` when the body could not be read.
    pub(super) fn audit(
        &self,
        audit: &Audit,
        s: &RequestSubject,
        r: Option<&Request>,
        asker: &Asker,
        outcome: &Outcome,
    ) {
        // Compact JSON with sorted keys (serde_json's map), so a reader can recompute the digest.
        let bytes = r.map(|r| {
            let args = if s.op == Op::Set { &r.value } else { &r.args };
            args.as_ref()
                .map(|a| serde_json::to_vec(a).unwrap_or_default())
                .unwrap_or_default()
        });
        let digest = bytes.as_ref().map(sha2::Sha256::digest);
        let policy = match &audit.verdict {
            None => PolicyVerdict::NotReached,
            Some(Verdict::Read) => PolicyVerdict::Read,
            Some(Verdict::Allowed) => PolicyVerdict::Allowed,
            Some(Verdict::Denied(_)) => PolicyVerdict::Denied,
        };
        let result = match outcome {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        let interface = audit
            .interface
            .clone()
            .or_else(|| r.and_then(|r| r.interface.clone()));
        tracing::info!(
            target: "cbus_agent::audit",
            requester = %codec::quote(asker.requester.as_deref().unwrap_or("unknown")),
            op = %s.op,
            destination = %s.destination,
            path = %s.path,
            interface = interface.as_deref().unwrap_or("-"),
            member = s.member.as_deref().unwrap_or("-"),
            args_bytes = bytes.as_ref().map_or(0, Vec::len),
            args_sha256 = %digest.as_ref().map_or_else(|| "-".to_owned(), |d| hex(&d[..8])),
            policy = policy.as_str(),
            result,
            "remote {}",
            s.op
        );
        self.audit.record(AuditEntry {
            time_ms: cbus_protocol::presence::now_ms(),
            nkey: self.me.nkey.clone(),
            hostname: self.me.hostname.clone(),
            requester: asker.requester.clone(),
            reply_to: asker.reply_to.clone(),
            broadcast: s.target == Target::Broadcast,
            op: s.op,
            destination: s.destination.clone(),
            path: s.path.clone(),
            interface,
            member: s.member.clone().unwrap_or_default(),
            args_bytes: bytes.as_ref().map(|b| b.len() as u64),
            args_sha256: digest.as_ref().map(|d| hex(d)),
            policy,
            result: result.to_owned(),
        });
    }
}

/// Bytes as lowercase hex digits.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn digest_is_short() {
        assert_eq!(hex(&sha2::Sha256::digest(b"")[..8]), "e3b0c44298fc1c14");
    }
}
