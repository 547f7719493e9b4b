//! cbus-agent against a real systemd machine (systemd-nspawn): properties of units, StartUnit and
//! StopUnit with the signature from introspection, PropertiesChanged on NATS.

mod agent_common;

use agent_common::*;
use std::time::{Duration, Instant};

use cbus_protocol::fleet::Fleet;
use cbus_protocol::{ErrorCode, Op};
use cbus_tests::{Agent, MachineSpec, NatsServer};
use futures::StreamExt;
use serde_json::{json, Value};

const SLEEPER: &str =
    "[Unit]\nDescription=cbus test sleeper\n[Service]\nExecStart=/bin/sleep infinity\n";

const EXAMPLE_POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent/policy.example.toml");

#[tokio::test]
async fn real_systemd_machine() {
    let nats = NatsServer::start();
    let machines = tokio::task::spawn_blocking(|| {
        cbus_tests::Fleet::boot(
            &[MachineSpec::new("agent-1").with_unit("sleeper.service", SLEEPER)],
        )
    })
    .await
    .unwrap();
    let m = &machines.machines[0];
    let agent = Agent::start_with_key(
        &nats.url(),
        &m.bus_address(),
        &m.host_key_path(),
        // The example policy shipped with the agent: unit control yes, anything else no.
        &["--policy", EXAMPLE_POLICY, "--hostname", "agent-1"],
    );
    assert_eq!(agent.nkey, m.nkey());
    let client = nats.connect().await;
    let fleet = Fleet::new(client.clone(), "test@systemd");
    wait_registered(&fleet, &agent.nkey).await;
    let n = agent.nkey.as_str();
    let sd = "org.freedesktop.systemd1";
    let unit = cbus_protocol::names::systemd_unit_path("sleeper.service");
    let mut changes = client
        .subscribe(format!(
            "dbus.signals.{n}.*.org.freedesktop.systemd1.unit.sleeper_2eservice"
        ))
        .await
        .unwrap();
    client.flush().await.unwrap();

    let r = ask(
        &fleet,
        n,
        sd,
        "/org/freedesktop/systemd1",
        Op::Get,
        Some("SystemState"),
        json!({}),
    )
    .await;
    assert_eq!(ok(&r).1, json!("running"));
    let r = ask(
        &fleet,
        n,
        sd,
        "/org/freedesktop/systemd1",
        Op::Call,
        Some("StartUnit"),
        json!({"args": ["sleeper.service", "replace"]}),
    )
    .await;
    assert_eq!(ok(&r).0.as_deref(), Some("o"));
    let active = cbus_tests::wait_for(Duration::from_secs(10), || async {
        let r = ask(
            &fleet,
            n,
            sd,
            &unit,
            Op::Get,
            Some("ActiveState"),
            json!({"interface": "org.freedesktop.systemd1.Unit"}),
        )
        .await;
        r.result
            .map(|s| s.value == json!("active"))
            .unwrap_or(false)
    })
    .await;
    assert!(active);
    assert_eq!(
        m.exec_stdout(&["systemctl", "is-active", "sleeper.service"]),
        "active"
    );

    // PropertiesChanged for the unit arrived on NATS, with ActiveState in its payload.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_active = false;
    while !saw_active {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline.into(), changes.next()).await else {
            break;
        };
        let args: Value = serde_json::from_slice(&msg.payload).unwrap();
        saw_active = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Member"))
            .map(|v| v.as_str())
            == Some("PropertiesChanged")
            && args[1]["ActiveState"] == json!({"t": "s", "v": "active"});
    }
    assert!(saw_active, "no PropertiesChanged with ActiveState=active");

    let r = ask(
        &fleet,
        n,
        sd,
        "/org/freedesktop/systemd1",
        Op::Call,
        Some("StopUnit"),
        json!({"args": ["sleeper.service", "replace"]}),
    )
    .await;
    ok(&r);
    let stopped = cbus_tests::wait_for(Duration::from_secs(10), || async {
        m.exec_stdout(&["systemctl", "is-active", "sleeper.service"]) == "inactive"
    })
    .await;
    assert!(stopped);
    // Interface found by introspection: ActiveState exists only on ...systemd1.Unit.
    let r = ask(
        &fleet,
        n,
        sd,
        &unit,
        Op::Get,
        Some("ActiveState"),
        json!({}),
    )
    .await;
    assert_eq!(ok(&r), (Some("s".into()), json!("inactive")));
    // Not in the example policy.
    let r = ask(
        &fleet,
        n,
        sd,
        "/org/freedesktop/systemd1",
        Op::Call,
        Some("ResetFailed"),
        json!({}),
    )
    .await;
    assert_eq!(err(&r).code, ErrorCode::AccessDenied);
    let r = ask(
        &fleet,
        n,
        sd,
        "/org/freedesktop/systemd1",
        Op::Call,
        Some("StartUnit"),
        json!({"args": ["nope.service", "replace"]}),
    )
    .await;
    assert_eq!(err(&r).code, ErrorCode::NotFound);
    drop(agent);
    drop(machines);
}
