//! Asking one machine: the gateway's own queries (ListUnits, targeted gets) and clients' requests
//! (get, set, call, start, stop, restart), all through `protocol::fleet`, with every outcome
//! mapped to a [`MachineResult`].
//!
//! Client requests go to each target separately and concurrently, so a client sees each
//! machine's result as soon as it arrives and one silent machine delays nobody else's result; it
//! is reported by name as timed out when the deadline passes.

use std::time::Duration;

use cbus_client::fleet::{AgentStatus, Fleet, Outcome, Query};
use cbus_protocol::{ErrorBody, ErrorCode, Op, Request, Success};

/// How one machine fared.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MachineResult {
    Ok(Success),
    Failed(ErrorBody),
    TimedOut,
}

/// Asks one machine; maps every outcome to a result.
pub(crate) async fn ask(
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
pub(crate) fn get_query(dest: &str, path: &str, interface: Option<&str>, property: &str) -> Query {
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
