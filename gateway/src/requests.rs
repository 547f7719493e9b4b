//! Asking machines: the gateway's own queries (ListUnits, targeted gets) one machine at a time
//! ([`ask`]), and every outcome of a fan-out mapped to a [`MachineResult`] ([`result_of`]), also
//! for clients' requests (`ws::request`).

use std::time::Duration;

use cbus_client::fleet::{AgentStatus, Fleet, FleetError, Outcome, Query};
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
        Err(e) => failed(&e),
        Ok(mut outcomes) => outcomes
            .pop()
            .map_or(MachineResult::TimedOut, |o| result_of(o.outcome)),
    }
}

/// A fan-out that failed as a whole, as each machine's result.
pub(crate) fn failed(e: &FleetError) -> MachineResult {
    MachineResult::Failed(ErrorBody::new(ErrorCode::InternalError, e.to_string()))
}

/// What one machine's outcome means for who asked.
pub(crate) fn result_of(outcome: Outcome) -> MachineResult {
    match outcome {
        Outcome::Replied(reply) => match reply.result {
            Ok(s) => MachineResult::Ok(s),
            Err(e) => MachineResult::Failed(e),
        },
        Outcome::NoResponders => MachineResult::Failed(ErrorBody::new(
            ErrorCode::Disconnected,
            "the agent is not connected to NATS",
        )),
        Outcome::Stopped => MachineResult::Failed(ErrorBody::new(
            ErrorCode::Disconnected,
            "the agent has stopped",
        )),
        Outcome::Unresponsive { silent } => MachineResult::Failed(ErrorBody::new(
            ErrorCode::Disconnected,
            format!(
                "the agent is unresponsive (silent {} s); not asked",
                silent.as_secs()
            ),
        )),
        Outcome::TimedOut { .. } => MachineResult::TimedOut,
        Outcome::Maintenance(_) => MachineResult::Failed(ErrorBody::new(
            ErrorCode::Disconnected,
            "the machine is under maintenance; not asked",
        )),
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
