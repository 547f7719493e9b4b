//! What a set or call may do: the policy's verdict, whether looking it up may start a service,
//! and the audit line every remote set and call leaves.

use cbus_protocol::codec;
use cbus_protocol::envelope::{ErrorBody, ErrorCode, Request};
use cbus_protocol::subject::{Op, RequestSubject};
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

/// What the audit log says of one set or call.
pub(super) struct Audit {
    /// The interface as resolved (or as requested, when resolving failed).
    pub(super) interface: Option<String>,
    /// `None` when the request failed before the policy was asked (bad arguments...).
    pub(super) verdict: Option<Verdict>,
}

impl Audit {
    /// One line per remote set or call, allowed or not. Arguments are described by size and
    /// digest only: they may hold secrets (a password property), and they are the requester's
    /// text, of any size.
    pub(super) fn log(&self, s: &RequestSubject, r: &Request, requester: &str, outcome: &Outcome) {
        let args = if s.op == Op::Set { &r.value } else { &r.args };
        let bytes = args
            .as_ref()
            .map(|a| serde_json::to_vec(a).unwrap_or_default())
            .unwrap_or_default();
        let digest = hex16(&sha2::Sha256::digest(&bytes));
        let policy = match &self.verdict {
            None => "not-reached",
            Some(Verdict::Read) => "read",
            Some(Verdict::Allowed) => "allowed",
            Some(Verdict::Denied(_)) => "denied",
        };
        let result = match outcome {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        tracing::info!(
            target: "cbus_agent::audit",
            requester = %codec::quote(requester),
            op = %s.op,
            destination = %s.destination,
            path = %s.path,
            interface = self.interface.as_deref().unwrap_or("-"),
            member = s.member.as_deref().unwrap_or("-"),
            args_bytes = bytes.len(),
            args_sha256 = %digest,
            policy,
            result,
            "remote {}",
            s.op
        );
    }
}

/// The first 8 bytes of a digest as 16 hex digits.
fn hex16(digest: &[u8]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn digest_is_short() {
        assert_eq!(hex16(&sha2::Sha256::digest(b"")), "e3b0c44298fc1c14");
    }
}
