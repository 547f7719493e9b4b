//! Helpers shared by the `agent_*` tests: asking one agent through `cbus_client::fleet` (the same
//! client the CLI uses) and reading its replies.

#![allow(dead_code)]

use std::io::BufRead as _;
use std::time::Duration;

use cbus_client::fleet::{Fleet, Outcome, Query};
use cbus_protocol::presence::AgentState;
use cbus_protocol::{ErrorBody, Op, Reply, Request};
use serde_json::Value;

pub const NAME: &str = cbus_tests::TestService::NAME;
pub const PATH: &str = cbus_tests::TestService::PATH;

/// Waits until the registry lists `nkey` as running.
pub async fn wait_registered(fleet: &Fleet, nkey: &str) {
    let ok = cbus_tests::wait_for(Duration::from_secs(20), || async {
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

/// The value of a sample in Prometheus text, e.g. `cbus_agent_signals_dropped_total`.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A dbus-daemon on a fixed socket path, so that a restarted daemon has the same address.
pub fn start_bus(dir: &std::path::Path) -> (std::process::Child, String) {
    let config = dir.join("bus.conf");
    let socket = dir.join("bus.sock");
    let _ = std::fs::remove_file(&socket);
    std::fs::write(
        &config,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
</busconfig>
"#,
            socket.display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new("dbus-daemon")
        .arg(format!("--config-file={}", config.display()))
        .args(["--nofork", "--print-address=1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start dbus-daemon");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(!line.trim().is_empty(), "dbus-daemon printed no address");
    (child, format!("unix:path={}", socket.display()))
}

/// Terminates the daemon on drop.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        cbus_tests::util::terminate(&mut self.0, Duration::from_secs(2));
    }
}
