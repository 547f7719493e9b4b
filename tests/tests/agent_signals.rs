//! Signals reach NATS on the right subjects with the right headers and bodies; floods through a
//! tiny queue are dropped and counted.

mod agent_common;

use agent_common::*;
use std::time::{Duration, Instant};

use cbus_protocol::fleet::{Fleet, Outcome, Query};
use cbus_protocol::presence::AgentState;
use cbus_protocol::{ErrorCode, Op, Reply, Request};
use cbus_tests::{Agent, MachineSpec, NatsServer, PrivateBus, TestService};
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn signals_arrive_with_headers_and_floods_are_counted() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let client = nats.connect().await;
    let agent = Agent::start(
        &nats.url(),
        bus.address(),
        &[
            "--allow-all",
            "--signal-queue",
            "1",
            "--metrics-interval",
            "200ms",
        ],
    );
    let fleet = Fleet::new(client.clone(), "test@signals");
    wait_registered(&fleet, &agent.nkey).await;
    let mut sigs = client
        .subscribe(format!("dbus.signals.{}.>", agent.nkey))
        .await
        .unwrap();
    let mut metrics = client
        .subscribe(format!("dbus.metrics.{}", agent.nkey))
        .await
        .unwrap();
    client.flush().await.unwrap();

    // The one-slot queue may drop any signal, this one too: emit until one gets through.
    let mut found = None;
    for _ in 0..20 {
        let r = ask(
            &fleet,
            &agent.nkey,
            NAME,
            PATH,
            Op::Call,
            Some("EmitOne"),
            json!({"args": ["hi"]}),
        )
        .await;
        ok(&r);
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), sigs.next()).await {
            if m.headers
                .as_ref()
                .and_then(|h| h.get("Member"))
                .map(|v| v.as_str())
                == Some("Message")
            {
                found = Some(m);
                break;
            }
        }
        if found.is_some() {
            break;
        }
    }
    let msg = found.expect("no Message signal arrived");
    let h = msg.headers.clone().unwrap();
    let sender = h.get("Sender").unwrap().as_str().to_owned();
    assert!(sender.starts_with(':'));
    assert_eq!(h.get("Sender-Name").map(|v| v.as_str()), Some(NAME));
    assert_eq!(h.get("Interface").unwrap().as_str(), "org.cbus.Test1");
    assert_eq!(h.get("Path").unwrap().as_str(), PATH);
    assert_eq!(h.get("Signature").unwrap().as_str(), "s");
    assert_eq!(h.get("NKey").unwrap().as_str(), agent.nkey);
    let parsed = cbus_protocol::SignalSubject::parse(&msg.subject).unwrap();
    assert_eq!(parsed.sender, sender);
    assert_eq!(parsed.path, PATH);
    assert_eq!(
        serde_json::from_slice::<Value>(&msg.payload).unwrap(),
        json!(["hi"])
    );

    // A flood through a one-slot queue: drops are counted, not silent.
    let r = ask(
        &fleet,
        &agent.nkey,
        NAME,
        PATH,
        Op::Call,
        Some("EmitSignals"),
        json!({"args": [20000]}),
    )
    .await;
    ok(&r);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut dropped = false;
    while !dropped {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline.into(), metrics.next()).await else {
            break;
        };
        dropped = String::from_utf8_lossy(&msg.payload)
            .lines()
            .any(|l| l.starts_with("cbus_agent_signals_dropped_total ") && !l.ends_with(" 0"));
    }
    assert!(dropped, "drop counter never moved");
}
