//! Asking machines: the gateway's own queries (ListUnits, targeted gets) and clients' requests
//! (get, set, call, start, stop, restart), all through `cbus_client::fleet`.
//!
//! Client requests go to each target separately and concurrently, so a client sees each
//! machine's result as soon as it arrives and one silent machine delays nobody else's result; it
//! is reported by name as timed out when the deadline passes.

use std::time::Duration;

use cbus_client::fleet::{AgentStatus, Fleet, Outcome, Query};
use cbus_protocol::{ErrorBody, ErrorCode, Op, Request, Success};
use serde_json::{json, Value};

pub const SYSTEMD: &str = "org.freedesktop.systemd1";
pub const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
pub const MANAGER_IFACE: &str = "org.freedesktop.systemd1.Manager";

/// How one machine fared.
#[derive(Debug, Clone, PartialEq)]
pub enum MachineResult {
    Ok(Success),
    Failed(ErrorBody),
    TimedOut,
}

/// Asks one machine; maps every outcome to a result.
pub async fn ask(
    fleet: &Fleet,
    target: &AgentStatus,
    query: &Query,
    timeout: Duration,
) -> MachineResult {
    match fleet
        .fan_out(std::slice::from_ref(target), query, timeout)
        .await
    {
        Err(e) => MachineResult::Failed(ErrorBody::new(ErrorCode::InternalError, e.to_string())),
        Ok(mut outcomes) => match outcomes.pop().map(|o| o.outcome) {
            Some(Outcome::Replied(reply)) => match reply.result {
                Ok(s) => MachineResult::Ok(s),
                Err(e) => MachineResult::Failed(e),
            },
            Some(Outcome::NoResponders) => MachineResult::Failed(ErrorBody::new(
                ErrorCode::Disconnected,
                "the agent is not connected to NATS",
            )),
            Some(Outcome::Stopped) => MachineResult::Failed(ErrorBody::new(
                ErrorCode::Disconnected,
                "the agent has stopped",
            )),
            Some(Outcome::Unresponsive { silent }) => MachineResult::Failed(ErrorBody::new(
                ErrorCode::Disconnected,
                format!(
                    "the agent is unresponsive (silent {} s); not asked",
                    silent.as_secs()
                ),
            )),
            Some(Outcome::TimedOut { .. }) | None => MachineResult::TimedOut,
        },
    }
}

/// A property read.
pub fn get_query(dest: &str, path: &str, interface: Option<&str>, property: &str) -> Query {
    Query {
        destination: dest.into(),
        path: path.into(),
        op: Op::Get,
        member: Some(property.into()),
        request: Request {
            interface: interface.map(str::to_owned),
            ..Default::default()
        },
    }
}

/// A systemd Manager method call with a known signature.
pub fn manager_call(method: &str, args: Value, signature: &str) -> Query {
    Query {
        destination: SYSTEMD.into(),
        path: SYSTEMD_PATH.into(),
        op: Op::Call,
        member: Some(method.into()),
        request: Request {
            interface: Some(MANAGER_IFACE.into()),
            args: Some(args),
            signature: Some(signature.into()),
            ..Default::default()
        },
    }
}

/// `StartUnit`/`StopUnit`/`RestartUnit` with mode "replace".
pub fn unit_job(method: &str, unit: &str) -> Query {
    manager_call(method, json!([unit, "replace"]), "ss")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_jobs_replace() {
        let q = unit_job("RestartUnit", "nginx.service");
        assert_eq!(q.member.as_deref(), Some("RestartUnit"));
        assert_eq!(q.request.args, Some(json!(["nginx.service", "replace"])));
        assert_eq!(q.request.signature.as_deref(), Some("ss"));
        assert!(q.request.check_for(Op::Call).is_ok());
    }
}
