//! Running the real `cbus` binary from the CLI tests.
#![allow(dead_code)]

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cbus_protocol::fleet::Fleet;
use cbus_protocol::presence::AgentState;
use cbus_tests::{bin_path, NatsServer};
use serde_json::Value;

/// `cbus` with no config file and no NATS settings from the environment.
pub fn command() -> Command {
    let mut c = Command::new(bin_path("cbus"));
    c.env("CBUS_CONFIG", "/nonexistent/cbus.toml")
        .env_remove("NATS_URL")
        .env_remove("NATS_TOKEN")
        .env_remove("NATS_CREDS")
        .env_remove("NATS_USER")
        .env_remove("NATS_PASSWORD")
        .stdin(Stdio::null());
    c
}

/// Runs `cbus --server URL ARGS...`.
pub fn cbus(url: &str, args: &[&str]) -> Output {
    command()
        .arg("--server")
        .arg(url)
        .args(args)
        .output()
        .expect("run cbus")
}

/// Runs `cbus ARGS...` with `input` on stdin.
pub fn cbus_stdin(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = command()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cbus");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait cbus")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Both streams, for assertion messages.
pub fn both(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}

pub fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", both(o)))
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok_stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", both(o));
    stdout(o)
}

/// The result entry of `host` in a fan-out JSON document.
pub fn result_of(doc: &Value, host: &str) -> Value {
    doc["results"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["host"] == host))
        .cloned()
        .unwrap_or_else(|| panic!("no result for {host} in {doc}"))
}

/// Waits until `n` agents are registered as running.
pub async fn wait_agents(nats: &NatsServer, n: usize) {
    let fleet = Fleet::new(nats.connect().await, "test");
    let ok = cbus_tests::wait_for(Duration::from_secs(20), || async {
        fleet
            .registry()
            .await
            .map(|a| a.iter().filter(|a| a.state == AgentState::Running).count() == n)
            .unwrap_or(false)
    })
    .await;
    assert!(ok, "{n} agents never registered");
}
