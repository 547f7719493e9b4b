//! Asking one agent through `cbus_client::fleet` (the same client the CLI uses) and reading its
//! replies: what the `agent_*` tests have in common.

use std::time::Duration;

use cbus_client::fleet::{Fleet, Outcome, Query};
use cbus_protocol::presence::AgentState;
use cbus_protocol::{ErrorBody, Op, Reply, Request};
use serde_json::Value;

pub use crate::util::sample;

pub const NAME: &str = crate::TestService::NAME;
pub const PATH: &str = crate::TestService::PATH;

/// Waits until the registry lists `nkey` as running.
pub async fn wait_registered(fleet: &Fleet, nkey: &str) {
    let ok = crate::wait_for(Duration::from_secs(20), || async {
        fleet
            .registry()
            .await
            .map(|agents| {
                agents
                    .iter()
                    .any(|a| a.info.nkey == nkey && a.state == AgentState::Running)
            })
            .unwrap_or(false)
    })
    .await;
    assert!(ok, "agent {nkey} never appeared in the registry");
}

/// Waits until the number of agents the registry lists as running satisfies `enough`; whether
/// it did within `timeout`.
pub async fn wait_running(
    fleet: &Fleet,
    timeout: Duration,
    enough: impl Fn(usize) -> bool,
) -> bool {
    crate::wait_for(timeout, || async {
        fleet
            .registry()
            .await
            .map(|a| enough(a.iter().filter(|a| a.state == AgentState::Running).count()))
            .unwrap_or(false)
    })
    .await
}

/// One request to one agent; panics when it does not reply.
pub async fn ask(
    fleet: &Fleet,
    nkey: &str,
    dest: &str,
    path: &str,
    op: Op,
    member: Option<&str>,
    request: Value,
) -> Reply {
    match try_ask(
        fleet,
        nkey,
        dest,
        path,
        op,
        member,
        request,
        Duration::from_secs(10),
    )
    .await
    {
        Some(r) => r,
        None => panic!("no reply from {nkey} to {op} {dest} {path} {member:?}"),
    }
}

/// Starts `unit` through the agent of `machine` (systemd's `Manager.StartUnit`, mode replace):
/// whether the agent allowed it and systemd there calls the unit active within 10 s.
pub async fn start_unit(fleet: &Fleet, nkey: &str, machine: &crate::Machine, unit: &str) -> bool {
    let r = ask(
        fleet,
        nkey,
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        Op::Call,
        Some("StartUnit"),
        serde_json::json!({"args": [unit, "replace"]}),
    )
    .await;
    r.result.is_ok()
        && crate::wait_for(Duration::from_secs(10), || async {
            machine.exec_stdout(&["systemctl", "is-active", unit]) == "active"
        })
        .await
}

/// One request to one agent; `None` when it did not reply within `timeout`.
#[allow(clippy::too_many_arguments)]
pub async fn try_ask(
    fleet: &Fleet,
    nkey: &str,
    dest: &str,
    path: &str,
    op: Op,
    member: Option<&str>,
    request: Value,
    timeout: Duration,
) -> Option<Reply> {
    let agents = fleet.registry().await.ok()?;
    let target: Vec<_> = agents.into_iter().filter(|a| a.info.nkey == nkey).collect();
    assert_eq!(target.len(), 1, "agent {nkey} in registry");
    let query = Query {
        destination: dest.into(),
        path: path.into(),
        op,
        member: member.map(str::to_owned),
        request: serde_json::from_value::<Request>(request).expect("request json"),
    };
    let out = fleet.fan_out(&target, &query, timeout).await.ok()?;
    match out.into_iter().next().map(|o| o.outcome) {
        Some(Outcome::Replied(r)) => Some(r),
        _ => None,
    }
}

/// The signature and value of a successful reply.
pub fn ok(reply: &Reply) -> (Option<String>, Value) {
    match &reply.result {
        Ok(s) => (s.signature.clone(), s.value.clone()),
        Err(e) => panic!("expected success, got {e}"),
    }
}

/// The error of a failed reply.
pub fn err(reply: &Reply) -> &ErrorBody {
    match &reply.result {
        Err(e) => e,
        Ok(s) => panic!("expected an error, got {s:?}"),
    }
}

/// A header of a NATS message as text.
pub fn header<'a>(msg: &'a async_nats::Message, name: &'static str) -> Option<&'a str> {
    cbus_client::headers::get(msg.headers.as_ref(), name)
}
